"""Edit instances with their audio decoded, as prompts the LALM adapter batches."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from datamodules.audio_io import AudioResolver
from datamodules.schema import EditInstance, Query
from editors.base import EditRequest
from lalms.prompt import Prompt


@dataclass(frozen=True)
class LabelledPrompt:
    """A query as a model prompt, with its ground-truth answer."""

    query: Query
    prompt: Prompt
    answer: str


@dataclass(frozen=True)
class EditExample:
    """One edit instance ready for a model: the edit and all its evaluation queries."""

    instance: EditInstance
    edit: LabelledPrompt  # answer = the target label
    generality: tuple[LabelledPrompt, ...]  # answers = the target label
    locality: tuple[LabelledPrompt, ...]  # audio then text; answers = ground truth
    portability: tuple[LabelledPrompt, ...]

    def request(self) -> EditRequest:
        inst = self.instance
        return EditRequest(
            prompt=self.edit.prompt,
            target=inst.target,
            original=inst.original,
            attribute=inst.attribute,
            equivalents=tuple(g.prompt for g in self.generality),
            unrelated=tuple(loc.prompt for loc in self.locality),
        )


def to_example(inst: EditInstance, resolver: AudioResolver, rate: int = 16000) -> EditExample:
    """Decode every clip an instance references (each file once) into prompts."""
    cache: dict[tuple[str, str | None], np.ndarray] = {}

    def labelled(q: Query) -> LabelledPrompt:
        audio = None
        if q.file is not None:
            key = (q.file, q.track)
            if key not in cache:
                cache[key] = resolver.load(q.file, q.track, rate)
            audio = cache[key]
        return LabelledPrompt(q, Prompt(q.question, audio=audio), q.answer)

    return EditExample(
        instance=inst,
        edit=labelled(inst.reliability),
        generality=tuple(labelled(q) for q in inst.generality),
        locality=tuple(labelled(q) for q in (*inst.audio_locality, *inst.text_locality)),
        portability=tuple(labelled(q) for q in inst.portability),
    )
