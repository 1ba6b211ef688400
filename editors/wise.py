"""WISE: a side memory beside one MLP down-projection, with per-sample routing.

The side memory is a trainable copy W' of the down-projection W of one late LLM layer; W itself
never changes. For an input, the activation distance is

    d(x) = mean over the sample's relevant positions t of || a_t (W' - W)^T ||_2

where a_t is the down-projection's input at position t. The relevant positions are the audio
rows when the prompt has audio (an auditory edit is about what the clip sounds like; the chat
scaffolding and question words are shared with every other prompt and would pull every
distance together), and all real (non-padding) positions of a text-only prompt. At inference
each sample of a batch is routed on its own: it uses W' when d(x) exceeds `act_ratio` times the
smallest distance of the applied edits' prompts under the current W'. The decision is taken on
the full prompt and kept while generating.

An edit trains a memory (Adam) on a random `mask_ratio` share of its entries (a gradient mask
per edit, WISE's knowledge sharding) with the target's NLL, the edit prompt running through it,
plus margins on d: out-of-scope (preservation inputs from the train split) below `alpha`,
in-scope above `beta`, in-scope above out-of-scope by `gamma`. The preservation inputs'
activations at the layer do not depend on W', so they are computed once (and exported with a
calibrated editor: `train.py editor=wise`).

Edits are dealt round-robin to `shards` memories W + tau_j, each trained on its own edits;
W' = W + the TIES merge of the tau_j (trim each to its `merge_density` largest entries, elect a
sign per entry by the summed mass, average the entries that agree with it). With one shard
(SAKE's sequences of 10 fit in one) W' is that shard. `undo` restores the touched shard, W' and
the edit list exactly, and removes the routing hooks when no edit is left.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from common import EditRequest, TrainPool
from common.prompt import Prompt
from editors.base import BatchEdit, Preservation
from lalms.base import LALM, answer_nll
from lalms.hooks import Hooks, Trace
from lalms.rows import UNEDITED, RowEdits, RowsMemory


@dataclass(frozen=True)
class Margins:
    """The activation-distance margins of an edit's loss."""

    alpha: float  # out-of-scope distances below this
    beta: float  # in-scope distances above this
    gamma: float  # in-scope exceeding out-of-scope by this


@dataclass(frozen=True)
class MemoryTraining:
    """How an edit trains its shard's memory."""

    lr: float  # Adam on W'
    steps: int
    mask_ratio: float  # the share of W' entries an edit's gradient mask lets through
    seed: int  # the gradient masks' seed (plus the edit's index)


@dataclass(frozen=True)
class WISEHParams:
    layer: int  # the LLM layer whose MLP down-projection gets the side memory
    preservation: Preservation  # the out-of-scope inputs of the margins
    training: MemoryTraining
    margins: Margins
    act_ratio: float  # route to W' when d > act_ratio * the smallest in-scope distance
    shards: int  # memories edits are dealt to round-robin
    merge_density: float  # TIES: the share of each shard's largest entries kept


def relevant(input_ids: torch.Tensor, attention_mask: torch.Tensor, audio_token_id: int) -> torch.Tensor:
    """(B, T) mask of the positions d averages over: audio rows, or all real ones without audio."""
    audio = input_ids == audio_token_id
    return torch.where(audio.any(-1, keepdim=True), audio, attention_mask.bool())


