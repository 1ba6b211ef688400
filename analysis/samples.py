"""The probing samples of the analyses: test instances' reliability questions with their audio,
or spoken facts' prompts with their subject span and anchor words."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field

from common.prompt import Prompt
from datamodules.audio_io import AudioResolver
from datamodules.examples import PromptMaker
from datamodules.schema import EditInstance
from datamodules.spoken_facts import ANCHORS, SpokenFact, SpokenFactsData


@dataclass(frozen=True)
class Sample:
    instance: EditInstance
    prompt: Prompt  # the reliability question with its clip
    truth: str  # the clip's label (the instance's original)


def reliability_samples(
    instances: list[EditInstance], audio_root, rate: int, per_attribute: int
) -> list[Sample]:
    """The first `per_attribute` instances of each attribute (in the given order), as samples."""
    prompt, taken, out = PromptMaker(AudioResolver(audio_root), rate), defaultdict(int), []
    for inst in instances:
        if taken[inst.attribute] >= per_attribute:
            continue
        out.append(Sample(inst, prompt(inst.reliability), inst.original))
        taken[inst.attribute] += 1
    return out


@dataclass(frozen=True)
class FactSample:
    fact: SpokenFact
    prompt: Prompt  # the instruction with the spoken prompt
    truth: str  # the fact's object
    span: tuple[float, float]  # the subject's words, seconds into the clip
    words: Mapping[str, tuple[float, float]] = field(default_factory=dict)  # anchor -> (start, end)


def fact_samples(
    data: SpokenFactsData, rate: int, per_relation: int, split: str = "test"
) -> list[FactSample]:
    """The first `per_relation` facts of each relation, their edit prompts as samples."""
    taken, out = defaultdict(int), []
    for fact in data.facts(split):
        if taken[fact.relation] >= per_relation:
            continue
        p = fact.prompt
        words = {a: (p.anchor(a).start, p.anchor(a).end) for a in ANCHORS}
        out.append(FactSample(fact, data.prompt(p, rate), fact.object, p.subject_span, words))
        taken[fact.relation] += 1
    return out
