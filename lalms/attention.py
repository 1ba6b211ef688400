"""Attention knockout: the last query position may not attend to chosen key positions.

`blocked_attention(lalm, layers, blocked)` blocks, inside the block, the attention edges from the
last position (the one that predicts the next token) to the key positions `blocked` marks, in
the LLM decoder layers `layers` (indices into `lalm.edit_sites.llm_layers`); every other query
position, and every other layer, attends as before (Geva et al. 2023, "Dissecting recall of
factual associations in auto-regressive language models", section 5).

It works through the adapter interface for every family: each decoder layer is called as
`layer(hidden_states, attention_mask=<4-D mask>, position_ids=..., ...)`, and a forward pre-hook
(registered through lalms/hooks.py) hands the layer a new mask with the edges removed. The mask
the model builds is shared by all its layers, so it is never changed in place. The masks a layer
may get:

- bool (B or 1, 1, Q, K), True where a query may attend (sdpa): `mask & ~block`;
- float (B or 1, 1, Q, K), added to the attention scores (eager, and sdpa where transformers
  gives it a float mask): the blocked entries are set to the dtype's minimum;
- None: transformers leaves the mask out when nothing is padded (sdpa then runs causally on its
  own); a float causal mask of the hidden states' dtype is built, and blocked (read right by
  eager and sdpa alike);
- anything else, e.g. the 2-D padding masks flash-attention layers get: a ValueError; the
  knockout needs an attention implementation with 4-D masks (`attn_implementation="sdpa"` or
  `"eager"`).

A block that would leave the last position with no key to attend to (softmax over nothing is
NaN) raises. An all-False block changes nothing: the hook leaves the call as it is.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from lalms.base import LALM
from lalms.hooks import Hook, hooked_all


def knocked_out(mask: torch.Tensor | None, blocked: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
    """A new attention mask: `mask` (what the layer was given) with the edges from the last query
    position to the keys `blocked` (B, K) marks removed. `states` are the layer's input hidden
    states (B, Q, d): their dtype and shape give the causal mask when `mask` is None."""
    if blocked.dim() != 2 or blocked.dtype != torch.bool:
        raise ValueError(
            f"blocked must be a (batch, keys) bool tensor, got {blocked.dtype} {tuple(blocked.shape)}"
        )
    batch, queries = states.shape[0], states.shape[1]
    if mask is None:
        keys = queries  # no cache: the keys are the positions of this call
        allowed = torch.ones(queries, keys, dtype=torch.bool, device=states.device).tril()
        mask = torch.zeros(queries, keys, dtype=states.dtype, device=states.device)
        mask = mask.masked_fill(~allowed, torch.finfo(states.dtype).min)[None, None].expand(batch, 1, -1, -1)
    elif mask.dim() != 4:
        raise ValueError(
            f"attention knockout needs a 4-D attention mask (batch, heads, queries, keys); the decoder "
            f"layer got a {mask.dim()}-D {mask.dtype} one, as flash-attention implementations are given. "
            "Load the model with attn_implementation='sdpa' or 'eager'"
        )
    elif not (mask.dtype == torch.bool or mask.is_floating_point()):
        raise ValueError(
            f"attention knockout: unsupported {mask.dtype} attention mask (bool or float expected)"
        )
    if blocked.shape[0] != batch:
        raise ValueError(f"blocked has {blocked.shape[0]} rows for a batch of {batch}")
    width = mask.shape[-1]
    if blocked.shape[1] > width:
        raise ValueError(f"blocked marks {blocked.shape[1]} key positions; the attention mask has {width}")
    block = torch.zeros(batch, width, dtype=torch.bool, device=mask.device)
    block[:, : blocked.shape[1]] = blocked.to(mask.device)
    last = mask[:, :, -1, :].expand(batch, mask.shape[1], width)  # (B, H, K) the last query's row
    attends = last if mask.dtype == torch.bool else last > torch.finfo(mask.dtype).min
    if not (attends & ~block[:, None]).any(-1).all():
        rows = (~(attends & ~block[:, None]).any(-1)).any(-1).nonzero().flatten().tolist()
        raise ValueError(f"the block leaves the last position of batch rows {rows} no key to attend to")
    new = mask.expand(batch, *mask.shape[1:]).clone()  # never the shared mask itself
    if new.dtype == torch.bool:
        new[:, :, -1, :] &= ~block[:, None]
    else:
        new[:, :, -1, :] = new[:, :, -1, :].masked_fill(block[:, None], torch.finfo(new.dtype).min)
    return new


def knockout_hook(blocked: torch.Tensor):
    """The forward pre-hook (with_kwargs) of a decoder layer that applies `knocked_out`."""

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]):
        if not bool(blocked.any()):
            return None
        if "attention_mask" not in kwargs:
            raise ValueError(
                f"{type(module).__name__} was called without an attention_mask keyword; the knockout "
                "replaces that keyword's mask"
            )
        states = args[0] if args else kwargs["hidden_states"]
        return args, {**kwargs, "attention_mask": knocked_out(kwargs["attention_mask"], blocked, states)}

    return hook


def llm_layers(lalm: LALM) -> list[torch.nn.Module]:
    """The LLM decoder layers, in order."""
    es = lalm.edit_sites
    return [lalm.model.get_submodule(f"{es.llm_layers}.{i}") for i in range(es.num_llm_layers)]


@contextmanager
def blocked_attention(lalm: LALM, layers: Iterable[int], blocked: torch.Tensor) -> Iterator[None]:
    """Inside the block, the last position attends to no key `blocked` (B, K) marks in the LLM
    decoder layers `layers`; the batch must have B rows and at most K positions.

        with blocked_attention(lalm, range(3, 9), batch["input_ids"] == lalm.audio_token_id):
            logits = lalm.logits(batch)
    """
    decoders = llm_layers(lalm)
    chosen = sorted(set(layers))
    bad = [i for i in chosen if not 0 <= i < len(decoders)]
    if bad:
        raise ValueError(
            f"LLM layers {bad} do not exist: the model has {len(decoders)} (0..{len(decoders) - 1})"
        )
    hook = knockout_hook(blocked)
    with hooked_all(Hook(decoders[i], hook, pre=True, with_kwargs=True) for i in chosen):
        yield
