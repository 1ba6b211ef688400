"""What the entry-point tests run inside train.py (named in Hydra overrides: +callbacks.x._target_=...)."""

from __future__ import annotations

import time

import lightning as L


class Pace(L.Callback):
    """Sleeps `seconds` after every training batch: a window in which a test can kill the run."""

    def __init__(self, seconds: float = 0.5) -> None:
        self.seconds = seconds

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        time.sleep(self.seconds)
