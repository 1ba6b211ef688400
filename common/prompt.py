"""What an LALM is asked: a question, optional audio, optional system prompt and prior turns."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Turn:
    """One user turn and, for prior turns, the assistant's answer to it."""

    question: str
    audio: np.ndarray | None = None
    answer: str | None = None
    sampling_rate: int | None = None  # None: already at the model's rate


@dataclass(frozen=True)
class Prompt:
    """A chat prompt: the current question (with its audio) after optional prior turns.

    `history` turns must carry answers; they are rendered as earlier user/assistant exchanges,
    each with its own audio (used for in-context demonstrations).
    """

    question: str
    audio: np.ndarray | None = None
    system: str | None = None
    history: tuple[Turn, ...] = field(default_factory=tuple)
    sampling_rate: int | None = None

    @property
    def turns(self) -> tuple[Turn, ...]:
        return (*self.history, Turn(self.question, self.audio, None, self.sampling_rate))
