"""What an editor is asked to do."""

from __future__ import annotations

from dataclasses import dataclass

from common.prompt import Prompt


@dataclass(frozen=True)
class EditRequest:
    """One edit: `prompt` (audio + question) should now be answered with `target`."""

    prompt: Prompt
    target: str
    original: str  # the label the model should stop perceiving, e.g. "frog"
    attribute: str  # gender, emotion, language or animal
