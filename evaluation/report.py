"""report.md (the paper's Table 2 layout for one run, plus breakdowns), PNG plots and TensorBoard
scalars, all from the content of metrics.json."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from common.files import write_atomic
from evaluation.records import METRICS

log = logging.getLogger(__name__)

HEADERS = {
    "reliability": "Reliability",
    "generality": "Generality",
    "audio_locality": "Audio Locality",
    "text_locality": "Text Locality",
    "portability": "Portability",
}


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    align = ["---"] + ["---:"] * (len(header) - 1)
    return [f"| {' | '.join(header)} |", f"| {' | '.join(align)} |", *(f"| {' | '.join(r)} |" for r in rows)]


def _sequential(m: Mapping[str, Any]) -> list[str]:
    gaps = sorted({g for v in m["sequential"].values() for g in v}, key=int)
    return [
        "## Sequential editing (score of an edit `gap` edits after it was applied)",
        "",
        *_table(
            ["Metric", *(f"gap {g}" for g in gaps)],
            [[HEADERS[k], *(_pct(m["sequential"][k].get(g)) for g in gaps)] for k in METRICS],
        ),
    ]


def _flat(values: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in values.items() if not isinstance(v, Mapping | list))


def _settings(m: Mapping[str, Any]) -> list[str]:
    """The editor's config and, for a trained editor, what its training chose (and held-out figures)."""
    editor = m.get("editor") or {}
    lines = []
    if editor.get("config"):
        lines.append(f"- config: {_flat(editor['config'])}")
    calibration = editor.get("calibration") or {}
    if calibration.get("chosen"):
        held_out, n = calibration.get("val") or {}, calibration.get("train_edits", "?")
        line = f"- calibrated on {n} train edits: {_flat(calibration['chosen'])}"
        if held_out:
            line += f" (held out, {held_out.get('edits', '?')} edits: {_flat(held_out)})"
        lines.append(line)
    batching = editor.get("batching") or {}
    if batching:
        lines.append(
            f"- edits per batch: {batching.get('edits_per_batch', '?')} "
            f"(edits_per_batch={batching.get('requested', '?')}: {batching.get('reason', '')})"
        )
    return lines


def summary(m: Mapping[str, Any]) -> str:
    """The headline: the Table 2 row of this run and, if run, the sequential table."""
    editor = m.get("run", {}).get("editor", "?")
    lines = _table(["Editor", *HEADERS.values()], [[editor, *(_pct(m["overall"].get(k)) for k in METRICS)]])
    if m.get("sequential"):
        lines += ["", *_sequential(m)]
    calibrated = [line for line in _settings(m) if line.startswith("- calibrated")]
    return "\n".join(lines + calibrated) + "\n"


def markdown(m: Mapping[str, Any]) -> str:
    run = m.get("run", {})
    editor, model = run.get("editor", "?"), run.get("model", "?")
    lines = [f"# {editor} on {model} ({run.get('data', '?')}, judge: {run.get('judge', '?')})", ""]
    cols = [HEADERS[k] for k in METRICS]
    if any(v is not None for v in m["overall"].values()):
        lines += ["## Single editing", ""]
        lines += _table(["Editor", *cols], [[editor, *(_pct(m["overall"].get(k)) for k in METRICS)]])
        lines += ["", "### Per attribute", ""]
        lines += _table(
            ["Attribute", *cols],
            [[a, *(_pct(v.get(k)) for k in METRICS)] for a, v in m["by_attribute"].items()],
        )
        lines += ["", "### Per query type (pooled over attributes)", ""]
        lines += _table(["Type", "Score"], [[k, _pct(v)] for k, v in m["by_type"].items()])
        if m.get("by_category"):
            lines += ["", "### Portability per knowledge category", ""]
            lines += _table(["Category", "Portability"], [[k, _pct(v)] for k, v in m["by_category"].items()])
    if m.get("sequential"):
        lines += ["", *_sequential(m)]
    deg, inv, sec, total = (
        m["degenerate"],
        m["invalid_judgments"],
        m["seconds_per_edit"],
        m.get("seconds_total", {}),
    )
    if _settings(m):
        lines += ["", "## Editor settings", "", *_settings(m)]
    lines += ["", "## Degenerate outputs and judge failures", ""]
    seq_deg = ", ".join(f"gap {g}: {n}" for g, n in deg["sequential"].items())
    lines += [
        f"- degenerate post-edit responses: single {deg['single']}; sequential {seq_deg}",
        f"- invalid judgments (counted as wrong): single {inv['single']}, sequential {inv['sequential']}",
        "",
        "## Time",
        "",
        f"- seconds per edit (apply, answer all queries, undo): single {_pct(sec['single'])}, "
        f"sequential step {_pct(sec['sequential'])}",
        f"- editing time in total (all sessions): single {total.get('single', '?')} s, "
        f"sequential {total.get('sequential', '?')} s",
        f"- wall time of this session (pre-edit answers and judging included): "
        f"{run.get('wall_seconds_this_session', '?')} s",
    ]
    return "\n".join(lines) + "\n"


def plots(out_dir: Path, m: Mapping[str, Any]) -> list[Path]:
    """sequential.png (each metric against the gap) and types.png (per-type scores)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    if m.get("sequential"):
        fig, ax = plt.subplots(figsize=(6, 4))
        for k in METRICS:
            pts = [(int(g), v) for g, v in m["sequential"][k].items() if v is not None]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=HEADERS[k])
        ax.set(
            xlabel="gap (edits applied since)", ylabel="score (%)", ylim=(0, 102), title="Sequential editing"
        )
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / "sequential.png", dpi=120)
        plt.close(fig)
        written.append(out_dir / "sequential.png")
    types = {k: v for k, v in m.get("by_type", {}).items() if v is not None}
    if types:
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.bar(range(len(types)), list(types.values()), color="tab:blue")
        ax.set_xticks(range(len(types)), [k.replace("_type", "\ntype ") for k in types], fontsize=7)
        ax.set(ylabel="score (%)", ylim=(0, 102), title="Per query type")
        fig.tight_layout()
        fig.savefig(out_dir / "types.png", dpi=120)
        plt.close(fig)
        written.append(out_dir / "types.png")
    return written


def tensorboard(out_dir: Path, m: Mapping[str, Any]) -> None:
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(out_dir)) as tb:
        for group in ("overall", "by_type", "by_category"):
            for k, v in m.get(group, {}).items():
                if v is not None:
                    tb.add_scalar(f"{group}/{k}", v, 0)
        for attr, vals in m.get("by_attribute", {}).items():
            for k, v in vals.items():
                if v is not None:
                    tb.add_scalar(f"by_attribute/{attr}/{k}", v, 0)
        for k, by_gap in m.get("sequential", {}).items():
            for g, v in by_gap.items():
                if v is not None:
                    tb.add_scalar(f"sequential/{k}", v, int(g))


def write(out_dir: Path, m: Mapping[str, Any]) -> str:
    """report.md, plots/ and tb/ under out_dir; returns the report's text."""
    text = markdown(m)
    write_atomic(out_dir / "report.md", text)
    plots(out_dir / "plots", m)
    tensorboard(out_dir / "tb", m)
    return text
