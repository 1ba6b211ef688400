"""What a training run writes to a log file: a one-line plan and where the config is (not the
config), a progress line at the set interval with step, total, figures, rate and ETA, and no
warning the project could fix (issue 22)."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset

from lit_modules.progress import BatchCounts, ProgressLog, seconds

ROOT = Path(__file__).resolve().parents[1]


class Stream(IterableDataset):
    """Ten numbers, with no length (as SAKE's training stream)."""

    def __iter__(self):
        return iter(torch.arange(10.0).view(10, 1))


class Counted(L.LightningDataModule):
    def train_dataloader(self):
        return DataLoader(Stream(), batch_size=2)

    def batches(self, split: str, world_size: int) -> int:
        return 5


class Linear(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)

    def training_step(self, batch, batch_idx):
        loss = self.layer(batch).pow(2).mean()
        self.log("train/loss", loss)
        self.log("val/never", 1.0)  # not a training figure
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_progress_lines_count_steps_from_the_datamodule_and_carry_the_figures(tmp_path, caplog):
    assert isinstance(Counted(), BatchCounts)
    trainer = L.Trainer(
        default_root_dir=tmp_path, max_epochs=1, callbacks=[ProgressLog(every_s=0.0, always=True)],
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    with caplog.at_level(logging.INFO, logger="lit_modules.progress"):
        trainer.fit(Linear(), datamodule=Counted())
    lines = [r.getMessage() for r in caplog.records if r.name == "lit_modules.progress"]
    assert lines[0] == "training: 5 steps"
    line = re.compile(r"training: step (\d)/5, loss [\d.e-]+, [\d.]+ steps/s, ETA \S+$")
    steps = [line.match(m) for m in lines[1:-1]]
    assert [int(m.group(1)) for m in steps if m] == [1, 2, 3, 4, 5], lines
    assert re.match(r"training done: step 5 in \d+s, loss [\d.e-]+$", lines[-1]), lines[-1]


def test_seconds_reads_as_minutes_and_seconds():
    assert (seconds(59.4), seconds(61), seconds(float("nan"))) == ("59s", "1m01s", "?")


def test_train_py_writes_a_plan_progress_and_no_fixable_warning_to_a_log(mini_dir, tmp_path):
    args = [
        "editor=mend", f"data.root={mini_dir}", "data.build_mini=false", "data.batch_size=2",
        "data.max_instances=8", "+trainer.limit_val_batches=1", "editor.hparams.rank=16",
        "callbacks.progress.every_s=0", f"editor.callbacks.export.out_dir={tmp_path / 'export'}",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]  # fmt: skip
    env = {**os.environ, "PROJECT_ROOT": str(ROOT), "PYTHONWARNINGS": "default"}
    out = subprocess.run(
        [sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True, env=env, timeout=600
    )
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-3000:]
    assert re.search(r"plan: meta-train mend on tiny .* the first 8 of sake_mini training data, batch 2", log)
    assert f"config: {tmp_path / 'run' / '.hydra' / 'config.yaml'}" in log
    assert "_target_:" not in log  # the composed config is saved, not printed
    assert re.search(r"training: step \d/4, .*success_edit [\d.]+.*steps/s, ETA", log), log[-3000:]
    assert "training done: step 4 in " in log and "validation done in" in log
    fixable = ("transfer_batch_to_device", "ModelCheckpoint", "LeafSpec", "litlogger", "Loading weights")
    assert [f for f in fixable if f in log] == []
