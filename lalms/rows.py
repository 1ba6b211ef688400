"""Several edits in one batch: each row of a batch runs the model as edited by its own edit.

A sweep that evaluates K edits at once puts all their queries into one batched generation; row r
belongs to group g(r) (an edit, or in sequential sweeps a sequence's accumulated edits; -1: the
unedited model). `RowEdits` holds what each group changes, as forward hooks on the touched
modules, and the assignment of the batch being run (`rows`), which follows the prompts into the
audio encoder and the connector (whose batch is the clips, in the order the prompts hold them)
and through every KV-cached decoding step (each step runs the same rows).

Two mechanisms, for the two shapes an edit takes:
- `low_rank(path, ...)`: per group, factors (L_j [r_j, d_out], R_j [r_j, d_in]) of a linear
  layer's update dW = sum_j L_j^T R_j; the rows of group g get y = x W^T + (x R_g^T) L_g. The
  groups' factors are concatenated per group and zero-padded to the largest rank, gathered per
  row: two batched matmuls per layer, no loop over groups. A row of group -1 (or of a group
  with no factors) gets exactly zero added: it answers bitwise as the unedited model.
- `tensors(path, ...)`: per group, replacement values of a leaf module's parameters (a
  fine-tuned layer, a trained block); the rows of group g run the module with them
  (`torch.func.functional_call`, one call per group present in the batch).
Editors with their own per-row logic (steering's maps, WISE's routing) read the assignment
through `groups_of`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from common.prompt import Prompt
from lalms.base import hidden
from lalms.hooks import Hooks

UNEDITED = -1


def clips_per_prompt(prompts: Sequence[Prompt]) -> list[int]:
    """How many clips each prompt holds (its turns with audio), in order."""
    return [sum(turn.audio is not None for turn in p.turns) for p in prompts]


def tower_of(edit_sites, path: str) -> str:
    """`audio` for a module of the audio encoder or the connector (whose batch is the clips),
    `llm` otherwise (whose batch is the prompts)."""
    for base in (edit_sites.audio_layers, edit_sites.connector):
        if base and (path == base or path.startswith(base + ".")):
            return "audio"
    return "llm"


@dataclass(frozen=True)
class RowsMemory:
    """What one edit of a batch costs: bytes it holds, and bytes per row its factors take."""

    per_edit: int
    per_row: int = 0


def low_rank_memory(shapes: Sequence[tuple[int, int]], rank: int, dtype: torch.dtype) -> RowsMemory:
    """Factors of rank `rank` for linear layers of (d_out, d_in) `shapes`: kept in float32 and
    stacked in the model's dtype per edit, gathered per row (or dense, where that is smaller)."""
    size = torch.empty((), dtype=dtype).element_size()
    width = sum(min((d_out + d_in) * rank, d_out * d_in) for d_out, d_in in shapes)
    kept = sum(d_out + d_in for d_out, d_in in shapes) * rank * 4
    return RowsMemory(per_edit=kept + width * size, per_row=width * size)


def tensors_memory(model: nn.Module, names: Sequence[str]) -> RowsMemory:
    """A per-edit copy of the named parameters."""
    params = dict(model.named_parameters())
    return RowsMemory(per_edit=sum(params[n].numel() * params[n].element_size() for n in names))


