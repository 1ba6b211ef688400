"""Meta-training KE (EFK) as SAKE did: the MEND trainer's loss (lit_modules/hypernet.py), RMSprop
over the one-shot learner (hparams/TRAINING/EFK/qwen2-audio.yaml: `opt: RMSprop`, `lr: 3e-4`)."""

from __future__ import annotations

import torch

from lit_modules.hypernet import HypernetModule


class KEModule(HypernetModule):
    """`hp`: a MetaTraining (lit_modules/hypernet.py), from configs/editor/ke.yaml's `module`."""

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.RMSprop(self.net.parameters(), lr=self.hp.schedule.lr)
