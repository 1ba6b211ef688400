"""Hooks on the model's modules, the one place they are registered.

- `hooked(module, fn)`: one hook for the length of a block.
- `hooked_all(hooks)`: several `Hook`s (forward or pre, on any modules) for the length of a block,
  as one trace; a hook marked `stop=True` ends the forward once it has run (what is above it is
  not needed), and the block goes on after the forward's call.
- `Trace(module)`: the input and output hidden states of one module's call, optionally edited.
- `Hooks`: hooks that outlive a block (an editor's steering or routing, row-wise edits), held
  until `remove()`.

Every hook a block adds is removed when it ends, also when the forward raises.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lalms.base import hidden, with_hidden


class Hooks:
    """Hooks held until `remove()` (e.g. an editor's, while its edits are in effect).

        self.hooks = Hooks().add(layer, steer).add(embeddings, keep, pre=True)
        ...
        self.hooks.remove()

    Its length is the number of hooks it holds (falsy when none)."""

    def __init__(self) -> None:
        self._handles: list = []

    def add(self, module: nn.Module, fn: Callable, *, pre: bool = False, with_kwargs: bool = False) -> Hooks:
        """`fn` as a forward hook of `module` (a pre-hook with `pre=True`; `with_kwargs` as torch's)."""
        if pre:
            handle = module.register_forward_pre_hook(fn, with_kwargs=with_kwargs)
        else:
            handle = module.register_forward_hook(fn, with_kwargs=with_kwargs)
        self._handles.append(handle)
        return self

    def remove(self) -> None:
        """Remove every hook added (the model is as it was before them)."""
        while self._handles:
            self._handles.pop().remove()

    def __len__(self) -> int:
        return len(self._handles)


@contextmanager
def hooked(
    module: nn.Module, fn: Callable, *, pre: bool = False, with_kwargs: bool = False
) -> Iterator[None]:
    """`fn` is a forward hook of `module` (a pre-hook with `pre=True`) inside the block."""
    hooks = Hooks().add(module, fn, pre=pre, with_kwargs=with_kwargs)
    try:
        yield
    finally:
        hooks.remove()


@dataclass(frozen=True)
class Hook:
    """One hook of a `hooked_all` block: `fn` as a forward hook of `module` (a pre-hook with
    `pre=True`; `with_kwargs` as torch's). With `stop=True` the forward ends once `fn` has run
    (a pre-hook's module does not run): nothing after this module is computed."""

    module: nn.Module
    fn: Callable
    pre: bool = False
    with_kwargs: bool = False
    stop: bool = False


class _Stop(Exception):
    """Raised after a stop hook ran; only the block that raised it swallows it."""

    def __init__(self, block: object) -> None:
        super().__init__("the forward was stopped by a hooked_all stop hook")
        self.block = block


@contextmanager
def hooked_all(hooks: Iterable[Hook]) -> Iterator[None]:
    """Every hook of `hooks` in effect inside the block, all removed when it ends (also when the
    forward raises). A forward stopped by a `stop=True` hook ends there, without an error: the
    block goes on after the call.

        kept = {}
        with hooked_all([Hook(block, record, pre=True, with_kwargs=True),
                         Hook(block, lambda m, a, out: kept.update(out=out), stop=True)]):
            model(**batch)  # ends after `block`
    """
    block = object()

    def stopping(fn: Callable) -> Callable:
        def hook(*args: Any) -> None:
            fn(*args)
            raise _Stop(block)

        return hook

    held = Hooks()
    try:
        for h in hooks:
            held.add(h.module, stopping(h.fn) if h.stop else h.fn, pre=h.pre, with_kwargs=h.with_kwargs)
        yield
    except _Stop as stop:
        if stop.block is not block:  # an enclosing block's stop
            raise
    finally:
        held.remove()


class Trace:
    """Inside the block, keeps the input (first positional argument) and output hidden states of
    the module's last call, detached unless `detach=False`; `edit(states) -> states` replaces the
    output's hidden states on every call.

        with Trace(lalm.model.get_submodule(path)) as t:
            lalm.logits(batch)
        t.input, t.output
    """

    def __init__(
        self,
        module: nn.Module,
        edit: Callable[[torch.Tensor], torch.Tensor] | None = None,
        detach: bool = True,
    ) -> None:
        self.module, self.edit, self.detach = module, edit, detach
        self.input: torch.Tensor | None = None
        self.output: torch.Tensor | None = None
        self._hooks = Hooks()

    def _hook(self, module: nn.Module, args: tuple, out: Any) -> Any:
        x, h = args[0], hidden(out)
        self.input = x.detach() if self.detach else x
        if self.edit is not None:
            h = self.edit(h)
            out = with_hidden(out, h)
        self.output = h.detach() if self.detach else h
        return out

    def __enter__(self) -> Trace:
        self._hooks.add(self.module, self._hook)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._hooks.remove()