@dataclass
class _LowRank:
    """One linear layer's factors per group, padded and stacked on demand. Where the padded
    rank r makes the factored form costlier than a dense update (r (d_in + d_out) > d_in d_out,
    e.g. MEND's rank of one position per token on a small model), each group's update is
    stacked dense instead: one batched matmul per layer."""

    groups: list[list[tuple[torch.Tensor, torch.Tensor]]]
    _stacked: tuple[torch.Tensor, ...] | None = None
    _gathered: tuple[object, tuple[torch.Tensor, ...]] | None = None

    def stacked(self, like: torch.Tensor, d_out: int, d_in: int) -> tuple[torch.Tensor, ...]:
        """(L [G + 1, r_max, d_out], R [G + 1, r_max, d_in]), or (dW^T [G + 1, d_in, d_out],);
        the last group is the unedited one (zeros)."""
        if self._stacked is None:
            ranks = [sum(left.shape[0] for left, _ in fs) for fs in self.groups]
            r = max([*ranks, 1])
            opts = dict(dtype=like.dtype, device=like.device)
            left = torch.zeros(len(self.groups) + 1, r, d_out, **opts)
            right = torch.zeros(len(self.groups) + 1, r, d_in, **opts)
            for g, fs in enumerate(self.groups):
                if fs:
                    left[g, : ranks[g]] = torch.cat([lf for lf, _ in fs]).to(**opts)
                    right[g, : ranks[g]] = torch.cat([rf for _, rf in fs]).to(**opts)
            dense = r * (d_in + d_out) > d_in * d_out
            self._stacked = (torch.bmm(right.transpose(1, 2), left),) if dense else (left, right)
        return self._stacked

    def changed(self) -> None:
        self._stacked = self._gathered = None

    def added(self, out: torch.Tensor, x: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        """out + x dW_g^T (= out + (x R_g^T) L_g) for each row of x [B, ..., d_in] with its group g."""
        d_out = out.shape[-1]
        stacked = self.stacked(out, d_out, x.shape[-1])
        if self._gathered is None or self._gathered[0] is not groups:  # once per assignment
            index = torch.where(groups < 0, len(self.groups), groups)
            self._gathered = (groups, tuple(t[index] for t in stacked))
        rows = self._gathered[1]
        flat, base = x.reshape(x.shape[0], -1, x.shape[-1]), out.reshape(out.shape[0], -1, d_out)
        if len(rows) == 1:
            return torch.baddbmm(base, flat.to(out.dtype), rows[0]).reshape(out.shape)
        left_rows, right_rows = rows
        return torch.baddbmm(
            base, torch.bmm(flat.to(out.dtype), right_rows.transpose(1, 2)), left_rows
        ).reshape(out.shape)


@dataclass
class RowEdits:
    """Row-wise edits of `n_groups` groups on one model, as hooks until `remove` (see the module
    docstring). `rows(prompts, groups)` assigns the rows of the next forwards (generation
    included); `only(g)` makes every row of every forward group g's (to compute an edit on the
    model as group g's earlier edits left it)."""

    model: nn.Module
    edit_sites: object
    n_groups: int
    _low_rank: dict[str, _LowRank] = field(default_factory=dict)
    _hooks: Hooks = field(default_factory=Hooks)
    _rows: torch.Tensor | None = None
    _clips: torch.Tensor | None = None
    _only: int | None = None

    # ------------------------------------------------------------------ the assignment
    @contextmanager
    def rows(self, prompts: Sequence[Prompt], groups: Sequence[int]) -> Iterator[None]:
        """Within the block, row i of a batch of `prompts` runs as edited by group `groups[i]`."""
        if len(prompts) != len(groups):
            raise ValueError(f"{len(prompts)} prompts but {len(groups)} row groups")
        bad = [g for g in groups if not UNEDITED <= g < self.n_groups]
        if bad:
            raise ValueError(f"row groups {sorted(set(bad))} out of range for {self.n_groups} groups")
        clips = [g for g, n in zip(groups, clips_per_prompt(prompts), strict=True) for _ in range(n)]
        with self.assign(groups, clips):
            yield

    @contextmanager
    def assign(self, rows: Sequence[int], clips: Sequence[int] | None = None) -> Iterator[None]:
        """Within the block, row i of the LLM's batch runs as group rows[i], clip j of the audio
        encoder's and connector's batch as group clips[j] (None: no clip may run)."""
        previous = (self._rows, self._clips, self._only)
        self._rows = torch.tensor(list(rows), dtype=torch.long)
        self._clips = None if clips is None else torch.tensor(list(clips), dtype=torch.long)
        self._only = None
        try:
            yield
        finally:
            self._rows, self._clips, self._only = previous

    @contextmanager
    def only(self, group: int) -> Iterator[None]:
        """Within the block, every row and clip of every forward runs as edited by `group`."""
        previous = (self._rows, self._clips, self._only)
        self._rows = self._clips = None
        self._only = group
        try:
            yield
        finally:
            self._rows, self._clips, self._only = previous

    def groups_of(self, path: str, batch: int, device: torch.device) -> torch.Tensor:
        """The group of each of the `batch` inputs the module at `path` is running on."""
        if self._only is not None:
            return torch.full((batch,), self._only, dtype=torch.long, device=device)
        tower = tower_of(self.edit_sites, path)
        groups = self._clips if tower == "audio" else self._rows
        if groups is None:
            raise RuntimeError(
                f"{path} ran outside RowEdits.rows(...) / only(...): which edit each row sees is unknown"
            )
        if len(groups) != batch:
            raise RuntimeError(
                f"{path} ran on a batch of {batch} but {len(groups)} "
                f"{'clips' if tower == 'audio' else 'rows'} were assigned groups"
            )
        if groups.device != device:
            groups = groups.to(device)
            if tower == "audio":
                self._clips = groups
            else:
                self._rows = groups
        return groups

    # ------------------------------------------------------------------ low-rank updates
    def low_rank(self, path: str) -> None:
        """Hook the linear layer at `path` for low-rank updates (none yet: add them with `push`)."""
        if path in self._low_rank:
            return
        module = self.model.get_submodule(path)
        if not isinstance(module, nn.Linear):
            raise TypeError(
                f"row-wise low-rank updates need a Linear layer; {path} is a {type(module).__name__}"
            )
        state = _LowRank([[] for _ in range(self.n_groups)])
        self._low_rank[path] = state

        def hook(_module, args, out):
            return state.added(out, args[0], self.groups_of(path, out.shape[0], out.device))

        self._hooks.add(module, hook)

    def push(self, path: str, group: int, left: torch.Tensor, right: torch.Tensor) -> None:
        """Add dW = left^T right (left [r, d_out], right [r, d_in]) to group `group` at `path`
        (gradients flow to the factors: meta-training differentiates through them)."""
        self.low_rank(path)
        state = self._low_rank[path]
        state.groups[group].append((left, right))
        state.changed()

    def pop(self, path: str, group: int) -> None:
        """Remove the last update `push` added to `group` at `path`."""
        state = self._low_rank[path]
        state.groups[group].pop()
        state.changed()

    # ------------------------------------------------------------------ whole tensors
    def tensors(self, path: str, values: Sequence[Mapping[str, torch.Tensor] | None]) -> None:
        """Rows of group g run the leaf module at `path` with its parameters replaced by
        `values[g]` (name -> tensor, names relative to the module; None: unchanged)."""
        module = self.model.get_submodule(path)
        if any(True for _ in module.children()):
            raise TypeError(f"row-wise tensors replace a leaf module's parameters; {path} has submodules")
        if len(values) != self.n_groups:
            raise ValueError(f"{len(values)} value sets for {self.n_groups} groups")

        inside = [False]  # the module's own call with a group's values runs this hook too

        def hook(mod, args, kwargs, out):
            if inside[0]:
                return out
            if len(args) != 1 or kwargs:
                raise TypeError(f"row-wise tensors: {path} was called with more than one input")
            (x,) = args
            groups = self.groups_of(path, x.shape[0], x.device)
            out = out.clone()
            inside[0] = True
            try:
                for g in groups.unique().tolist():
                    if g < 0 or values[g] is None:
                        continue
                    rows = (groups == g).nonzero().flatten()
                    out[rows] = torch.func.functional_call(mod, dict(values[g]), (x[rows],), strict=False)
            finally:
                inside[0] = False
            return out

        self._hooks.add(module, hook, with_kwargs=True)

    # ------------------------------------------------------------------ anything else
    def hook(self, path: str, fn: Callable) -> None:
        """A forward hook `fn(module, args, out, groups)` of the module at `path`, with the
        group of each input of its batch."""
        module = self.model.get_submodule(path)

        def wrapped(mod, args, out):
            h = hidden(out)
            return fn(mod, args, out, self.groups_of(path, h.shape[0], h.device))

        self._hooks.add(module, wrapped)

    def remove(self) -> None:
        """Remove every hook: the model is as it was before (nothing was written to it)."""
        self._hooks.remove()
        self._low_rank.clear()
