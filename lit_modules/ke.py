"""Meta-training KE (EFK) as SAKE did: the MEND trainer's loss (lit_modules/hypernet.py), RMSprop
over the one-shot learner (hparams/TRAINING/EFK/qwen2-audio.yaml: `opt: RMSprop`, `lr: 3e-4`)."""

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
        cedit: float,
        cloc: float,
    ) -> None:
        hparams = plain(hparams)  # saved as plain data: checkpoints load with weights_only=True
        super().__init__(lalm, pool, method, hparams, locality_per_edit, max_grad_norm, seed)
        self.save_hyperparameters(ignore=["lalm", "pool"])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.RMSprop(self.net.parameters(), lr=self.hparams.lr)
