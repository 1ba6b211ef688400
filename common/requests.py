"""What an editor is asked to do."""

from __future__ import annotations

from dataclasses import dataclass

from common.prompt import Prompt


@dataclass(frozen=True)
class EditRequest:
    """One edit: `prompt` (audio + question) should now be answered with `target`.

    `span`: (start, end) in seconds of the part of the prompt's clip the edit is about (a spoken
    fact's subject word); the locate-then-edit editors read their keys there with `position:
    span` (editors/locate.py). None for SAKE's attribute edits, which are about the whole clip."""

    prompt: Prompt
    target: str
    original: str  # the label the model should stop perceiving, e.g. "frog"; a fact's true object
    attribute: str  # gender, emotion, language or animal; a spoken fact's relation
    span: tuple[float, float] | None = None
