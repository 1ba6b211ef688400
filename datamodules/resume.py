"""Mid-epoch resume for DataModules: the training batches consumed in the current epoch are part
of Lightning checkpoints, so a resumed run continues with exactly the batches an uninterrupted
run would have seen next (instead of restarting the epoch's data)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from torch.utils.data import Sampler

log = logging.getLogger(__name__)


class ResumeSampler(Sampler[int]):
    """Indices 0..n-1 in order, the first `start` left out on the first pass only (a resumed
    epoch). Its length stays n: Lightning counts the epoch's batches from it, and the resumed
    loop, which restarts at the checkpoint's batch index, expects the rest."""

    def __init__(self, n: int, start: int = 0) -> None:
        self.n, self.start = n, start

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        start, self.start = self.start, 0
        return iter(range(start, self.n))


class ResumableBatches:
    """Mixed into a LightningDataModule: counts the training batches the model consumes
    (`on_before_batch_transfer`) and keeps the count in checkpoints (`state_dict`).
    `batches_to_skip()` is what the next training loader must pass over."""

    def __init__(self) -> None:
        super().__init__()
        self._consumed = {"epoch": 0, "batches": 0}
        self._resume: dict[str, int] | None = None

    def batches_to_skip(self) -> int:
        """Batches of this epoch already trained on (by the run this one resumes); call it once
        per training loader."""
        epoch = self.trainer.current_epoch if self.trainer else 0
        resume, self._resume = self._resume, None
        done = resume["batches"] if resume and resume["epoch"] == epoch else 0
        if done:
            log.info("resuming epoch %d after %d training batches", epoch, done)
        self._consumed = {"epoch": epoch, "batches": done}
        return done

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if self.trainer is not None and self.trainer.training:  # a batch the model is about to train on
            epoch = self.trainer.current_epoch
            if self._consumed["epoch"] != epoch:
                self._consumed = {"epoch": epoch, "batches": 0}
            self._consumed["batches"] += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        return dict(self._consumed)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._resume = {"epoch": int(state["epoch"]), "batches": int(state["batches"])}
