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

KINDS = ("prompt", "paraphrase", "neighbour")
METRICS = {"prompt": "ES", "paraphrase": "PS", "neighbour": "NS"}


def completion_logprob(
    logits: torch.Tensor, completion: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean log-probability of each row's completion tokens.

    logits: [batch, n, vocab], the model's logits at the n positions that predict the
    completion's n tokens (the last prompt position and the completion's own but last);
    completion: [batch, n] token ids; mask: [batch, n], 1 where a row's completion has a token
    (rows of completions of different lengths, padded). Returns [batch].
    """
    if logits.shape[:2] != completion.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not predict completions {tuple(completion.shape)}")
    lp = torch.log_softmax(logits.float(), dim=-1).gather(-1, completion.unsqueeze(-1)).squeeze(-1)
    mask = torch.ones_like(lp) if mask is None else mask.to(lp.dtype)
    counts = mask.sum(-1)
    if (counts == 0).any():
        raise ValueError("a completion without tokens")
    return (lp * mask).sum(-1) / counts


@dataclass(frozen=True)
class Reading:
    """The edited model's scores of one prompt of one edit."""

    edit: str  # the fact's id
    kind: str  # prompt, paraphrase or neighbour
    target: float  # the counterfactual target's score (mean log-probability)
    true: float  # the true object's score: the fact's object (for a neighbour, its own)

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
    with the number of edits each averages over."""
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
    return out
