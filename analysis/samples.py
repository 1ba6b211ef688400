"""The probing samples of the analyses: test instances' reliability questions with their audio."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from common.prompt import Prompt
from datamodules.audio_io import AudioResolver
from datamodules.examples import PromptMaker
from datamodules.schema import EditInstance


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
