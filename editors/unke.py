"""UnKE: edit a whole decoder block so that it produces a new hidden state for the edit.

Stage 1 finds the target: an additive delta on the output of decoder layer `layer` at the last
prompt position (the one that predicts the answer), optimised (Adam) so that the model answers
with the target, with weight decay on its relative size (|delta| / |h|)^2 and its norm clamped
to `clamp_norm` times the original state's |h|. Both are relative to |h|, so the settings carry
across layers and models whose states differ in scale (the tiny model's layer-1 states have
|h| ~ 60: an absolute decay of 1e-3 |delta|^2 outweighed the NLL there and left a quarter of
the targets short of the answer). Stage 2 trains every parameter of that block (AdamW) with an
MSE that makes it produce the new state for the edit while reproducing its original outputs on
preservation inputs (text and audio questions from the train split).

The block runs through the model's own code: a forward pre-hook records the arguments the
model passes to it (hidden states, attention mask, position embeddings, ... whatever the family
uses), and stage 2 calls the block with them via `torch.func.functional_call`. No masks are
built by hand, and the layers above are never run in stage 2. The preservation inputs' block
arguments and original outputs are computed once (the preserved keys; `train.py editor=unke`
exports them with its calibration of stage 1's rate, step count and norm bound). The trained block is
written in place behind a `WeightSnapshot`, so undo is bitwise and sequential edits accumulate.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from editors.base import EditRequest, WeightSnapshot
from editors.locate import KeySearch, search_delta
from editors.preservation import preservation_prompts
from lalms.base import IGNORE_INDEX, LALM, hidden


class _Stop(Exception):
    """Raised by a hook once the block has run: nothing above it is needed."""


class UnKE:
    def __init__(
        self,
        lalm: LALM,
        layer: int,
        preservation_root: str,
        audio_root: str | None = None,
        n_text: int = 20,
        n_audio: int = 5,
        key_lr: float = 0.5,
        key_steps: int = 25,
        key_weight_decay: float = 1e-3,
        clamp_norm: float = 4.0,
        block_lr: float = 2e-4,
        block_steps: int = 50,
    ) -> None:
        self.lalm = lalm
        self.key_lr, self.key_steps, self.key_wd, self.clamp_norm = (
            key_lr,
            key_steps,
            key_weight_decay,
            clamp_norm,
        )
        self.block_lr, self.block_steps = block_lr, block_steps
        self.path = lalm.edit_sites.resolve(f"llm.layers.{layer}")
        self.block = lalm.model.get_submodule(self.path)
        self.param_names = [f"{self.path}.{n}" for n, _ in self.block.named_parameters()]
        self._preservation = (preservation_root, audio_root, n_text, n_audio)
        self._preserved: tuple[tuple, dict, torch.Tensor, torch.Tensor] | None = None
        self.target_norms: list[float] = []  # |delta| / |h| of each edit's stage-1 target, for reports
        lalm.model.requires_grad_(False)  # only the editor's own copies are trained

    # ------------------------------------------------------------------ the block's calls
    def block_call(self, batch: dict[str, torch.Tensor]) -> tuple[tuple, dict, torch.Tensor]:
        """The arguments the model passes to the block for `batch`, and the block's output."""
        seen: dict[str, Any] = {}

        def record(module, args, kwargs):
            seen["args"], seen["kwargs"] = args, kwargs

        def stop(module, args, output):
            seen["out"] = hidden(output)
            raise _Stop

        hooks = [
            self.block.register_forward_pre_hook(record, with_kwargs=True),
            self.block.register_forward_hook(stop),
        ]
        try:
            with torch.no_grad():
                self.lalm.forward(batch)
        except _Stop:
            pass
        finally:
            for h in hooks:
                h.remove()
        return seen["args"], seen["kwargs"], seen["out"].detach()

    def preserved(self) -> tuple[tuple, dict, torch.Tensor, torch.Tensor]:
        """The preservation batch's block args, kwargs, original outputs and real-position mask
        (padding positions are left out of the loss)."""
        if self._preserved is None:
            root, audio_root, n_text, n_audio = self._preservation
            prompts = preservation_prompts(root, audio_root, n_text, n_audio, self.lalm.sampling_rate)
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
        lr: float | None = None,
        steps: int | None = None,
        clamp_norm: float | None = None,
        until_solved: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, KeySearch]:
        """Stage 1: (original state, target state, the search's trace) of the block's output at
        `pos` of row 0; `lr`, `steps` and `clamp_norm` default to the editor's. `until_solved`
        stops at the first step whose delta makes greedy decoding give the target."""
        out = self.block_call(batch)[2]
        where = torch.zeros(out.shape[:2])
        where[0, pos] = 1.0
        delta, trace = search_delta(
            self.lalm, self.block, batch, where,
            lr=lr or self.key_lr, steps=steps or self.key_steps, weight_decay=self.key_wd,
            clamp_norm=clamp_norm or self.clamp_norm, scale_by="positions", until_solved=until_solved,
        )  # fmt: skip
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
        optimizer = torch.optim.AdamW(tuned.values(), lr=self.block_lr)

        def run(a: Sequence, kw: dict) -> torch.Tensor:
            return hidden(torch.func.functional_call(self.block, tuned, tuple(a), dict(kw)))

        with torch.enable_grad():
            for _ in range(self.block_steps):
                loss = F.mse_loss(run(args, kwargs)[0, pos], target)
                loss = loss + F.mse_loss(run(p_args, p_kwargs)[p_mask], p_out[p_mask])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        with torch.no_grad():
            for name, value in tuned.items():
                params[f"{self.path}.{name}"].copy_(value)
        return snapshot
