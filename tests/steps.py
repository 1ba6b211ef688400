"""A callback the resume tests name in train.py's overrides (+callbacks.steps._target_=
tests.steps.StepLog): one line per training batch, the step it starts and a digest of the batch's
content, so a test can tell where a resumed process started and on which data."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch


def content_digest(obj: Any, h: Any = None) -> str:
    """sha256 over everything a batch holds (tensors, arrays, strings, numbers, nested)."""
    h = h or hashlib.sha256()
    if isinstance(obj, torch.Tensor):
        h.update(obj.detach().cpu().contiguous().numpy().tobytes())
    elif isinstance(obj, np.ndarray):
        h.update(np.ascontiguousarray(obj).tobytes())
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            h.update(f.name.encode())
            content_digest(getattr(obj, f.name), h)
    elif isinstance(obj, dict):
        for k in sorted(obj, key=str):
            h.update(str(k).encode())
            content_digest(obj[k], h)
    elif isinstance(obj, list | tuple):
        h.update(f"[{len(obj)}".encode())
        for x in obj:
            content_digest(x, h)
    else:
        h.update(repr(obj).encode())
    return h.hexdigest()[:16]


class StepLog(L.Callback):
    """Appends {"step", "batch"} to `path` (JSON lines, fsynced) before every training batch."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps({"step": trainer.global_step, "batch": content_digest(batch)}) + "\n")
            f.flush()
            os.fsync(f.fileno())


def read_steps(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
