"""How close a judge's figures come to reference figures on the same saved responses, cell by
cell (benchmarks/judge_agreement.py prints it; a test holds the rule judge to the paper's).

Cells are the paper's Table 9 columns: reliability, generality and its types 1-3, audio
locality and its types 1-4, text locality, portability; rows ALL and one per attribute.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from evaluation import metrics as M
from evaluation.judges import Judge
from evaluation.records import judge_results
from evaluation.rescore import load

CELLS = (
    "reliability", "generality", "generality_type1", "generality_type2", "generality_type3",
    "audio_locality", "audio_locality_type1", "audio_locality_type2", "audio_locality_type3",
    "audio_locality_type4", "text_locality", "portability",
)  # fmt: skip


@dataclass(frozen=True)
class Cell:
    row: str  # ALL or an attribute
    cell: str
    reference: float
    judge: float | None

    @property
    def gap(self) -> float | None:
        return None if self.judge is None else self.judge - self.reference


def figures(metrics: Mapping[str, Any]) -> dict[str, dict[str, float | None]]:
    """{row: {cell: value}} from a metrics.json content: ALL and each attribute."""
    rows = {"ALL": {**metrics["overall"], **metrics["by_type"]}}
    for attr, values in metrics["by_attribute"].items():
        rows[attr] = {**values, **metrics["by_attribute_type"].get(attr, {})}
    return rows


def judged(results: str | Path, judge: Judge) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(the single-editing records of `results`, re-judged; their metrics)."""
    mode, records = load(Path(results))
    if mode != "single":
        raise ValueError(f"{results}: single-editing results are compared (the paper's Table 9)")
    judge_results([q for r in records for q in r["queries"]], judge)
    tally = M.Tally(M.all_keys({r["attribute"] for r in records}, set()))
    for r in records:
        M.update_single(tally, r)
    return records, M.summarise(tally.compute())


def agreement(metrics: Mapping[str, Any], reference: str | Path) -> list[Cell]:
    """Every reference cell beside the judge's figure."""
    rows = yaml.safe_load(Path(reference).read_text(encoding="utf-8"))["rows"]
    ours = figures(metrics)
    return [
        Cell(row, cell, float(values[cell]), ours.get(row, {}).get(cell))
        for row, values in rows.items()
        for cell in CELLS
        if cell in values
    ]
