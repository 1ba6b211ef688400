"""What every LightningModule around an LALM shares."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch

from lalms.base import LALM


class LALMModule(L.LightningModule):
    """Holds the adapter; its model is a registered submodule (moved, optimised, checkpointed).

    Batches hold `Prompt`s with numpy audio; the adapter encodes them and moves the tensors to
    the model's device itself, so Lightning's batch transfer is a no-op here.
    """

    def __init__(self, lalm: LALM) -> None:
        super().__init__()
        self.lalm = lalm
        self.model = lalm.model

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        return batch
