"""Hooking a module for the length of a block: run a forward, read or change what passed through,
and leave no hook behind (also when the forward raises)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from lalms.base import hidden, with_hidden


@contextmanager
def hooked(
    module: nn.Module, fn: Callable, *, pre: bool = False, with_kwargs: bool = False
) -> Iterator[None]:
    """`fn` is a forward hook of `module` (a pre-hook with `pre=True`) inside the block."""
    if pre:
        handle = module.register_forward_pre_hook(fn, with_kwargs=with_kwargs)
    else:
        handle = module.register_forward_hook(fn, with_kwargs=with_kwargs)
    try:
        yield
    finally:
        handle.remove()


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
        self._handle = None

    def _hook(self, module: nn.Module, args: tuple, out: Any) -> Any:
        x, h = args[0], hidden(out)
        self.input = x.detach() if self.detach else x
        if self.edit is not None:
            h = self.edit(h)
            out = with_hidden(out, h)
        self.output = h.detach() if self.detach else h
        return out

    def __enter__(self) -> Trace:
        self._handle = self.module.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._handle.remove()
