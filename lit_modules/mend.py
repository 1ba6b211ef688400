"""Meta-training MEND: Adam on the gradient networks and the per-weight edit_lrs.

SAKE's fork builds Adam over the networks and edit_lrs at `lr` (BaseTrainer.py:113, through
MEND.outer_parameters) and a second Adam for edit_lrs at `lr_lr` (LALMTrainer.py:31), but steps
that one after the first has zeroed the gradients (LALMTrainer.py:274-279): it never moves them,
and edit_lrs learn at `lr`. `lr_lr: null` reproduces that; a number gives edit_lrs their own
rate, as MEND's paper intends.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lit_modules.hypernet import HypernetModule, Objective


@dataclass(frozen=True)
class MENDSchedule:
    """How MEND's networks and edit_lrs are optimised (Adam; the steps are the trainer's)."""

    lr: float
    """Adam's learning rate over the networks (and the edit_lrs, unless lr_lr sets theirs)."""
    lr_lr: float | None
    """The edit_lrs' own Adam learning rate; None: they learn at lr, as SAKE's run (the module
    docstring)."""
    max_grad_norm: float
    """The meta-gradient's global norm is clipped to this before each step."""


@dataclass(frozen=True)
class MENDTraining:
    """MEND's meta-training: the module's `hp` (configs/editor/mend.yaml's `module` keys)."""

    objective: Objective
    """The loss minimised (SAKE's, shared with KE)."""
    schedule: MENDSchedule
    """The optimiser's settings."""


class MENDModule(HypernetModule):
    HParams = MENDTraining
    hp: MENDTraining

    def extra_logs(self) -> dict[str, torch.Tensor]:
        lrs = self.net.edit_lrs.detach()
        logs = {"edit_lr/mean": lrs.mean()}
        logs.update({f"edit_lr/{site}": lr for site, lr in zip(self.net.sites, lrs, strict=True)})
        return logs

    def configure_optimizers(self) -> torch.optim.Optimizer:
        schedule = self.hp.schedule
        if schedule.lr_lr is None:
            return torch.optim.Adam(self.net.parameters(), lr=schedule.lr)
        edit_lrs = self.net.edit_lrs
        others = [p for p in self.net.parameters() if p is not edit_lrs]
        return torch.optim.Adam(
            [{"params": others, "lr": schedule.lr}, {"params": [edit_lrs], "lr": schedule.lr_lr}]
        )
