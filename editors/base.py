"""The shape every method in editors/ has, and exact restoration.

An editor is built as `Method(lalm, hp, pool)`: the model, its hyperparameters (a frozen
dataclass `Method.HParams`, filled from the editor's YAML: common/hparams.py) and the train
split's examples (common.TrainPool; methods that need none ignore it). It changes how the
model perceives one attribute label for one request and returns a handle; `handle.undo()`
restores the model exactly (bitwise for weights). Sequential editing applies several requests
and undoes the handles in reverse order.

The model is frozen (lalms/base.py): a method trains its own copies of what it changes.

An editor may also have the capability `apply_rows(requests) -> BatchEdit`: the K requests
applied at once, each to its own rows of the batches run inside `BatchEdit.rows(prompts,
groups)` (lalms/rows.py), the model itself untouched; `BatchEdit.add(requests)` adds one more
edit to each group (sequential sweeps, side by side). The sweeps evaluate K edits in one
batched generation with it (`evaluate.py edits_per_batch=K`); an editor without it is evaluated
one edit at a time. `dense_rows` and `context_rows` give the capability to the editors that
write whole tensors in place and to the in-context editors.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from common import EditRequest, TrainPool
from common.prompt import Prompt
from lalms.base import LALM
from lalms.rows import UNEDITED, RowEdits


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


# ---------------------------------------------------------------------- several edits at once
# What an editor does to add one edit to each of some groups: (edits, [(group, request), ...]),
# with `edits` the batch's RowEdits (each group's earlier edits are in it; `edits.only(group)`
# runs the model as they left it).
AddEdits = Callable[[RowEdits, Sequence[tuple[int, EditRequest]]], None]


class BatchEdit:
    """K groups of edits on one model, each seen by its own rows only (Editor.apply_rows).

    Group g starts as the unedited model and gains one edit per `add`; inside `rows(prompts,
    groups)` row i runs as group groups[i] left the model (-1: unedited), and the prompts to
    generate from are yielded (in-context editors rewrite them per row). `undo` removes
    everything: nothing was written to the model.
    """

    def __init__(
        self,
        lalm: LALM,
        n_groups: int,
        add: AddEdits,
        rewrite: Callable[[int, Prompt], Prompt] | None = None,
        finish: Callable[[], None] | None = None,
    ) -> None:
        self.lalm, self.n_groups = lalm, n_groups
        self.edits = RowEdits(lalm.model, lalm.edit_sites, n_groups)
        self._add, self._rewrite, self._finish = add, rewrite, finish
        self.counts = [0] * n_groups  # edits per group
        self._done = False

    def add(self, requests: Sequence[EditRequest | None]) -> None:
        """One more edit for each group (None: that group takes none this time)."""
        if self._done:
            raise RuntimeError("this batch of edits was undone")
        if len(requests) != self.n_groups:
            raise ValueError(f"{len(requests)} requests for {self.n_groups} groups")
        pairs = [(g, r) for g, r in enumerate(requests) if r is not None]
        self._add(self.edits, pairs)
        for g, _ in pairs:
            self.counts[g] += 1

    @contextmanager
    def rows(self, prompts: Sequence[Prompt], groups: Sequence[int]) -> Iterator[list[Prompt]]:
        """Within the block, row i of a batch of the yielded prompts runs as edited by group
        groups[i]; the yielded prompts are `prompts` as each row's edits have them asked."""
        if self._done:
            raise RuntimeError("this batch of edits was undone")
        asked = [
            p if self._rewrite is None or g == UNEDITED else self._rewrite(g, p)
            for p, g in zip(prompts, groups, strict=True)
        ]
        with self.edits.rows(asked, groups):
            yield asked

    def undo(self) -> None:
        if self._done:
            raise RuntimeError("this batch of edits was already undone")
        self.edits.remove()
        if self._finish is not None:
            self._finish()
        self._done = True


def module_values(model: nn.Module, names: Sequence[str]) -> dict[str, dict[str, torch.Tensor]]:
    """The current values of parameters `names`, grouped by their leaf module's path."""
    params = dict(model.named_parameters())
    out: dict[str, dict[str, torch.Tensor]] = {}
    for name in names:
        path, _, leaf = name.rpartition(".")
        out.setdefault(path, {})[leaf] = params[name].detach().clone()
    return out


def dense_rows(editor: Editor, lalm: LALM, requests: Sequence[EditRequest]) -> BatchEdit:
    """`apply_rows` for an editor whose `apply` writes whole tensors in place behind a
    `WeightSnapshot` (fine-tuning, UnKE): each edit is computed by `apply` on the model as its
    group left it (the group's tensors written in place for the while, then restored bitwise),
    its tensors kept as a per-group copy (only the touched ones) and the model restored. The
    rows of group g run the touched leaf modules with group g's copies."""
    state: list[dict[str, dict[str, torch.Tensor]] | None] = [None] * len(requests)
    hooked: set[str] = set()

    def add(edits: RowEdits, pairs: Sequence[tuple[int, EditRequest]]) -> None:
        for g, request in pairs:
            add_one(edits, g, request)

    def add_one(edits: RowEdits, g: int, request: EditRequest) -> None:
        before = state[g]
        written = WeightSnapshot(lalm.model, [f"{p}.{n}" for p, vs in (before or {}).items() for n in vs])
        try:
            with torch.no_grad():
                params = dict(lalm.model.named_parameters())
                for path, values in (before or {}).items():
                    for name, value in values.items():
                        params[f"{path}.{name}"].copy_(value)
            with edits.only(UNEDITED):  # the group's state is in place: no row-wise change on top
                snapshot = editor.apply(request)
            try:
                state[g] = module_values(lalm.model, snapshot.names)
            finally:
                snapshot.undo()
        finally:
            written.undo()
        for path in state[g]:
            if path not in hooked:
                hooked.add(path)
                edits.tensors(path, _GroupValues(state, path))

    batch = BatchEdit(lalm, len(requests), add)
    batch.add(requests)
    return batch


class _GroupValues(Sequence):
    """The per-group values of one leaf module, read live from `dense_rows`'s state."""

    def __init__(self, state: list, path: str) -> None:
        self.state, self.path = state, path

    def __len__(self) -> int:
        return len(self.state)

    def __getitem__(self, g):
        values = self.state[g]
        return None if values is None else values.get(self.path)


def context_rows(editor: Editor, lalm: LALM, requests: Sequence[EditRequest]) -> BatchEdit:
    """`apply_rows` for an in-context editor (its handles are `ContextHandle`s): each row's
    prompt is rewritten by its own group's edits, oldest first; the model is untouched."""
    handles: list[list[ContextHandle]] = [[] for _ in requests]

    def add(_edits: RowEdits, pairs: Sequence[tuple[int, EditRequest]]) -> None:
        for g, request in pairs:
            handle = editor.apply(request)
            if not isinstance(handle, ContextHandle):
                raise TypeError(f"context_rows: {type(editor).__name__}.apply returned no ContextHandle")
            handles[g].append(handle)

    def finish() -> None:
        for hs in handles:
            for h in reversed(hs):
                h.undo()

    batch = BatchEdit(lalm, len(requests), add, rewrite=lambda g, p: in_context(handles[g], p), finish=finish)
    batch.add(requests)
    return batch
