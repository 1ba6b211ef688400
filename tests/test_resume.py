"""Resume the way a user does: `train.py` killed with SIGKILL after a checkpoint, then the
README's command with ckpt_path=.../last.ckpt. The resumed process starts at the checkpoint's
step on the batch an uninterrupted run saw there (tests/steps.py logs every batch), and its
export equals the uninterrupted run's."""

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from tests.steps import read_steps

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PROJECT_ROOT": str(ROOT)}


def train(*args: str, timeout: int = 600) -> None:
    out = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True,
                         env=ENV, timeout=timeout)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]


def killed_after_first_checkpoint(*args: str, ckpt: Path) -> None:
    """Run train.py and SIGKILL it once `ckpt` is written (training slowed by tests.helpers.Pace)."""
    pace = ["+callbacks.pace._target_=tests.helpers.Pace", "+callbacks.pace.seconds=1.0"]
    proc = subprocess.Popen([sys.executable, "train.py", *args, *pace], cwd=ROOT, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.time() + 600
    while not ckpt.is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # the checkpoint file is complete: the next batch is still sleeping
    if proc.poll() is not None:
        pytest.fail(f"train.py ended before it could be killed: {proc.stderr.read()[-2000:]}")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    marker = next(a for a in args if a.startswith("hydra.run.dir="))  # its DataLoader workers end too
    deadline = time.time() + 10
    while left_behind(marker) and time.time() < deadline:
        time.sleep(0.1)
    assert not left_behind(marker), left_behind(marker)


def left_behind(arg: str) -> list[int]:
    """Live processes whose command line holds `arg` (a killed run's orphaned children)."""
    pids = []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and arg.encode() in (d / "cmdline").read_bytes().split(b"\0"):
                status = (d / "status").read_text()
                if "\nState:\tZ" not in status:
                    pids.append(int(d.name))
        except OSError:
            continue
    return pids


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def steps(path: Path) -> list[str]:
    return ["+callbacks.steps._target_=tests.steps.StepLog", f"+callbacks.steps.path={path}"]


def resumed_and_uninterrupted(tmp_path: Path, common: list[str], export: str) -> tuple[Path, Path]:
    """(the uninterrupted run's export, the killed-and-resumed run's export) folders. Checks
    that the resumed process started where the checkpoint was, not from the beginning: its
    first step is the checkpoint's (> 0) and its batches are the uninterrupted run's from there."""
    full_log, resumed_log = tmp_path / "full-steps.jsonl", tmp_path / "resumed-steps.jsonl"
    train(*common, f"hydra.run.dir={tmp_path / 'full'}", f"{export}={tmp_path / 'full-export'}",
          *steps(full_log))  # fmt: skip
    ckpt = tmp_path / "killed" / "checkpoints" / "last.ckpt"
    killed_after_first_checkpoint(*common, f"hydra.run.dir={tmp_path / 'killed'}",
                                  f"{export}={tmp_path / 'killed-export'}", ckpt=ckpt)  # fmt: skip
    assert not (tmp_path / "killed-export").exists()
    at = torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"]
    train(*common, f"ckpt_path={ckpt}", f"hydra.run.dir={tmp_path / 'resumed'}",
          f"{export}={tmp_path / 'resumed-export'}", *steps(resumed_log))  # fmt: skip
    full, resumed = read_steps(full_log), read_steps(resumed_log)
    assert at > 0 and resumed[0]["step"] == at, (at, resumed[:2])
    assert len(resumed) < len(full) and resumed == full[len(full) - len(resumed) :]
    return tmp_path / "full-export", tmp_path / "resumed-export"


def test_a_killed_mend_run_resumes_with_the_readme_command(mini_dir, tmp_path):
    common = [
        "editor=mend",
        "experiment=quickstart",
        f"data.root={mini_dir}",
        "data.build_mini=false",
        "data.batch_size=2",
        "data.max_instances=16",
        "+trainer.limit_val_batches=1",
        "editor.hparams.rank=16",
        "editor.callbacks.last.every_n_train_steps=2",
    ]
    full, resumed = resumed_and_uninterrupted(tmp_path, common, "editor.callbacks.export.out_dir")
    assert digest(full / "editor.safetensors") == digest(resumed / "editor.safetensors")


def test_a_killed_wise_calibration_resumes(mini_dir, tmp_path):
    common = [
        "editor=wise",
        f"data.root={mini_dir}",
        "data.build_mini=false",
        "data.batch_size=1",
        "data.max_instances=4",
        "+trainer.limit_val_batches=1",
        "editor.callbacks.last.every_n_train_steps=1",
        "editor.hparams.training.steps=4",
        "editor.hparams.preservation.text=2",
        "editor.hparams.preservation.audio=2",
        "editor.module.candidates=[{alpha:5.0,beta:20.0,gamma:10.0}]",
    ]
    full, resumed = resumed_and_uninterrupted(tmp_path, common, "editor.callbacks.export.out_dir")
    a, b = (yaml.safe_load((d / "editor.yaml").read_text()) for d in (full, resumed))
    assert a["hparams"] == b["hparams"] and a["calibration"] == b["calibration"]
    sa, sb = (torch.load(d / "state.pt", weights_only=True) for d in (full, resumed))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_a_killed_unke_calibration_resumes(mini_dir, tmp_path):
    common = [
        "editor=unke",
        f"data.root={mini_dir}",
        "data.build_mini=false",
        "data.batch_size=1",
        "data.max_instances=3",
        "+trainer.limit_val_batches=1",
        "editor.callbacks.last.every_n_train_steps=1",
        "editor.module.key_lrs=[1.0]",
        "editor.module.max_steps=30",
        "editor.hparams.block.steps=3",
        "editor.hparams.preservation.text=2",
        "editor.hparams.preservation.audio=1",
    ]
    full, resumed = resumed_and_uninterrupted(tmp_path, common, "editor.callbacks.export.out_dir")
    a, b = (yaml.safe_load((d / "editor.yaml").read_text()) for d in (full, resumed))
    assert a["hparams"] == b["hparams"] and a["calibration"] == b["calibration"]
    sa, sb = (torch.load(d / "state.pt", weights_only=True) for d in (full, resumed))
    torch.testing.assert_close(sa, sb, rtol=0, atol=0)  # nested: the recorded calls, the keys


def test_a_killed_pretraining_resumes(mini_dir, tmp_path):
    common = [
        "experiment=pretrain_tiny",
        f"data.root={mini_dir}",
        "data.steps=6",
        "data.batch_size=2",
        "data.val_examples=4",
        "callbacks.checkpoint.every_n_train_steps=2",
        "trainer.val_check_interval=6",
        "module.warmup_steps=2",
    ]
    full, resumed = resumed_and_uninterrupted(tmp_path, common, "callbacks.export.out_dir")
    assert digest(full / "model.safetensors") == digest(resumed / "model.safetensors")
