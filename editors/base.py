"""The Editor protocol every method in editors/ follows, and exact weight restoration.

An editor changes how a model perceives one attribute label for one request and returns a
handle; `handle.undo()` restores the model exactly (bitwise for weights). Sequential editing
applies several requests and undoes the handles in reverse order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from lalms.prompt import Prompt


@dataclass(frozen=True)
class EditRequest:
    """One edit: `prompt` (audio + question) should now be answered with `target`."""

    prompt: Prompt
    target: str
    original: str  # the label the model should stop perceiving, e.g. "frog"
    attribute: str  # gender, emotion, language or animal
    # Equivalent and unrelated queries some editors train on (generality, locality).
    equivalents: tuple[Prompt, ...] = field(default_factory=tuple)
    unrelated: tuple[Prompt, ...] = field(default_factory=tuple)


@runtime_checkable
class EditHandle(Protocol):
    def undo(self) -> None:
        """Restore the model exactly as it was before the edit."""


@runtime_checkable
class Editor(Protocol):
    def apply(self, request: EditRequest) -> EditHandle:
        """Change the model's behaviour for `request` (weights, hooks or prompt context)."""


class WeightSnapshot:
    """Copies of the named parameters an edit is about to touch; `undo` writes them back bitwise.

    Only the touched parameters are copied, so an edit of three MLP projections costs three
    tensors of memory, not a model.
    """

    def __init__(self, model: nn.Module, names: Iterable[str]) -> None:
        params = dict(model.named_parameters())
        missing = [n for n in names if n not in params]
        if missing:
            raise KeyError(f"model has no parameters {missing}")
        self._params = {n: params[n] for n in names}
        self._saved = {n: p.detach().clone() for n, p in self._params.items()}
        self._done = False

    @property
    def names(self) -> list[str]:
        return list(self._params)

    @torch.no_grad()
    def undo(self) -> None:
        if self._done:
            raise RuntimeError("this edit was already undone")
        for name, p in self._params.items():
            p.copy_(self._saved[name])
        self._done = True


class ContextEdit:
    """The handle of an editor that edits through the prompt (in-context editing).

    The model is untouched; `rewrite` puts the edit into every prompt the edited model is asked
    (the sweeps pass each prompt through the rewrites of all edits applied, oldest first), and
    `undo` ends that.
    """

    def __init__(self, rewrite: Callable[[Prompt], Prompt]) -> None:
        self._rewrite = rewrite
        self._done = False

    def rewrite(self, prompt: Prompt) -> Prompt:
        if self._done:
            raise RuntimeError("this edit was undone")
        return self._rewrite(prompt)

    def undo(self) -> None:
        if self._done:
            raise RuntimeError("this edit was already undone")
        self._done = True


def in_context(handles: Iterable[EditHandle], prompt: Prompt) -> Prompt:
    """`prompt` as the model edited by `handles` is asked it (only context edits change it)."""
    for handle in handles:
        if isinstance(handle, ContextEdit):
            prompt = handle.rewrite(prompt)
    return prompt
