"""Examples from the train split, as editors use them (built once by the entry point from the data
config and handed to every editor: datamodules/pool.py implements it for SAKE-format data)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from common.prompt import Prompt


@dataclass(frozen=True)
class Demonstration:
    """A train edit shown to the model as earlier turns (IE-IKE): its edit question, its
    generality questions (both to be answered with the edit's target) and its locality
    questions with their own answers. `original` and `target` are the train edit's labels."""

    original: str
    target: str
    edit: Prompt
    generality: tuple[Prompt, ...]
    locality: tuple[tuple[Prompt, str], ...]  # audio-locality questions, then one text question


class TrainPool(Protocol):
    """The train split's questions as prompts, audio decoded at the model's sampling rate."""

    def preservation(self, n_text: int, n_audio: int) -> list[Prompt]:
        """The first `n_text` distinct text-QA and `n_audio` distinct audio questions among the
        locality questions (text first): inputs whose answers an edit should not move."""
        ...

    def label_questions(self, attribute: str, label: str, count: int, seed: int) -> list[Prompt]:
        """Up to `count` audio questions (edit and generality) about clips whose `attribute` is
        `label`, sampled with `seed`."""
        ...

    def demonstration(self, attribute: str, original: str, target: str | None = None) -> Demonstration | None:
        """The first train edit of `attribute` from `original` (to `target`, when given)."""
        ...
