"""The unedited model's accuracy on a SAKE-format test split, per attribute and per query kind.

Before an edit, the right answer to a reliability or generality query is the *original* label
(the record's `answer` is the edit target), to an audio-locality query its own answer, and to a
portability query the original label's fact (from the world's knowledge base, when given).
Responses are greedy and scored by exact option match.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from rich.progress import Progress

from datamodules.audio_io import AudioResolver
from datamodules.loader import SakeData
from datamodules.schema import EditInstance, Query, attribute_of
from evaluation.exact import exact_match
from lalms.base import LALM
from lalms.prompt import Prompt

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
) -> dict[str, Any]:
    """Accuracy per kind ({kind: {"accuracy", "n"}}) plus the attribute average."""
    todo = probes(items, world)
    cache: dict[tuple[str, str | None], np.ndarray] = {}

    def prompt(p: Probe) -> Prompt:
        if p.file is None:
            return Prompt(p.question)
        key = (p.file, p.track)
        if key not in cache:
            cache[key] = resolver.load(p.file, p.track, lalm.sampling_rate)
        return Prompt(p.question, audio=cache[key])

    correct: dict[str, list[bool]] = defaultdict(list)
    with Progress() as progress:
        bar = progress.add_task(f"base accuracy ({len(todo)} distinct queries)", total=len(todo))
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            responses = lalm.generate([prompt(p) for p in chunk], max_new_tokens)
            for p, r in zip(chunk, responses, strict=True):
                for kind in p.kinds:
                    correct[kind].append(exact_match(r, p.truth))
            progress.advance(bar, len(chunk))
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
    lalm: LALM, datamodule: Any, out_dir: str, limit: int | None = None, batch_size: int = 64
) -> dict[str, Any]:
    """Base accuracy on a SakeDataModule's test split; writes metrics.json and report.md to out_dir."""
    data = SakeData.load(datamodule.root)
    items = data.test[:limit] if limit else data.test
    if not items:
        raise FileNotFoundError(f"{data.root}: no single-editing test split")
    world_file = Path(datamodule.root) / "world.yaml"
    world = yaml.safe_load(world_file.read_text(encoding="utf-8")) if world_file.is_file() else None
    metrics = base_accuracy(lalm, items, AudioResolver(datamodule.audio_root), world, batch_size)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1), encoding="utf-8")
    text = report(metrics, f"Unedited model on {datamodule.name} test ({len(items)} instances)")
    (out / "report.md").write_text(text, encoding="utf-8")
    log.info("\n%s", text)
    return metrics
