"""Score a model on spoken facts: the readings ES, PS and NS are computed from
(evaluation/fact_metrics.py).

For every editable fact, the model hears each prompt (the edit prompt, its paraphrases, its
neighbours' prompts) with the data's instruction and scores two answers: the counterfactual
target and the true object (a neighbour's own object for its prompt), each by the mean
log-probability of its tokens (the turn end left out), and reads whether greedy decoding
completes the prompt with the true object (`known`). All prompts are scored in batches of
`batch_size` rows, two rows (target, true) per prompt.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from common.progress import progress_bar
from datamodules.spoken_facts import SpokenFact, SpokenFactsData, SpokenPrompt
from evaluation.fact_metrics import Reading, object_scores
from lalms.base import LALM, greedy_hits


def jobs(facts: Sequence[SpokenFact]) -> list[tuple[SpokenFact, str, SpokenPrompt, str]]:
    """(fact, kind, prompt, true object) of every prompt an editable fact is read on."""
    out = []
    for fact in facts:
        if not fact.editable:
            raise ValueError(
                f"{fact.source}: line {fact.line}: fact {fact.id!r} has no target; it cannot be edited"
            )
        out.append((fact, "prompt", fact.prompt, fact.object))
        out += [(fact, "paraphrase", p, fact.object) for p in fact.paraphrases]
        out += [(fact, "neighbour", n.prompt, n.object) for n in fact.neighbours]
    return out


def fact_readings(
    lalm: LALM, data: SpokenFactsData, facts: Sequence[SpokenFact], batch_size: int = 16
) -> list[Reading]:
    """The model's readings (target against true object) on every prompt of `facts`."""
    todo = jobs(facts)
    suffix = len(lalm.answer_suffix_ids)
    readings = []
    per_batch = max(1, batch_size // 2)
    with progress_bar("scoring spoken facts", len(todo), unit="prompts") as advance, torch.no_grad():
        for start in range(0, len(todo), per_batch):
            part = todo[start : start + per_batch]
            prompts = [data.prompt(p, lalm.sampling_rate) for _, _, p, _ in part]
            answers = [a for fact, _, _, true in part for a in (fact.target, true)]
            batch = lalm.to_device(lalm.encode([q for q in prompts for _ in range(2)], answers))
            logits = lalm.logits(batch)
            scores = object_scores(logits, batch["labels"], suffix).tolist()
            hits = greedy_hits(logits, batch["labels"]).tolist()
            for k, (fact, kind, _, _) in enumerate(part):
                readings.append(Reading(fact.id, kind, scores[2 * k], scores[2 * k + 1], hits[2 * k + 1]))
            advance(len(part))
    return readings
