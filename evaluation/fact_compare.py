"""Spoken-facts runs side by side in the layout of the study's tables (arXiv 2603.14343):
`python evaluate.py mode=compare runs='outputs/evaluate/facts_*'`.

- Table 1 (`table1.md`, `table1.csv`): Score, ES, PS, NS per strategy (method, modality, edited
  layers, key anchor), the unedited Baseline first.
- Table 2 (`table2.md`, `table2.csv`): for each strategy, modality and anchor that was run at
  several layers (e.g. `python evaluate.py -m data=spoken_facts editor=facts_rome_audio
  editor.audio_layer=0,1 data.anchor=first_subject,last_subject`), the top-1/2/3 layers by Score.

A strategy's modality and layers are read from its editor config (the edited sites' towers), so
any editor that names its sites is tabulated. Runs must score the same facts of the same data
with the same model; their anchors may differ.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import logging
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.files import write_atomic
from evaluation.identity import differences

log = logging.getLogger(__name__)
COLUMNS = ("Score", "ES", "PS", "NS")


@dataclass(frozen=True)
class FactRun:
    folder: Path
    metrics: Mapping[str, Any]

    @property
    def identity(self) -> Mapping[str, Any]:
        return self.metrics["identity"]

    @property
    def name(self) -> str:
        return self.identity["editor"].get("name", "?")

    @property
    def anchor(self) -> str:
        return self.identity["data"]["anchor"]

    @property
    def sites(self) -> dict[str, list[int]]:
        """tower ("audio", "text") -> the edited layers, from the editor's hyperparameters."""
        return edited_layers((self.identity["editor"].get("config") or {}).get("hparams") or {})

    @property
    def method(self) -> str:
        method = (self.identity["editor"].get("config") or {}).get("method", "")
        return method.rsplit(".", 1)[-1] or self.name

    @property
    def modality(self) -> str:
        towers = self.sites
        return "cross-modal" if len(towers) == 2 else next(iter(towers), "-")

    @property
    def layers(self) -> str:
        return "; ".join(f"{t} {','.join(map(str, ls))}" for t, ls in self.sites.items()) or "-"

    def measures(self) -> dict[str, Any]:
        data = {k: v for k, v in self.identity["data"].items() if k != "anchor"}
        return {"data": data, "model": self.identity["model"]}


def edited_layers(hparams: Mapping[str, Any]) -> dict[str, list[int]]:
    """tower -> layer indices edited, read from `sites` (ROME, fine-tuning: site names
    audio.layers.<i>..., llm.layers.<i>...) or `audio_layers`/`layers` (AlphaEdit)."""
    found: dict[str, list[int]] = defaultdict(list)
    for site in hparams.get("sites") or []:
        m = re.match(r"(audio|llm)\.layers\.(-?\d+)", str(site))
        if m:
            found["audio" if m[1] == "audio" else "text"].append(int(m[2]))
    for key, tower in (("audio_layers", "audio"), ("layers", "text")):
        found[tower] += [int(i) for i in hparams.get(key) or []]
    order = ("audio", "text")
    return {t: found[t] for t in order if found.get(t)}


def find_fact_runs(patterns: str | Sequence[str]) -> list[FactRun]:
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    folders = sorted({Path(p).parent for pat in patterns for p in glob.glob(str(Path(pat) / "metrics.json"))})
    runs = []
    for folder in folders:
        metrics = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
        if metrics.get("study") == "spoken_facts":
            runs.append(FactRun(folder, metrics))
    return runs


def check_comparable(runs: Sequence[FactRun]) -> None:
    for other in runs[1:]:
        diff = differences(runs[0].measures(), other.measures())
        if diff:
            raise ValueError(
                f"{runs[0].folder} and {other.folder} score different facts or models:\n  "
                + "\n  ".join(diff)
            )


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def table1_rows(runs: Sequence[FactRun]) -> list[list[str]]:
    rows = [["Baseline (unedited)", "-", "-", "-", *(_pct(runs[0].metrics["baseline"][c]) for c in COLUMNS)]]
    for r in sorted(runs, key=lambda r: (r.modality, r.method, r.name, r.layers, r.anchor)):
        if r.metrics.get("edited"):
            edited = r.metrics["edited"]
            rows.append([r.name, r.modality, r.layers, r.anchor, *(_pct(edited[c]) for c in COLUMNS)])
    return rows


def table2_rows(runs: Sequence[FactRun], top: int = 3) -> list[list[str]]:
    """Per (strategy, modality, anchor) run at several single layers: the best `top` by Score."""
    groups: dict[tuple[str, str, str], list[FactRun]] = defaultdict(list)
    for r in runs:
        layers = r.sites
        if r.metrics.get("edited") and sum(len(v) for v in layers.values()) == 1:
            groups[(r.name, r.modality, r.anchor)].append(r)
    rows = []
    for (name, modality, anchor), members in sorted(groups.items()):
        if len({m.layers for m in members}) < 2:
            continue
        ranked = sorted(members, key=lambda m: -(m.metrics["edited"]["Score"] or 0.0))
        picks = [f"{m.layers.split()[-1]} ({_pct(m.metrics['edited']['Score'])})" for m in ranked[:top]]
        rows.append([name, modality, anchor, *picks, *["-"] * (top - len(picks))])
    return rows


def _md(header: Sequence[str], rows: Sequence[Sequence[str]], numeric_from: int) -> str:
    align = ["---" if i < numeric_from else "---:" for i in range(len(header))]
    lines = [f"| {' | '.join(header)} |", f"| {' | '.join(align)} |"]
    lines += [f"| {' | '.join(r)} |" for r in rows]
    return "\n".join(lines)


def _csv(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows([header, *rows])
    return buf.getvalue()


T1 = ("strategy", "modality", "layers", "anchor", *COLUMNS)
T2 = ("strategy", "modality", "anchor", "top-1 layer (Score)", "top-2", "top-3")


def run(runs: Sequence[FactRun], out_dir: Path) -> str:
    """Write table1/table2 .md and .csv under `out_dir`; returns the Markdown."""
    check_comparable(runs)
    ident = runs[0].identity
    data = ident["data"]
    t1, t2 = table1_rows(runs), table2_rows(runs)
    text = (
        f"# Spoken facts: {len(runs)} runs on {data['name']} {data['split']} "
        f"({data['selection']['facts']} facts), {ident['model']['name']}\n\n"
        "## Table 1: Score (harmonic mean of ES, PS, NS), ES, PS, NS in percent\n\n"
        + _md(T1, t1, 4)
        + "\n\n## Table 2: the best layers by Score, per strategy and subject-word anchor\n\n"
        + (_md(T2, t2, 3) if t2 else "(no strategy was run at several single layers)")
        + "\n\nRuns:\n"
        + "".join(f"- {r.name} ({r.anchor}): `{r.folder}`\n" for r in runs)
    )
    write_atomic(out_dir / "table1.md", _md(T1, t1, 4) + "\n")
    write_atomic(out_dir / "table1.csv", _csv(T1, t1))
    write_atomic(out_dir / "table2.md", (_md(T2, t2, 3) if t2 else "") + "\n")
    write_atomic(out_dir / "table2.csv", _csv(T2, t2))
    write_atomic(out_dir / "compare.md", text)
    log.info("\n%s", text)
    return text
