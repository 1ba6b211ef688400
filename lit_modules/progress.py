"""Training progress for logs that are no terminal (a cluster job's log file, CI, `make run > log`).

Lightning's progress bar redraws a terminal line; written to a file it stays silent until the
end. `ProgressLog` writes one line to the log every `every_s` seconds instead: the step and the
total, the latest `train/*` figures the module logged (loss, edit success, ...), steps/s and the
ETA; the same for validation passes, and a last line when training ends. The totals come from
Lightning where the loaders have a length, else from the DataModule (`BatchCounts`): SAKE's
training stream is iterable and has none.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from typing import Any, Protocol, runtime_checkable

import lightning as L

from common.progress import rate_and_eta

log = logging.getLogger(__name__)


@runtime_checkable
class BatchCounts(Protocol):
    """A DataModule that knows how many batches one rank's pass over a split has."""

    def batches(self, split: str, world_size: int) -> int: ...


class ProgressLog(L.Callback):
    """Log step, figures, rate and ETA every `every_s` seconds; `always`: also on a terminal."""

    def __init__(self, every_s: float = 30.0, always: bool = False) -> None:
        self.every_s, self.always = every_s, always
        self._start = self._last = 0.0
        self._done = 0  # training batches this run (a resumed run counts from its start)
        self._val_start = self._val_last = 0.0
        self._first = 0

    def _active(self, trainer: L.Trainer) -> bool:
        return trainer.is_global_zero and (self.always or not sys.stdout.isatty())  # where Hydra logs

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = self._last = time.monotonic()
        self._done = 0
        self._first = trainer.fit_loop.epoch_loop.batch_progress.total.completed  # a resumed run's start
        if self._active(trainer):
            total = self.total(trainer)
            log.info("training: %s steps%s", total or "?", f" from step {self._first}" if self._first else "")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self._done += 1
        now = time.monotonic()
        if self._active(trainer) and now - self._last >= self.every_s:
            self._last = now
            log.info("training: %s", self.line(trainer, now))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._active(trainer):
            step, elapsed = self._first + self._done, time.monotonic() - self._start
            log.info("training done: step %d in %s%s", step, seconds(elapsed), figures_of(trainer, "train/"))

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._val_start = self._val_last = time.monotonic()

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        *a: Any,
    ) -> None:
        now = time.monotonic()
        if self._active(trainer) and not trainer.sanity_checking and now - self._val_last >= self.every_s:
            self._val_last = now
            total = self.val_total(trainer)
            done, elapsed = batch_idx + 1, now - self._val_start
            _, eta = rate_and_eta(done, total - done if total else None, elapsed)
            log.info("validation: batch %d/%s, %.0f s, ETA %s", done, total or "?", elapsed, seconds(eta))

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._active(trainer) and not trainer.sanity_checking:
            figures = figures_of(trainer, "val/")
            log.info("validation done in %.0f s%s", time.monotonic() - self._val_start, figures)

    # ----------------------------------------------------------------- the figures
    def line(self, trainer: L.Trainer, now: float) -> str:
        step, total = self._first + self._done, self.total(trainer)
        rate, eta = rate_and_eta(self._done, total - step if total else None, now - self._start)
        where = f"step {step}/{total}" if total else f"step {step}"
        epoch = (
            f", epoch {trainer.current_epoch + 1}/{trainer.max_epochs}"
            if (trainer.max_epochs or 1) > 1
            else ""
        )
        return f"{where}{epoch}{figures_of(trainer, 'train/')}, {rate:.2f} steps/s, ETA {seconds(eta)}"

    def total(self, trainer: L.Trainer) -> int | None:
        """Training batches of the whole run (every epoch), or None where nothing says."""
        if trainer.max_steps and trainer.max_steps > 0:
            return trainer.max_steps
        per_epoch = _finite(trainer.num_training_batches) or self._counted(trainer, "train")
        return per_epoch * trainer.max_epochs if per_epoch and trainer.max_epochs else None

    def val_total(self, trainer: L.Trainer) -> int | None:
        counts = trainer.num_val_batches
        counted = _finite(sum(counts)) if counts else None
        return counted or self._counted(trainer, "val")

    @staticmethod
    def _counted(trainer: L.Trainer, split: str) -> int | None:
        data = trainer.datamodule
        return data.batches(split, trainer.world_size) if isinstance(data, BatchCounts) else None


def figures_of(trainer: L.Trainer, prefix: str) -> str:
    """`, loss 1.23, success_edit 0.81`: the scalar figures logged under `prefix`."""
    parts = []
    for key, value in sorted(trainer.callback_metrics.items()):
        if key.startswith(prefix) and getattr(value, "numel", lambda: 0)() == 1:
            parts.append(f"{key[len(prefix) :]} {float(value):.4g}")
    return "".join(f", {p}" for p in parts)


def seconds(value: float) -> str:
    if not math.isfinite(value):
        return "?"
    minutes, secs = divmod(int(round(value)), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def _finite(value: float | int) -> int | None:
    return int(value) if value and math.isfinite(value) else None
