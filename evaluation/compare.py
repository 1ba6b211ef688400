"""Many evaluation runs side by side: `python evaluate.py mode=compare runs='outputs/evaluate/*'`.

Reads each run folder's `metrics.json` and writes, under the compare run's folder:
- `compare.md`: the paper's Table 2 layout (one row per editor and model, the five metrics,
  seconds per edit), then one table per metric of the sequential sweep (score per gap);
- `compare.csv` (editor, model, metric, value) and `sequential.csv` (editor, model, metric, gap,
  value);
- `plots/compare_metrics.png` (the five metrics per run) and `plots/compare_sequential.png`
  (each metric against the gap, one line per run).

Spoken-facts runs (data=spoken_facts) get the localisation-and-editing study's Tables 1 and 2
instead (evaluation/fact_compare.py).

Runs are only put side by side when they measure the same thing: the same data (records and
clips), split and instance selection, the same judge, the same generation length and the same
sequential window. Otherwise the comparison is refused, naming what differs.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.files import write_atomic
from evaluation import fact_compare
from evaluation.identity import differences
from evaluation.records import METRICS
from evaluation.report import HEADERS

log = logging.getLogger(__name__)


class NotComparable(ValueError):
    """Runs that measure different things were asked to be compared."""


@dataclass(frozen=True)
class Run:
    folder: Path
    metrics: Mapping[str, Any]

    @property
    def identity(self) -> Mapping[str, Any]:
        return self.metrics["identity"]

    @property
    def editor(self) -> str:
        return self.identity["editor"].get("label") or self.identity["editor"]["name"]

    @property
    def model(self) -> str:
        return self.identity["model"]["name"]

    def measures(self) -> dict[str, Any]:
        """What must agree for two runs to be compared."""
        ident = self.identity
        sweeps = ident.get("sweeps", {})
        return {
            "data": ident["data"],
            "judge": ident["judge"],
            "max_new_tokens": ident.get("generation", {}).get("max_new_tokens"),
            "sequential": {k: sweeps.get(k) for k in ("first", "max_gap")},
        }


def find_runs(patterns: str | Sequence[str]) -> list[Run]:
    """The evaluation runs (folders with a metrics.json of a sweep) the glob patterns match."""
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    folders = sorted({Path(p).parent for pat in patterns for p in glob.glob(str(Path(pat) / "metrics.json"))})
    runs = []
    for folder in folders:
        metrics = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
        if "data" not in metrics.get("identity", {}) or "overall" not in metrics:
            log.warning("compare: %s is no editing sweep (editor=none, rescore, older): skipped", folder)
            continue
        runs.append(Run(folder, metrics))
    if not runs:
        raise FileNotFoundError(f"runs={patterns}: no evaluation run folders (with metrics.json) match")
    return runs


def check_comparable(runs: Sequence[Run]) -> None:
    first = runs[0]
    for other in runs[1:]:
        diff = differences(first.measures(), other.measures())
        if diff:
            raise NotComparable(
                f"{first.folder} and {other.folder} measure different things:\n  "
                + "\n  ".join(diff)
                + "\nCompare runs of the same data, selection, judge and generation length."
            )


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    align = ["---", "---"] + ["---:"] * (len(header) - 2)
    return [f"| {' | '.join(header)} |", f"| {' | '.join(align)} |", *(f"| {' | '.join(r)} |" for r in rows)]


def markdown(runs: Sequence[Run]) -> str:
    ident = runs[0].identity
    data, judge = ident["data"], ident["judge"]
    n = data.get("selection", {}).get("single")
    lines = [
        f"# {len(runs)} runs on {data['name']} {data['split']} ({n} edits), judge: {judge['name']}",
        "",
        "## Single editing",
        "",
        *_table(
            ["Editor", "Model", *(HEADERS[k] for k in METRICS), "s/edit"],
            [
                [
                    r.editor,
                    r.model,
                    *(_pct(r.metrics["overall"].get(k)) for k in METRICS),
                    _pct(r.metrics["seconds_per_edit"].get("single")),
                ]
                for r in runs
            ],
        ),  # fmt: skip
    ]
    with_seq = [r for r in runs if r.metrics.get("sequential")]
    if with_seq:
        gaps = sorted({g for r in with_seq for v in r.metrics["sequential"].values() for g in v}, key=int)
        lines += ["", "## Sequential editing (score of an edit `gap` edits after it was applied)"]
        for k in METRICS:
            lines += ["", f"### {HEADERS[k]}", ""]
            lines += _table(
                ["Editor", "Model", *(f"gap {g}" for g in gaps)],
                [
                    [r.editor, r.model, *(_pct(r.metrics["sequential"][k].get(g)) for g in gaps)]
                    for r in with_seq
                ],
            )
    lines += ["", "Runs:", *(f"- {r.editor} on {r.model}: `{r.folder}`" for r in runs)]
    return "\n".join(lines) + "\n"


def _csv(rows: Sequence[Sequence[Any]]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue()


def plots(out_dir: Path, runs: Sequence[Run]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    labels = [f"{r.editor} ({r.model})" for r in runs]
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(runs) + 3), 4))
    width = 0.8 / len(METRICS)
    for j, k in enumerate(METRICS):
        values = [r.metrics["overall"].get(k) or 0.0 for r in runs]
        ax.bar([i + j * width for i in range(len(runs))], values, width, label=HEADERS[k])
    ax.set_xticks(
        [i + 0.4 - width / 2 for i in range(len(runs))], labels, fontsize=7, rotation=20, ha="right"
    )
    ax.set(ylabel="score (%)", ylim=(0, 102), title="Single editing")
    ax.legend(fontsize=7, ncol=len(METRICS))
    fig.tight_layout()
    fig.savefig(out_dir / "compare_metrics.png", dpi=120)
    plt.close(fig)
    written = [out_dir / "compare_metrics.png"]
    with_seq = [(label, r) for label, r in zip(labels, runs, strict=True) if r.metrics.get("sequential")]
    if with_seq:
        fig, axes = plt.subplots(1, len(METRICS), figsize=(3.2 * len(METRICS), 3.2), sharey=True)
        for ax, k in zip(axes, METRICS, strict=True):
            for label, r in with_seq:
                pts = [(int(g), v) for g, v in r.metrics["sequential"][k].items() if v is not None]
                if pts:
                    ax.plot(*zip(*pts, strict=True), marker="o", label=label)
            ax.set(title=HEADERS[k], xlabel="gap", ylim=(0, 102))
        axes[0].set_ylabel("score (%)")
        axes[-1].legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(out_dir / "compare_sequential.png", dpi=120)
        plt.close(fig)
        written.append(out_dir / "compare_sequential.png")
    return written


def run(patterns: str | Sequence[str], out_dir: Path) -> str:
    """Compare the matching runs; writes compare.md, compare.csv, sequential.csv and plots (for
    spoken-facts runs: the study's tables, evaluation/fact_compare.py)."""
    facts = fact_compare.find_fact_runs(patterns)
    if facts:
        return fact_compare.run(facts, out_dir)
    runs = find_runs(patterns)
    check_comparable(runs)
    text = markdown(runs)
    write_atomic(out_dir / "compare.md", text)
    single = [("editor", "model", "metric", "value")]
    single += [(r.editor, r.model, k, r.metrics["overall"].get(k)) for r in runs for k in METRICS]
    write_atomic(out_dir / "compare.csv", _csv(single))
    seq = [("editor", "model", "metric", "gap", "value")]
    for r in runs:
        for k, by_gap in (r.metrics.get("sequential") or {}).items():
            seq += [(r.editor, r.model, k, g, v) for g, v in by_gap.items()]
    write_atomic(out_dir / "sequential.csv", _csv(seq))
    plots(out_dir / "plots", runs)
    log.info("\n%s", text)
    return text
