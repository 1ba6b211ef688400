"""FT(LLM) and FT(Audio): fine-tune one module of the model on the edit itself.

SAKE's baselines: Adam on every parameter of the tuned modules, at most `max_steps` steps,
stopping as soon as the edit's answer NLL is below `stop_loss`. FT(LLM) tunes the last LLM
decoder layer (`sites: [llm.layers.-1]`), FT(Audio) the audio-to-LLM connector (`sites:
[connector]`); the spoken-facts study's baselines tune an audio-encoder layer, an LLM layer, or
both together. The trained
values are written in place behind a `WeightSnapshot`, so `undo` restores them bitwise and
sequential edits accumulate.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from common import EditRequest, TrainPool
from editors.base import BatchEdit, WeightSnapshot, dense_rows
from lalms.base import LALM, answer_nll
from lalms.rows import RowsMemory, tensors_memory


@dataclass(frozen=True)
class FineTuneHParams:
    sites: tuple[str, ...]  # the edit sites tuned together: llm.layers.-1 (FT-LLM), connector (FT-Audio)
    lr: float  # Adam
    max_steps: int
    stop_loss: float  # stop once the edit's answer NLL is below this


class FineTune:
    HParams = FineTuneHParams

    def __init__(self, lalm: LALM, hp: FineTuneHParams, pool: TrainPool) -> None:
        if hp.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {hp.max_steps}")
        self.lalm, self.hp = lalm, hp
        if not hp.sites:
            raise ValueError("fine-tuning needs at least one edit site (sites)")
        self.param_names = []
        for site in hp.sites:
            path = lalm.edit_sites.resolve(site)
            names = [f"{path}.{n}" for n, _ in lalm.model.get_submodule(path).named_parameters()]
            if not names:
                raise ValueError(f"edit site {site!r} ({path}) has no parameters to fine-tune")
            self.param_names += [n for n in names if n not in self.param_names]
        self.steps_taken: list[int] = []  # per applied edit, for reports and tests

    def apply(self, request: EditRequest) -> WeightSnapshot:
        model = self.lalm.model
        params = dict(model.named_parameters())
        snapshot = WeightSnapshot(model, self.param_names)
        tuned = {n: params[n].detach().clone().requires_grad_(True) for n in self.param_names}
        optimizer = torch.optim.Adam(tuned.values(), lr=self.hp.lr)
        batch = self.lalm.to_device(self.lalm.encode([request.prompt], [request.target]))
        labels = batch["labels"]
        steps = 0
        with torch.enable_grad():
            for steps in range(self.hp.max_steps):  # noqa: B007
                loss = answer_nll(self.lalm.logits(batch, tuned), labels)
                if loss.item() < self.hp.stop_loss:
                    break
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            else:
                steps = self.hp.max_steps
        with torch.no_grad():
            for name, value in tuned.items():
                params[name].copy_(value)
        self.steps_taken.append(steps)
        return snapshot

    def apply_rows(self, requests: Sequence[EditRequest]) -> BatchEdit:
        """The K requests at once, each seen by its own rows: per edit a copy of the tuned
        module's tensors (editors/base.py: dense_rows)."""
        return dense_rows(self, self.lalm, requests)

    def rows_memory(self, tokens: int) -> RowsMemory:
        """A copy of the touched tensors per edit."""
        return tensors_memory(self.lalm.model, self.param_names)
