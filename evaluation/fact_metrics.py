"""The spoken-facts study's editing metrics (arXiv 2603.14343, Table 1; CounterFact's, after ROME).

A completion's score on a prompt is the mean log-probability of its tokens, each given the
prompt and the tokens before it (ROME compares the mean negative log-likelihoods the same way),
so a two-token object is not penalised against a one-token one.

- ES (efficacy): the share of edits whose edited model scores the counterfactual target above
  the true object on the edit prompt.
- PS (paraphrase): per edit, the share of its paraphrase prompts where the target wins; averaged
  over the edits that have paraphrases.
- NS (neighbourhood): per edit, the share of its neighbour prompts (other subjects whose true
  object is theirs) where the true object still wins over the edit's target; averaged over the
  edits that have neighbours.
- Score: the harmonic mean of ES, PS and NS. The study's Table 1 rows are the harmonic, not the
  arithmetic, mean (Baseline: 20.4, 24.4, 76.18 -> 29.09); a zero anywhere makes it zero.

All shares are in percent, as the study reports them.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from lalms.base import IGNORE_INDEX, answer_nll

KINDS = ("prompt", "paraphrase", "neighbour")
METRICS = {"prompt": "ES", "paraphrase": "PS", "neighbour": "NS"}


def object_scores(logits: torch.Tensor, labels: torch.Tensor, suffix: int) -> torch.Tensor:
    """Each row's score of its labelled completion without the last `suffix` labelled tokens (the
    chat template's turn end, which `LALM.encode` labels after every answer): the mean
    log-probability of the object's own tokens. logits: [batch, length, vocab]; labels:
    [batch, length], IGNORE_INDEX outside the answer. Returns [batch]."""
    labels = labels.clone()
    for row in labels:
        where = (row != IGNORE_INDEX).nonzero().flatten()
        if len(where) <= suffix:
            raise ValueError(
                f"a completion without tokens of its own (labelled {len(where)}, suffix {suffix})"
            )
        if suffix:
            row[where[-suffix:]] = IGNORE_INDEX
    return -answer_nll(logits, labels, reduction="none")


@dataclass(frozen=True)
class Reading:
    """The edited model's scores of one prompt of one edit."""

    edit: str  # the fact's id
    kind: str  # prompt, paraphrase or neighbour
    target: float  # the counterfactual target's score (mean log-probability)
    true: float  # the true object's score: the fact's object (for a neighbour, its own)
    known: bool | None = None  # greedy decoding gives the true object (and the turn end); None: not read

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown prompt kind {self.kind!r} (one of {', '.join(KINDS)})")

    @property
    def success(self) -> bool:
        """Prompt and paraphrase: the target wins; neighbour: the true object still does."""
        return self.true > self.target if self.kind == "neighbour" else self.target > self.true


def harmonic_mean(values: Sequence[float]) -> float:
    if any(v < 0 for v in values):
        raise ValueError(f"the harmonic mean of negative values {values}")
    return 0.0 if any(v == 0 for v in values) else len(values) / sum(1 / v for v in values)


def fact_metrics(readings: Iterable[Reading]) -> dict[str, float | int | None]:
    """ES, PS, NS and Score in percent (None for a metric no reading measures; Score then too),
    with the number of edits each averages over; `known`: the share of edit prompts whose greedy
    completion is the true object (the facts the model knows, where the readings say)."""
    readings = list(readings)
    per: dict[str, dict[str, list[bool]]] = {k: defaultdict(list) for k in KINDS}
    for r in readings:
        per[r.kind][r.edit].append(r.success)
    out: dict[str, float | int | None] = {}
    for kind, name in METRICS.items():
        edits = per[kind]
        out[name] = 100 * sum(sum(v) / len(v) for v in edits.values()) / len(edits) if edits else None
        out[f"{name}_edits"] = len(edits)
    values = [out[m] for m in METRICS.values()]
    out["Score"] = None if None in values else harmonic_mean(values)  # type: ignore[arg-type]
    known = [r.known for r in per_kind_readings(readings, "prompt") if r.known is not None]
    out["known"] = 100 * sum(known) / len(known) if known else None  # edit prompts completed right
    return out


def per_kind_readings(readings: Iterable[Reading], kind: str) -> list[Reading]:
    return [r for r in readings if r.kind == kind]
