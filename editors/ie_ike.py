"""IE-IKE: the I-IKE instruction plus demonstrations, as earlier turns of the dialogue.

The demonstrations come from the train split, from an instance with the same (original,
target) pair as the edit (else one with the same original label, whose clips are then also
heard as the target): its
reliability query answered with the target, its generality queries (3) answered with the
target, its audio-locality queries (4; 3 for gender) and its text-locality query (1) answered
with their own answers, each with its audio. Sequential edits add their demonstrations after
the earlier edits'; `max_history` keeps the most recent turns so that long sequences fit the
model's context.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

from datamodules.audio_io import AudioResolver
from datamodules.loader import SakeData
from datamodules.schema import EditInstance, Query, norm_label
from editors.base import ContextEdit, EditRequest
from editors.ike import DEFAULT_INSTRUCTION, InstructionIKE
from lalms.base import LALM
from lalms.prompt import Turn

log = logging.getLogger(__name__)


class DemonstrationIKE(InstructionIKE):
    def __init__(
        self,
        lalm: LALM,
        train_root: str,
        audio_root: str | None = None,
        instruction: str = DEFAULT_INSTRUCTION,
        what: Mapping[str, str] | None = None,
        base_system: str | None = "You are a helpful assistant.",
        max_history: int | None = 10,
    ) -> None:
        super().__init__(lalm, instruction, what, base_system)
        self.train = SakeData.load(train_root).train
        if not self.train:
            raise FileNotFoundError(f"{train_root}: no train split to draw demonstrations from")
        self.resolver = AudioResolver(audio_root or Path(train_root) / "audio")
        self.max_history = max_history
        self._demos: dict[tuple[str, str, str], tuple[Turn, ...]] = {}

    def source(self, request: EditRequest) -> EditInstance:
        """The train instance whose queries demonstrate this edit."""
        orig, target = norm_label(request.original), norm_label(request.target)
        same_attr = [i for i in self.train if i.attribute == request.attribute]
        for match in (
            lambda i: norm_label(i.original) == orig and norm_label(i.target) == target,
            lambda i: norm_label(i.original) == orig,
        ):
            found = [i for i in same_attr if match(i)]
            if found:
                return found[0]
        raise LookupError(
            f"the train split has no {request.attribute} instance with original label {request.original!r} "
            "to demonstrate the edit with"
        )

    def demonstrations(self, request: EditRequest) -> tuple[Turn, ...]:
        key = (request.attribute, norm_label(request.original), norm_label(request.target))
        if key not in self._demos:
            inst = self.source(request)
            if (norm_label(inst.original), norm_label(inst.target)) != key[1:]:
                log.info("IE-IKE: no train instance edits %s -> %s; demonstrating with %s -> %s",
                         request.original, request.target, inst.original, inst.target)  # fmt: skip

            def turn(q: Query, answer: str) -> Turn:
                audio = self.resolver.load(q.file, q.track, self.lalm.sampling_rate) if q.file else None
                return Turn(q.question, audio, answer)

            turns = [turn(inst.reliability, request.target)]
            turns += [turn(q, request.target) for q in inst.generality]
            turns += [turn(q, q.answer) for q in (*inst.audio_locality, *inst.text_locality[:1])]
            self._demos[key] = tuple(turns)
        return self._demos[key]

    def apply(self, request: EditRequest) -> ContextEdit:
        text, demos = self.instruction(request), self.demonstrations(request)

        def rewrite(p):
            history = (*p.history, *demos)
            if self.max_history is not None:
                history = history[-self.max_history :]
            return replace(p, system=self.system(p, text), history=history)

        return ContextEdit(rewrite)
