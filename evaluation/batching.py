"""How many edits a sweep evaluates in one batch (`evaluate.py edits_per_batch=K|auto`).

K edits' queries share one batched generation of up to `batch_size` rows (evaluation/sweep.py);
what K adds to memory is computed from the shapes, not guessed:

    memory(K) = K x per_edit                          each edit's own state (its factors or tensors)
              + rows(K) x (per_row + generation_row)  rows(K) = min(K x queries per edit, batch_size)

- per_edit, per_row: the editor's `rows_memory(tokens)` (bytes one edit holds; bytes its
  factors take per row once gathered), from the edited layers' shapes and the prompt length;
- generation_row: one generated row, from the model's shapes: the KV cache over the prompt and
  the new tokens (the LLM layers' key and value widths), one layer's prefill activations (its
  widest projection) and the last position's logits (float32, twice: scores and their copy).

`auto` takes the largest K that fills one generation (K x queries <= batch_size) and fits in
90% of the memory free on the device after the model is loaded (CUDA: `mem_get_info`; CPU:
MemAvailable); an editor without `apply_rows` gets 1. The choice and its figures are recorded.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from lalms.base import LALM
from lalms.rows import RowsMemory

log = logging.getLogger(__name__)

HEADROOM = 0.9  # the share of the free memory a batch may take


def kv_bytes_per_token(lalm: LALM) -> int:
    """The KV cache's bytes per token: every LLM layer's key and value widths."""
    size = torch.empty((), dtype=lalm.model.dtype).element_size()
    kv = 0
    for layer in lalm.model.get_submodule(lalm.edit_sites.llm_layers):
        for name in ("k_proj", "v_proj"):
            proj = getattr(layer.self_attn, name, None)
            kv += proj.out_features if isinstance(proj, nn.Linear) else 0
    return kv * size


def generation_row_bytes(lalm: LALM, tokens: int, max_new_tokens: int) -> int:
    """Bytes one generated row takes (see the module docstring)."""
    size = torch.empty((), dtype=lalm.model.dtype).element_size()
    layers = lalm.model.get_submodule(lalm.edit_sites.llm_layers)
    widest = max(m.out_features for layer in layers for m in layer.modules() if isinstance(m, nn.Linear))
    vocab = lalm.model.get_output_embeddings().weight.shape[0]
    return (tokens + max_new_tokens) * kv_bytes_per_token(lalm) + 4 * tokens * widest * size + 2 * vocab * 4


def free_bytes(device: torch.device) -> int:
    """Memory free on `device` now."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class BatchPlan:
    """The K chosen and the figures it was chosen from (run.json and the report keep it)."""

    edits_per_batch: int
    requested: Any
    reason: str
    per_edit_bytes: int = 0
    per_row_bytes: int = 0
    free_bytes: int = 0
    memory_bytes: int = 0  # memory(K)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def memory(k: int, rows: RowsMemory, generation_row: int, queries: int, batch_size: int) -> int:
    return k * rows.per_edit + min(k * queries, batch_size) * (rows.per_row + generation_row)


def plan(
    requested: Any,
    editor: Any,
    lalm: LALM,
    queries_per_edit: int,
    tokens: int,
    batch_size: int,
    max_new_tokens: int,
    free: int | None = None,
) -> BatchPlan:
    """K for `requested` (an int >= 1 or "auto"): see the module docstring. `tokens` is the
    longest prompt's length; `free` the device's free bytes (measured if None)."""
    capable = hasattr(editor, "apply_rows")
    name = type(editor).__name__
    if requested != "auto":
        if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
            raise ValueError(f"edits_per_batch must be a whole number >= 1 or 'auto', got {requested!r}")
        if requested > 1 and not capable:
            raise ValueError(
                f"edits_per_batch={requested}: {name} cannot evaluate several edits in one batch "
                "(it has no apply_rows); use edits_per_batch=1 or auto"
            )
    if not capable:
        return BatchPlan(1, requested, f"{name} evaluates one edit at a time (no apply_rows)")
    rows = editor.rows_memory(tokens)
    generation_row = generation_row_bytes(lalm, tokens, max_new_tokens)
    free = free_bytes(lalm.device) if free is None else free
    return choose(requested, rows, generation_row, queries_per_edit, batch_size, free)


def choose(
    requested: Any, rows: RowsMemory, generation_row: int, queries_per_edit: int, batch_size: int, free: int
) -> BatchPlan:
    """K from the figures of the memory model (see the module docstring)."""
    figures = dict(per_edit_bytes=rows.per_edit, per_row_bytes=rows.per_row + generation_row, free_bytes=free)
    if requested != "auto":
        k = requested
        need = memory(k, rows, generation_row, queries_per_edit, batch_size)
        if need > free:
            log.warning("edits_per_batch=%d needs about %.1f GB, %.1f GB free", k, need / 1e9, free / 1e9)
        return BatchPlan(k, requested, "as requested", **figures, memory_bytes=need)
    k = max(1, batch_size // max(queries_per_edit, 1))
    while k > 1 and memory(k, rows, generation_row, queries_per_edit, batch_size) > HEADROOM * free:
        k -= 1
    reason = (
        f"auto: the most edits whose {queries_per_edit} queries each fill a generation of batch_size="
        f"{batch_size} rows within {HEADROOM:.0%} of the free memory"
    )
    need = memory(k, rows, generation_row, queries_per_edit, batch_size)
    return BatchPlan(k, requested, reason, **figures, memory_bytes=need)
