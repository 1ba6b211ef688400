"""UnKE: edit a whole decoder block so that it produces a new hidden state for the edit.

Stage 1 finds the target: an additive delta on the output of decoder layer `layer` at the last
prompt position (the one that predicts the answer), optimised (Adam) so that the model answers
with the target, with weight decay on its relative size (|delta| / |h|)^2 and its norm clamped
to `clamp_norm` times the original state's |h|. Both are relative to |h|, so the settings carry
across layers and models whose states differ in scale (an absolute decay would outweigh the NLL
on a layer with large states and leave the target short of the answer). Stage 2 trains every
parameter of that block (AdamW) with an MSE that makes it produce the new state for the edit
while reproducing its original outputs on preservation inputs (text and audio questions from
the train split).

The block runs through the model's own code: a forward pre-hook records the arguments the
model passes to it (hidden states, attention mask, position embeddings, ... whatever the family
uses), and stage 2 calls the block with them via `torch.func.functional_call`. No masks are
built by hand, and the layers above are never run in stage 2. The preservation inputs' block
arguments and original outputs are computed once (the preserved keys; `train.py editor=unke`
exports them with its calibration of stage 1's rate, step count and norm bound). The trained
block is written in place behind a `WeightSnapshot`, so undo is bitwise and sequential edits accumulate.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from common import EditRequest, TrainPool
from editors.base import BatchEdit, Preservation, WeightSnapshot, dense_rows
from editors.locate import SearchTrace, ValueSearch, search_delta
from lalms.base import IGNORE_INDEX, LALM, hidden
from lalms.hooks import Hook, hooked_all
from lalms.rows import RowsMemory, tensors_memory


@dataclass(frozen=True)
class TargetSearch:
    """Stage 1: the delta on the block's output at the last prompt position."""

    lr: float  # Adam
    steps: int
    weight_decay: float  # on (|delta| / |h|)^2
    clamp_norm: float  # |delta| <= clamp_norm * |h|


@dataclass(frozen=True)
class BlockTraining:
    """Stage 2: the whole block trained to produce the target state."""

    lr: float  # AdamW
    steps: int


@dataclass(frozen=True)
class UnKEHParams:
    layer: int  # the decoder layer whose block is edited
    preservation: Preservation  # its outputs kept on these train-split questions
    target: TargetSearch
    block: BlockTraining


