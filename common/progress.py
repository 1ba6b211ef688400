"""A progress bar for long loops: count, rate (edits/s or queries/s), elapsed time and ETA."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

log = logging.getLogger(__name__)


class _Rate(ProgressColumn):
    def __init__(self, unit: str) -> None:
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(
            f"{speed:.2f} {self.unit}/s" if speed else f"- {self.unit}/s", style="progress.data.speed"
        )


def rate_and_eta(done: int, remaining: int | None, elapsed: float) -> tuple[float, float]:
    """Items per second so far, and the seconds the `remaining` ones take at that rate (nan
    where unknown)."""
    rate = done / elapsed if elapsed > 0 else 0.0
    return rate, (remaining / rate if remaining is not None and rate > 0 else float("nan"))


@contextmanager
def progress_bar(
    description: str, total: int, unit: str = "edits", log_every_s: float = 30.0
) -> Iterator[Callable[[int], None]]:
    """A rich progress bar with the rate and an ETA; yields `advance(n)`.

    Where the output is no terminal (a cluster job's log file, CI), the bar would stay silent,
    so the same figures go to the log instead, every `log_every_s` seconds and at the end."""
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), _Rate(unit))
    console = Console()  # stdout, where Hydra logs: a file gets the log lines, not the bar
    timing = (TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, *timing, console=console, disable=not console.is_terminal) as bar:
        task = bar.add_task(description, total=total)
        state = {"logged": time.monotonic(), "done": 0}
        start = state["logged"]

        def report() -> None:
            done, elapsed = state["done"], time.monotonic() - start
            rate, eta = rate_and_eta(done, total - done, elapsed)
            log.info(
                "%s: %d/%d, %.2f %s/s, elapsed %.0f s, ETA %.0f s",
                description,
                done,
                total,
                rate,
                unit,
                elapsed,
                eta,
            )

        def advance(n: int = 1) -> None:
            bar.advance(task, n)
            state["done"] += n
            if not console.is_terminal and time.monotonic() - state["logged"] >= log_every_s:
                state["logged"] = time.monotonic()
                report()

        yield advance
        if not console.is_terminal:
            report()