def activation_distance(x: torch.Tensor, delta_w: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """d per sample: mean over masked positions of ||x_t delta_w^T||; x (B, T, d_in), mask (B, T)."""
    norms = F.linear(x, delta_w).norm(dim=-1)  # (B, T)
    if mask is None or mask.shape != norms.shape:
        return norms.mean(-1)
    mask = mask.to(norms.dtype)
    return (norms * mask).sum(-1) / mask.sum(-1).clamp(min=1)


def ties_merge(deltas: Sequence[torch.Tensor], density: float = 1.0) -> torch.Tensor:
    """TIES merge of task vectors: trim, elect a sign per entry, average the agreeing entries."""
    active = [t for t in deltas if bool(t.any())]
    if not active:
        return torch.zeros_like(deltas[0])
    if len(active) == 1:
        return active[0].clone()
    trimmed = []
    for t in active:
        magnitude = t.abs()
        keep = max(1, round(density * int((magnitude > 0).sum())))
        cut = magnitude.flatten().topk(keep).values[-1]
        trimmed.append(torch.where(magnitude >= cut, t, torch.zeros_like(t)))
    stack = torch.stack(trimmed)
    sign = stack.sum(0).sign()
    agree = (stack.sign() == sign) & (stack != 0)
    return (stack * agree).sum(0) / agree.sum(0).clamp(min=1)


class WISE:
    HParams = WISEHParams

    def __init__(self, lalm: LALM, hp: WISEHParams, pool: TrainPool) -> None:
        if hp.shards < 1 or not 0 < hp.merge_density <= 1:
            raise ValueError(
                f"WISE: shards must be >= 1 and merge_density in (0, 1], got {hp.shards}, {hp.merge_density}"
            )
        self.lalm, self.hp, self.pool = lalm, hp, pool
        self.path = lalm.edit_sites.llm_mlp(hp.layer, "down_proj")
        self.module = lalm.model.get_submodule(self.path)
        weight = self.module.weight.detach()
        self.side = weight.clone()  # W' = W + the merged shards
        self.shards = [torch.zeros_like(weight) for _ in range(hp.shards)]  # tau_j
        self._edits: list[torch.Tensor] = []  # each edit prompt's activations at its relevant rows
        self._out_x: tuple[torch.Tensor, torch.Tensor] | None = None  # preservation activations, mask
        self._mask: torch.Tensor | None = None  # relevant positions of the batch being run
        self._route: torch.Tensor | None = None  # per-sample decision, kept while generating
        self._hooks = Hooks()  # routing, while there are edits

    # ------------------------------------------------------------------ activations
    def _forward(self, batch: dict[str, torch.Tensor], params=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, the layer's inputs x) of one forward over an encoded batch."""
        with Trace(self.module, detach=False) as t:
            logits = self.lalm.logits(batch, params)
        return logits, t.input

    def positions(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return relevant(input_ids, attention_mask, self.lalm.audio_token_id)

    def _encode(
        self, prompts: Sequence[Prompt], answers: Sequence[str] | None = None
    ) -> dict[str, torch.Tensor]:
        return self.lalm.to_device(self.lalm.encode(prompts, answers))

    def activations(self, prompts: Sequence[Prompt]) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's inputs for `prompts` (W' does not change them) and their relevant positions."""
        batch = self._encode(prompts)
        with torch.no_grad():
            _, x = self._forward(batch)
        return x.detach(), self.positions(batch["input_ids"], batch["attention_mask"])

    def out_of_scope(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The preservation inputs' activations, computed on first use (or loaded)."""
        if self._out_x is None:
            prompts = self.pool.preservation(self.hp.preservation.text, self.hp.preservation.audio)
            self._out_x = self.activations(prompts)
        return self._out_x

    def distances(self, prompts: Sequence[Prompt]) -> torch.Tensor:
        """d of each prompt under the current side memory."""
        x, mask = self.activations(prompts)
        return activation_distance(x, self.side - self.module.weight, mask)

    @property
    def in_scope(self) -> list[float]:
        """d of each applied edit's prompt under the current side memory, in order."""
        delta = self.side - self.module.weight
        return [float(activation_distance(x, delta, None)[0]) for x in self._edits]

    @property
    def threshold(self) -> float:
        return self.hp.act_ratio * min(self.in_scope) if self._edits else float("inf")

    # ------------------------------------------------------------------ export
    def state_dict(self) -> dict[str, torch.Tensor]:
        """What a calibrated export keeps: the preservation activations."""
        x, mask = self.out_of_scope()
        return {"out_x": x.cpu(), "out_mask": mask.cpu()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        device = self.module.weight.device
        self._out_x = (state["out_x"].to(device), state["out_mask"].to(device))

    # ------------------------------------------------------------------ routing
    def _install_hooks(self) -> None:
        threshold = self.threshold  # fixed until the next edit or undo

        def keep_mask(module, args):  # the token ids reach the embedding in forward and generate alike
            ids = args[0]
            if ids.shape[1] > 1:  # a whole prompt (generation's later steps feed one token)
                self._mask = self.positions(ids, ids != self.lalm.pad_token_id)

        def route(module, args, out):
            x = args[0]
            side = F.linear(x, self.side.to(x.dtype), module.bias)
            if x.shape[1] > 1 or self._route is None or self._route.shape[0] != x.shape[0]:
                d = activation_distance(x, (self.side - module.weight).to(x.dtype), self._mask)
                self._route = d > threshold
            return torch.where(self._route[:, None, None], side, out)

        self._hooks.add(self.lalm.model.get_input_embeddings(), keep_mask, pre=True)
        self._hooks.add(self.module, route)

    def _remove_hooks(self) -> None:
        self._hooks.remove()
        self._route = None

    def routed(self, prompts: Sequence[Prompt]) -> torch.Tensor:
        """Which samples of a batch go to the side memory (the decision of one forward)."""
        with torch.no_grad():
            self.lalm.logits(self._encode(prompts))
        return self._route.clone() if self._route is not None else torch.zeros(len(prompts), dtype=torch.bool)

    # ------------------------------------------------------------------ editing
    def apply(self, request: EditRequest) -> WISEHandle:
        out_x, out_mask = self.out_of_scope()
        n = len(self._edits)
        shard = n % len(self.shards)
        before = (shard, self.shards[shard].clone(), self.side.clone(), n)
        self._remove_hooks()  # the edit prompt trains through its shard's memory directly
        training, margins = self.hp.training, self.hp.margins
        g = torch.Generator().manual_seed(training.seed + n)
        weight = self.module.weight.detach()
        grad_mask = (torch.rand(weight.shape, generator=g) < training.mask_ratio).to(weight.device)
        memory = (weight + self.shards[shard]).requires_grad_(True)
        optimizer = torch.optim.Adam([memory], lr=training.lr)
        batch = self._encode([request.prompt], [request.target])
        in_mask = self.positions(batch["input_ids"], batch["attention_mask"])
        with torch.enable_grad():
            for _ in range(training.steps):
                logits, x_in = self._forward(batch, {f"{self.path}.weight": memory})
                d_in = activation_distance(x_in, memory - weight, in_mask)
                d_out = activation_distance(out_x, memory - weight, out_mask)
                loss = answer_nll(logits, batch["labels"]) + (
                    F.relu(d_out - margins.alpha).mean()
                    + F.relu(margins.beta - d_in).mean()
                    + F.relu(margins.gamma - (d_in.mean() - d_out)).mean()
                )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                memory.grad *= grad_mask
                optimizer.step()
        self.shards[shard] = memory.detach() - weight
        self.side = weight + ties_merge(self.shards, self.hp.merge_density)
        with torch.no_grad():
            _, x = self._forward(batch)
        self._edits.append(x.detach()[0, in_mask[0]][None])
        self._install_hooks()
        return WISEHandle(self, before)

    # ------------------------------------------------------------------ several edits at once
    def apply_rows(self, requests: Sequence[EditRequest]) -> BatchEdit:
        """The K requests at once (editors/base.py), each seen by its own rows: per group its
        own side memory, shards and edit list (trained by `apply` with the group's state in
        place of the editor's, which is restored after); a row is routed on its own group's
        memory and threshold, decided on the full prompt and kept while generating."""
        self.out_of_scope()  # on the unedited model, before any group's state
        weight = self.module.weight.detach()
        groups_state: list[_Memory | None] = [None] * len(requests)

        def add(edits: RowEdits, pairs: Sequence[tuple[int, EditRequest]]) -> None:
            for g, request in pairs:
                mine = self._memory()
                self._remove_hooks()
                self._restore(groups_state[g] or _Memory([torch.zeros_like(weight) for _ in self.shards],
                                                         weight.clone(), [], 0.0))  # fmt: skip
                try:
                    with edits.only(UNEDITED):
                        self.apply(request)
                    groups_state[g] = self._memory()
                finally:
                    self._remove_hooks()
                    self._restore(mine)

        mask: list[torch.Tensor | None] = [None]
        decision: list[tuple[torch.Tensor, torch.Tensor] | None] = [None]

        def keep_mask(module, args, out, groups):
            ids = args[0]
            if ids.shape[1] > 1:  # a whole prompt (generation's later steps feed one token)
                mask[0] = self.positions(ids, ids != self.lalm.pad_token_id)
            return out

        def route(module, args, out, groups):
            x = args[0]
            if x.shape[1] > 1 or decision[0] is None or decision[0][0] is not groups:
                use = torch.zeros(len(x), dtype=torch.bool, device=x.device)
                for g in groups.unique().tolist():
                    memory = groups_state[g] if g >= 0 else None
                    if memory is None or not memory.edits:
                        continue
                    rows = (groups == g).nonzero().flatten()
                    row_mask = mask[0][rows] if mask[0] is not None else None
                    d = activation_distance(x[rows], (memory.side - module.weight).to(x.dtype), row_mask)
                    use[rows] = d > memory.threshold
                decision[0] = (groups, use)
            use = decision[0][1]
            if not bool(use.any()):
                return out
            out = out.clone()
            for g in groups[use].unique().tolist():
                rows = ((groups == g) & use).nonzero().flatten()
                out[rows] = F.linear(x[rows], groups_state[g].side.to(x.dtype), module.bias)
            return out

        batch = BatchEdit(self.lalm, len(requests), add)
        embeddings = next(
            n for n, m in self.lalm.model.named_modules() if m is self.lalm.model.get_input_embeddings()
        )
        batch.edits.hook(embeddings, keep_mask)
        batch.edits.hook(self.path, route)
        batch.add(requests)
        return batch

    def rows_memory(self, tokens: int) -> RowsMemory:
        """Per edit: its shards and side memory (copies of the down-projection) and its prompt's
        activations."""
        w = self.module.weight
        return RowsMemory(
            per_edit=(len(self.shards) + 1) * w.numel() * w.element_size() + tokens * w.shape[1] * 4
        )

    def _memory(self) -> _Memory:
        threshold = self.threshold if self._edits else float("inf")
        return _Memory(list(self.shards), self.side, list(self._edits), threshold)

    def _restore(self, memory: _Memory) -> None:
        self.shards, self.side, self._edits = list(memory.shards), memory.side, list(memory.edits)
        if self._edits:
            self._install_hooks()


@dataclass
class _Memory:
    """One set of WISE's edit state: shards, side memory, edit activations, routing threshold."""

    shards: list[torch.Tensor]
    side: torch.Tensor
    edits: list[torch.Tensor]
    threshold: float


class WISEHandle:
    """Undo restores the touched shard, the side memory and the edit list as they were."""

    def __init__(self, wise: WISE, before: tuple[int, torch.Tensor, torch.Tensor, int]) -> None:
        self.wise, self.before, self.done = wise, before, False

    def undo(self) -> None:
        if self.done:
            raise RuntimeError("this edit was already undone")
        w = self.wise
        shard, tau, side, n = self.before
        if len(w._edits) != n + 1:
            raise RuntimeError("WISE edits are undone in reverse order")
        w.shards[shard], w.side = tau, side
        del w._edits[n:]
        w._remove_hooks()
        if w._edits:
            w._install_hooks()
        self.done = True
