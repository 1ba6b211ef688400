"""Meta-training MEND: Adam on the gradient networks and the per-weight edit_lrs.

SAKE's fork builds Adam over the networks and edit_lrs at `lr` (BaseTrainer.py:113, through
MEND.outer_parameters) and a second Adam for edit_lrs at `lr_lr` (LALMTrainer.py:31), but steps
that one after the first has zeroed the gradients (LALMTrainer.py:274-279): it never moves them,
and edit_lrs learn at `lr`. `lr_lr: null` reproduces that; a number gives edit_lrs their own
rate, as MEND's paper intends.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from common import TrainPool
from lalms.base import LALM
from lit_modules.base import plain
from lit_modules.hypernet import HypernetModule


class MENDModule(HypernetModule):
    def __init__(
        self,
        lalm: LALM,
        pool: TrainPool,
        method: str,
        hparams: Mapping[str, Any],
        locality_per_edit: int | None,
        max_grad_norm: float,
        seed: int,
        lr: float,
        lr_lr: float | None,
        cedit: float,
        cloc: float,
    ) -> None:
        hparams = plain(hparams)  # saved as plain data: checkpoints load with weights_only=True
        super().__init__(lalm, pool, method, hparams, locality_per_edit, max_grad_norm, seed)
        self.save_hyperparameters(ignore=["lalm", "pool"])

    def extra_logs(self) -> dict[str, torch.Tensor]:
        lrs = self.net.edit_lrs.detach()
        logs = {"edit_lr/mean": lrs.mean()}
        logs.update({f"edit_lr/{site}": lr for site, lr in zip(self.net.sites, lrs, strict=True)})
        return logs

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.hparams.lr_lr is None:
            return torch.optim.Adam(self.net.parameters(), lr=self.hparams.lr)
        edit_lrs = self.net.edit_lrs
        others = [p for p in self.net.parameters() if p is not edit_lrs]
        return torch.optim.Adam(
            [{"params": others, "lr": self.hparams.lr}, {"params": [edit_lrs], "lr": self.hparams.lr_lr}]
        )
