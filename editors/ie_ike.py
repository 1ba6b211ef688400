"""IE-IKE: the I-IKE instruction plus demonstrations, as earlier turns of the dialogue.

The demonstrations come from the train split (common.TrainPool), from an edit with the same
(original, target) pair as the request (else one with the same original label, whose clips are
then also heard as the target): its reliability question answered with the target, its
generality questions (3) answered with the target, its audio-locality questions (4; 3 for
gender) and its text-locality question (1) answered with their own answers, each with its
audio. Sequential edits add their demonstrations after the earlier edits'; `max_history` keeps
the most recent turns so that long sequences fit the model's context.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

from common import Demonstration, EditRequest, TrainPool
from common.prompt import Turn
from editors.base import ContextHandle
from editors.i_ike import IIKE, IIKEHParams
from lalms.base import LALM

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IEIKEHParams(IIKEHParams):
    max_history: int | None  # the most recent demonstration turns kept; None: all


class IEIKE(IIKE):
    HParams = IEIKEHParams

    def __init__(self, lalm: LALM, hp: IEIKEHParams, pool: TrainPool) -> None:
        super().__init__(lalm, hp, pool)
        self.pool = pool
        self._demos: dict[tuple[str, str, str], tuple[Turn, ...]] = {}

    def source(self, request: EditRequest) -> Demonstration:
        """The train edit that demonstrates `request`: one of the same pair, else of the same
        original label."""
        demo = self.pool.demonstration(request.attribute, request.original, request.target)
        if demo is not None:
            return demo
        demo = self.pool.demonstration(request.attribute, request.original)
        if demo is None:
            raise LookupError(
                f"the train split has no {request.attribute} edit with original label "
                f"{request.original!r} to demonstrate the edit with"
            )
        log.info("IE-IKE: no train edit %s -> %s; demonstrating with %s -> %s",
                 request.original, request.target, demo.original, demo.target)  # fmt: skip
        return demo

    def demonstrations(self, request: EditRequest) -> tuple[Turn, ...]:
        key = (request.attribute, request.original.strip().casefold(), request.target.strip().casefold())
        if key not in self._demos:
            demo = self.source(request)
            turns = [Turn(p.question, p.audio, request.target) for p in (demo.edit, *demo.generality)]
            turns += [Turn(p.question, p.audio, answer) for p, answer in demo.locality]
            self._demos[key] = tuple(turns)
        return self._demos[key]

    def apply(self, request: EditRequest) -> ContextHandle:
        text, demos = self.instruction(request), self.demonstrations(request)
        limit = self.hp.max_history

        def rewrite(p):
            history = (*p.history, *demos)
            if limit is not None:
                history = history[-limit:]
            return replace(p, system=self.system(p, text), history=history)

        return ContextHandle(rewrite)
