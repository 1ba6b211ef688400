"""The unedited model's accuracy on a SAKE-format test split, per attribute and per query kind.

Before an edit, the right answer to a reliability or generality query is the *original* label
(the record's `answer` is the edit target), to an audio-locality query its own answer, and to a
portability query the original label's fact (from the world's knowledge base, when given).
Responses are greedy and judged like the sweeps' (default: the offline rule judge).
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning.fabric import Fabric

from common.files import write_atomic
from datamodules.audio_io import AudioResolver
from datamodules.examples import PromptMaker
from datamodules.options import parse_options
from datamodules.schema import EditInstance, Query, attribute_of
from evaluation.judges import CorrectnessCase, Judge
from evaluation.judges.rule import RuleJudge
from evaluation.responses import QueryKeys, ResponseCache, pre_edit_responses
from evaluation.run import claimed, describe
from evaluation.sweep import Generation
from lalms.base import LALM

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Probe:
    """A distinct (audio, question) with the unedited model's right answer."""

    file: str | None
    track: str | None
    question: str
    truth: str
    kinds: tuple[str, ...]  # e.g. ("reliability", "attribute/animal")


def probes(items: Sequence[EditInstance], world: Mapping[str, Any] | None = None) -> list[Probe]:
    """Distinct probes of the items; identical (audio, question) pairs are asked once."""
    found: dict[tuple, tuple[str, set[str]]] = {}

    def add(q: Query, truth: str, *kinds: str) -> None:
        key = (q.file, q.track, q.question)
        found.setdefault(key, (truth, set()))[1].update(kinds)

    for inst in items:
        attr = f"attribute/{inst.attribute}"
        add(inst.reliability, inst.original, "reliability", attr)
        for q in inst.generality:
            add(q, inst.original, q.name, attr)
        for q in inst.audio_locality:
            qa = attribute_of(q.track or "")
            add(q, q.answer, q.name, f"attribute/{qa}" if qa else "general_audio")
        for q in inst.text_locality:
            add(q, q.answer, "text_qa")
        for q in inst.portability:
            facts = (
                (world or {}).get("knowledge", {}).get(inst.attribute, {}).get(q.category or "") or {}
            ).get("facts")
            if facts and inst.original in facts:
                add(q, facts[inst.original], "portability", f"portability/{inst.attribute}")
    return [Probe(f, t, q, truth, tuple(sorted(kinds))) for (f, t, q), (truth, kinds) in found.items()]


def base_accuracy(
    lalm: LALM,
    items: Sequence[EditInstance],
    resolver: AudioResolver,
    world: Mapping[str, Any] | None = None,
    batch_size: int = 64,
    max_new_tokens: int = 16,
    judge: Judge | None = None,
    cache: ResponseCache | None = None,
) -> dict[str, Any]:
    """Accuracy per kind ({kind: {"accuracy": 0-1, "n"}}) plus the attribute average.

    Responses come from `cache` when it holds them (the sweeps' pre-edit answers are the same
    responses) and are judged by `judge` (default: the offline rule judge)."""
    todo = probes(items, world)
    judge = judge or RuleJudge()
    cache = cache or ResponseCache(None, lalm.answers_fingerprint())
    queries = [Query(p.kinds[0], p.question, p.truth, (), p.file, p.track) for p in todo]
    prompt = PromptMaker(resolver, lalm.sampling_rate)
    key = QueryKeys(prompt, lalm.render, max_new_tokens)
    have = pre_edit_responses(
        queries, cache, lambda prompts: lalm.generate(prompts, max_new_tokens), prompt, key, batch_size
    )
    keys = [key(q) for q in queries]
    cases = [
        CorrectnessCase(p.question, parse_options(p.question), p.truth, have[k])
        for k, p in zip(keys, todo, strict=True)
    ]
    correct: dict[str, list[bool]] = defaultdict(list)
    for p, j in zip(todo, judge.correctness(cases), strict=True):
        for kind in p.kinds:
            correct[kind].append(bool(j.verdict))
    out = {k: {"accuracy": sum(v) / len(v), "n": len(v)} for k, v in sorted(correct.items())}
    attrs = [v for k, v in out.items() if k.startswith("attribute/")]
    if attrs:  # the mean over attributes (each attribute weighs the same)
        mean = sum(v["accuracy"] for v in attrs) / len(attrs)
        out["attribute/average"] = {"accuracy": mean, "n": sum(v["n"] for v in attrs)}
    return out


def report(metrics: Mapping[str, Mapping[str, float]], title: str) -> str:
    lines = [f"# {title}", "", "| query kind | accuracy | n |", "| --- | ---: | ---: |"]
    lines += [f"| {k} | {v['accuracy']:.1%} | {v['n']} |" for k, v in metrics.items()]
    return "\n".join(lines) + "\n"


def run(
    fabric: Fabric,
    lalm: LALM,
    datamodule: Any,
    out_dir: str | Path,
    judge: Judge,
    cache: ResponseCache,
    generation: Generation,
    split: str,
    identity: Mapping[str, Any],
) -> dict[str, Any] | None:
    """The unedited model on a SakeDataModule's split; writes metrics.json and report.md.

    The run folder is held and identified like a sweep's (`run.claimed`: run.json, the lock, a
    refusal on every rank); the accuracy is one batched pass over distinct queries, made by
    rank 0 (the other ranks return None)."""
    out = Path(out_dir)
    with claimed(fabric, out, identity):
        if fabric.global_rank != 0:
            return None
        items = datamodule.eval_instances(split)
        accuracy = base_accuracy(
            lalm, items, AudioResolver(datamodule.audio_root), datamodule.world(), generation.batch_size,
            generation.max_new_tokens, judge, cache,
        )  # fmt: skip
        metrics = {
            "base": {
                k: {"accuracy": round(100 * v["accuracy"], 4), "n": v["n"]} for k, v in accuracy.items()
            },
            "run": describe(identity),
            "identity": dict(identity),
        }
        write_atomic(out / "metrics.json", json.dumps(metrics, indent=1))
        text = report(accuracy, f"Unedited {lalm.name} on {datamodule.name} {split} ({len(items)} instances)")
        write_atomic(out / "report.md", text)
        log.info("\n%s", text)
        return metrics
