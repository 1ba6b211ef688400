"""SAKE's metrics as pooled rates (micro-averages over queries), correct across DDP ranks.

Every judged query adds one count (and one hit when its verdict is True) to several named
tallies: its metric overall, per attribute, per query type, per portability category, and, in
sequential editing, per gap. A rate is hits / count over everything pooled in a tally, so the
audio-locality average weighs each query once, and gender's missing type 2 weighs nothing.
The tallies are one torchmetrics `Metric` whose states are summed across ranks.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torchmetrics import Metric

from evaluation.records import METRICS, QueryResult

GAPS = tuple(range(6))


def query_keys(q: QueryResult, attribute: str, gap: int | None = None) -> list[str]:
    """The tallies one judged query counts in."""
    if gap is not None:
        return [f"sequential/{q.kind}/{gap}"]
    keys = [f"overall/{q.kind}", f"by_attribute/{attribute.capitalize()}/{q.kind}"]
    if q.type and q.kind in ("generality", "audio_locality"):
        keys.append(f"by_type/{q.kind}_type{q.type}")
        keys.append(f"by_attribute_type/{attribute.capitalize()}/{q.kind}_type{q.type}")
    if q.kind == "portability" and q.category:
        keys.append(f"by_category/{q.category}")
    return keys


def all_keys(attributes: Iterable[str], categories: Iterable[str]) -> list[str]:
    """Every tally a run can touch, in a fixed order shared by all ranks."""
    attributes = sorted({a.capitalize() for a in attributes})
    keys = [f"overall/{m}" for m in METRICS]
    keys += [f"by_attribute/{a}/{m}" for a in attributes for m in METRICS]
    types = [f"generality_type{t}" for t in (1, 2, 3)] + [f"audio_locality_type{t}" for t in (1, 2, 3, 4)]
    keys += [f"by_type/{t}" for t in types]
    keys += [f"by_attribute_type/{a}/{t}" for a in attributes for t in types]
    keys += [f"by_category/{c}" for c in sorted(set(categories))]
    keys += [f"sequential/{m}/{g}" for m in METRICS for g in GAPS]
    keys += ["invalid/single", "invalid/sequential", "degenerate/single"]
    keys += [f"degenerate/sequential/{g}" for g in GAPS]
    keys += ["seconds/single", "seconds/sequential"]
    return keys


class Tally(Metric):
    """Named (hits, count) pairs, summed over updates and across processes."""

    full_state_update = False

    def __init__(self, keys: Sequence[str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.keys = list(keys)
        self.index = {k: i for i, k in enumerate(self.keys)}
        self.add_state("hits", torch.zeros(len(keys), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("counts", torch.zeros(len(keys), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, keys: Sequence[str], hits: Sequence[float]) -> None:
        unknown = [k for k in keys if k not in self.index]
        if unknown:
            raise KeyError(f"tallies {unknown[:3]} are not among this run's {len(self.keys)} keys")
        idx = torch.tensor([self.index[k] for k in keys], dtype=torch.long, device=self.hits.device)
        self.hits.index_add_(0, idx, torch.tensor(hits, dtype=torch.float64, device=self.hits.device))
        self.counts.index_add_(0, idx, torch.ones(len(keys), dtype=torch.float64, device=self.hits.device))

    def compute(self) -> dict[str, tuple[float, int]]:
        return {
            k: (float(h), int(c))
            for k, h, c in zip(self.keys, self.hits.tolist(), self.counts.tolist(), strict=True)
        }


def update_single(tally: Tally, record: Mapping[str, Any]) -> None:
    keys, hits = [], []
    for d in record["queries"]:
        q = QueryResult.from_dict(d)
        for k in query_keys(q, record["attribute"]):
            keys.append(k)
            hits.append(float(bool(q.verdict)))
        keys += ["invalid/single", "degenerate/single"]
        hits += [float(q.verdict is None), float(q.degenerate)]
    keys.append("seconds/single")
    hits.append(float(record["seconds"]))
    tally.update(keys, hits)


def update_sequential(tally: Tally, record: Mapping[str, Any]) -> None:
    keys, hits = ["seconds/sequential"], [float(record["seconds"])]
    for ev in record["evals"]:
        for d in ev["queries"]:
            q = QueryResult.from_dict(d)
            keys += [*query_keys(q, ev["attribute"], ev["gap"]), "invalid/sequential"]
            keys.append(f"degenerate/sequential/{ev['gap']}")
            hits += [float(bool(q.verdict)), float(q.verdict is None), float(q.degenerate)]
    tally.update(keys, hits)


def _rate(hits: float, count: int) -> float | None:
    return round(100.0 * hits / count, 4) if count else None


def summarise(values: Mapping[str, tuple[float, int]]) -> dict[str, Any]:
    """The metrics.json layout (percentages 0-100; None where nothing was measured)."""
    out: dict[str, Any] = {"overall": {}, "by_attribute": {}, "by_type": {}, "by_attribute_type": {},
                           "by_category": {}}  # fmt: skip
    counts: dict[str, Any] = {"single": {}, "sequential": {}}
    sequential: dict[str, dict[str, float | None]] = {}
    for key, (hits, n) in values.items():
        parts = key.split("/")
        if parts[0] == "overall":
            out["overall"][parts[1]] = _rate(hits, n)
            counts["single"][parts[1]] = n
        elif parts[0] in ("by_attribute", "by_attribute_type") and n:
            out[parts[0]].setdefault(parts[1], {})[parts[2]] = _rate(hits, n)
        elif parts[0] in ("by_type", "by_category"):
            out[parts[0]][parts[1]] = _rate(hits, n)
        elif parts[0] == "sequential":
            sequential.setdefault(parts[1], {})[parts[2]] = _rate(hits, n)
            counts["sequential"].setdefault(parts[1], {})[parts[2]] = n
    out["by_attribute"] = {a: {m: v.get(m) for m in METRICS} for a, v in sorted(out["by_attribute"].items())}
    if any(values[f"sequential/{m}/{g}"][1] for m in METRICS for g in GAPS):
        out["sequential"] = sequential
    out["counts"] = counts
    out["invalid_judgments"] = {m: int(values[f"invalid/{m}"][0]) for m in ("single", "sequential")}
    out["degenerate"] = {
        "single": int(values["degenerate/single"][0]),
        "sequential": {str(g): int(values[f"degenerate/sequential/{g}"][0]) for g in GAPS},
    }
    seconds = {m: values[f"seconds/{m}"] for m in ("single", "sequential")}
    out["seconds_per_edit"] = {m: round(t / n, 4) if n else None for m, (t, n) in seconds.items()}
    out["seconds_total"] = {m: round(t, 1) for m, (t, _) in seconds.items()}
    counts["instances"] = {m: n for m, (_, n) in seconds.items()}  # single: instances, sequential: steps
    return out
