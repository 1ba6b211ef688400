"""The shape every method in editors/ has, and exact restoration.

An editor is built as `Method(lalm, hp, pool)`: the model, its hyperparameters (a frozen
dataclass `Method.HParams`, filled from the editor's YAML: common/hparams.py) and the train
split's examples (common.TrainPool; methods that need none ignore it). It changes how the
model perceives one attribute label for one request and returns a handle; `handle.undo()`
restores the model exactly (bitwise for weights). Sequential editing applies several requests
and undoes the handles in reverse order.

The model is frozen (lalms/base.py): a method trains its own copies of what it changes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from common import EditRequest, TrainPool
from lalms.base import LALM
from lalms.prompt import Prompt


@runtime_checkable
class EditHandle(Protocol):
    def undo(self) -> None:
        """Restore the model exactly as it was before the edit."""


@runtime_checkable
class Editor(Protocol):
    HParams: type

    def __init__(self, lalm: LALM, hp: object, pool: TrainPool) -> None: ...

    def apply(self, request: EditRequest) -> EditHandle:
        """Change the model's behaviour for `request` (weights, hooks or prompt context)."""


@dataclass(frozen=True)
class Preservation:
    """How many of the train split's questions an edit must leave alone (TrainPool.preservation)."""

    text: int
    audio: int


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


class ContextHandle:
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
        if isinstance(handle, ContextHandle):
            prompt = handle.rewrite(prompt)
    return prompt
