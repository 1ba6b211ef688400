"""Meta-training KE: the edit loss subject to KL(pre || post) <= margin on locality queries.

The constraint enters through a Lagrange multiplier lambda >= 0 raised by gradient ascent on
(KL - margin) after each step; the margin shrinks (down to `margin_min`) each time validation
edit success reaches `shrink_at`, so the editor first learns to edit, then to edit locally.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from common import TrainPool
from lalms.base import LALM
from lit_modules.base import plain
from lit_modules.hypernet import HypernetModule


class KEModule(HypernetModule):
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
        margin_max: float,
        margin_min: float,
        margin_shrink: float,
        shrink_at: float,
        lagrange_lr: float,
    ) -> None:
        hparams = plain(hparams)  # saved as plain data: checkpoints load with weights_only=True
        super().__init__(lalm, pool, method, hparams, locality_per_edit, max_grad_norm, seed)
        self.save_hyperparameters(ignore=["lalm", "pool"])
        # Buffers: a resumed run continues with the same multiplier and margin.
        self.register_buffer("lagrange", torch.zeros(()))
        self.register_buffer("margin", torch.tensor(float(margin_max)))

    def objective(self, out: dict[str, torch.Tensor]) -> torch.Tensor:
        return out["edit_loss"] + self.lagrange * (out["loc_loss"] - self.margin)

    def after_step(self, out: dict[str, torch.Tensor]) -> None:
        violation = self.trainer.strategy.reduce(out["loc_loss"].detach() - self.margin, reduce_op="mean")
        self.lagrange.copy_((self.lagrange + self.hparams.lagrange_lr * violation).clamp(min=0))

    def extra_logs(self) -> dict[str, torch.Tensor]:
        return {"ke/lagrange": self.lagrange.clone(), "ke/margin": self.margin.clone()}

    def on_validation_epoch_end(self) -> None:
        if (
            self.trainer.sanity_checking
            or float(self.val_metrics["success_edit"].compute()) < self.hparams.shrink_at
        ):
            return
        self.margin.copy_((self.margin * self.hparams.margin_shrink).clamp(min=self.hparams.margin_min))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.RMSprop(self.net.parameters(), lr=self.hparams.lr)
