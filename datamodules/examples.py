"""Edit instances with their audio decoded, as prompts the LALM adapter batches."""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

from common.prompt import Prompt
from common.requests import EditRequest
from datamodules.audio_io import AudioResolver
from datamodules.schema import EditInstance, Query


class PromptMaker:
    """Queries as model prompts, each clip decoded once (an LRU of `cache_size` clips). A
    clip's digest (its file's bytes and the rate it is decoded at) is what caches of model
    answers are keyed by: a re-encoded or rebuilt clip is another input."""

    def __init__(self, resolver: AudioResolver, rate: int = 16000, cache_size: int = 512) -> None:
        self.resolver, self.rate, self.cache_size = resolver, rate, cache_size
        self._clips: OrderedDict[tuple[str, str | None], np.ndarray] = OrderedDict()
        self._digests: dict[tuple[str, str | None], str] = {}

    def audio(self, file: str, track: str | None) -> np.ndarray:
        """The clip's samples at the model's rate."""
        key = (file, track)
        if key in self._clips:
            self._clips.move_to_end(key)
        else:
            self._clips[key] = self.resolver.load(file, track, self.rate)
            if len(self._clips) > self.cache_size:
                self._clips.popitem(last=False)
        return self._clips[key]

    def __call__(self, q: Query) -> Prompt:
        return Prompt(q.question, audio=self.audio(q.file, q.track) if q.file else None)

    def audio_digest(self, q: Query) -> str | None:
        """sha256 of the query's audio file and the decoding rate (None for a text question)."""
        if q.file is None:
            return None
        key = (q.file, q.track)
        if key not in self._digests:
            h = hashlib.sha256(self.resolver.path(q.file, q.track).read_bytes())
            h.update(f"@{self.rate}".encode())
            self._digests[key] = h.hexdigest()
        return self._digests[key]


class PromptBatches:
    """For DataModules whose batches hold `Prompt`s with numpy audio: the LALM adapter encodes
    them and moves the tensors to the model's device itself, so Lightning's batch transfer
    leaves them as they are."""

    def transfer_batch_to_device(self, batch: Any, device: Any, dataloader_idx: int) -> Any:
        return batch


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
        )


def to_example(inst: EditInstance, resolver: AudioResolver, rate: int = 16000) -> EditExample:
    """Decode every clip an instance references (each file once) into prompts."""
    prompt = PromptMaker(resolver, rate)

    def labelled(q: Query) -> LabelledPrompt:
        return LabelledPrompt(q, prompt(q), q.answer)

    return EditExample(
        instance=inst,
        edit=labelled(inst.reliability),
        generality=tuple(labelled(q) for q in inst.generality),
        locality=tuple(labelled(q) for q in (*inst.audio_locality, *inst.text_locality)),
        portability=tuple(labelled(q) for q in inst.portability),
    )
