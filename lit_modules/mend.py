"""Meta-training MEND: cedit * edit NLL + cloc * KL(pre || post), Adam with its own edit_lr rate."""

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
        lr_lr: float,
        cedit: float,
        cloc: float,
    ) -> None:
        hparams = plain(hparams)  # saved as plain data: checkpoints load with weights_only=True
        super().__init__(lalm, pool, method, hparams, locality_per_edit, max_grad_norm, seed)
        self.save_hyperparameters(ignore=["lalm", "pool"])

    def objective(self, out: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.hparams.cedit * out["edit_loss"] + self.hparams.cloc * out["loc_loss"]

    def extra_logs(self) -> dict[str, torch.Tensor]:
        lrs = self.net.edit_lrs.detach()
        logs = {"edit_lr/mean": lrs.mean()}
        logs.update({f"edit_lr/{site}": lr for site, lr in zip(self.net.sites, lrs, strict=True)})
        return logs

    def configure_optimizers(self) -> torch.optim.Optimizer:
        edit_lrs = [self.net.edit_lrs]
        others = [p for n, p in self.net.named_parameters() if n != "edit_lrs"]
        return torch.optim.Adam(
            [{"params": others, "lr": self.hparams.lr}, {"params": edit_lrs, "lr": self.hparams.lr_lr}]
        )