class UnKE:
    HParams = UnKEHParams

    def __init__(self, lalm: LALM, hp: UnKEHParams, pool: TrainPool) -> None:
        self.lalm, self.hp, self.pool = lalm, hp, pool
        self.path = lalm.edit_sites.resolve(f"llm.layers.{hp.layer}")
        self.block = lalm.model.get_submodule(self.path)
        self.param_names = [f"{self.path}.{n}" for n, _ in self.block.named_parameters()]
        self._preserved: tuple[tuple, dict, torch.Tensor, torch.Tensor] | None = None
        self.target_norms: list[float] = []  # |delta| / |h| of each edit's stage-1 target, for reports

    # ------------------------------------------------------------------ the block's calls
    def block_call(self, batch: dict[str, torch.Tensor]) -> tuple[tuple, dict, torch.Tensor]:
        """The arguments the model passes to the block for `batch`, and the block's output."""
        seen: dict[str, Any] = {}

        def record(module, args, kwargs):
            seen["args"], seen["kwargs"] = args, kwargs

        def keep(module, args, output):
            seen["out"] = hidden(output)

        hooks = [Hook(self.block, record, pre=True, with_kwargs=True), Hook(self.block, keep, stop=True)]
        with hooked_all(hooks), torch.no_grad():  # the forward ends after the block: nothing above is needed
            self.lalm.forward(batch)
        return seen["args"], seen["kwargs"], seen["out"].detach()

    def preserved(self) -> tuple[tuple, dict, torch.Tensor, torch.Tensor]:
        """The preservation batch's block args, kwargs, original outputs and real-position mask
        (padding positions are left out of the loss)."""
        if self._preserved is None:
            prompts = self.pool.preservation(self.hp.preservation.text, self.hp.preservation.audio)
            batch = self.lalm.to_device(self.lalm.encode(prompts))
            args, kwargs, out = self.block_call(batch)
            self._preserved = (args, kwargs, out, batch["attention_mask"].bool())
        return self._preserved

    def state_dict(self) -> dict[str, Any]:
        """What a calibrated export keeps: the preserved keys (the block's recorded call on the
        preservation inputs and its original outputs)."""
        args, kwargs, out, mask = self.preserved()
        return {"args": args, "kwargs": kwargs, "out": out, "mask": mask}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._preserved = (tuple(state["args"]), dict(state["kwargs"]), state["out"], state["mask"])

    # ------------------------------------------------------------------ the two stages
    def target_state(
        self,
        batch: dict[str, torch.Tensor],
        pos: int,
        target: TargetSearch | None = None,
        until_solved: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, SearchTrace]:
        """Stage 1: (original state, target state, the search's trace) of the block's output at
        `pos` of row 0, searched with `target` (default: the editor's). `until_solved` stops at
        the first step whose delta makes greedy decoding give the target."""
        t = target or self.hp.target
        out = self.block_call(batch)[2]
        where = torch.zeros(out.shape[:2])
        where[0, pos] = 1.0
        search = ValueSearch(  # no neutral question: no KL; s: the moved state's norm
            lr=t.lr,
            steps=t.steps,
            kl_weight=0.0,
            weight_decay=t.weight_decay,
            clamp_norm=t.clamp_norm,
            scale="positions",
            decay="squared",
            kl="before_after",
            early_stop_loss=None,
        )
        delta, trace = search_delta(
            self.lalm, self.block, batch, where, None, None, search, until_solved=until_solved
        )
        return out[0, pos], out[0, pos] + delta.to(out.dtype), trace

    def edit_batch(self, prompt: Any, target: str) -> tuple[dict[str, torch.Tensor], int]:
        """The edit prompt answered with `target`, encoded, and its last prompt position (the one
        that predicts the answer)."""
        batch = self.lalm.to_device(self.lalm.encode([prompt], [target]))
        return batch, int((batch["labels"][0] != IGNORE_INDEX).nonzero()[0]) - 1

    def apply(self, request: EditRequest) -> WeightSnapshot:
        batch, pos = self.edit_batch(request.prompt, request.target)
        original, target, _ = self.target_state(batch, pos)
        self.target_norms.append(float((target - original).norm() / original.norm()))
        args, kwargs, _ = self.block_call(batch)
        p_args, p_kwargs, p_out, p_mask = self.preserved()
        params = dict(self.lalm.model.named_parameters())
        snapshot = WeightSnapshot(self.lalm.model, self.param_names)
        prefix = len(self.path) + 1
        tuned = {n[prefix:]: params[n].detach().clone().requires_grad_(True) for n in self.param_names}
        optimizer = torch.optim.AdamW(tuned.values(), lr=self.hp.block.lr)

        def run(a: Sequence, kw: dict) -> torch.Tensor:
            return hidden(torch.func.functional_call(self.block, tuned, tuple(a), dict(kw)))

        with torch.enable_grad():
            for _ in range(self.hp.block.steps):
                loss = F.mse_loss(run(args, kwargs)[0, pos], target)
                loss = loss + F.mse_loss(run(p_args, p_kwargs)[p_mask], p_out[p_mask])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        with torch.no_grad():
            for name, value in tuned.items():
                params[f"{self.path}.{name}"].copy_(value)
        return snapshot

    def apply_rows(self, requests: Sequence[EditRequest]) -> BatchEdit:
        """The K requests at once, each seen by its own rows: per edit a copy of the trained
        block's tensors (editors/base.py: dense_rows); the preserved keys are read on the
        unedited model first."""
        self.preserved()
        return dense_rows(self, self.lalm, requests)

    def rows_memory(self, tokens: int) -> RowsMemory:
        """A copy of the touched tensors per edit."""
        return tensors_memory(self.lalm.model, self.param_names)
