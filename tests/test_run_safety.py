"""A run folder survives a failing judge, a second process and a crash."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from lightning.fabric import Fabric

from common import files as durable
from datamodules import SakeData
from evaluation.judges.base import Judgment
from evaluation.judges.rule import RuleJudge
from evaluation.lock import LOCK, RunLock, RunLocked
from evaluation.records import read_lines
from evaluation.run import merge, run_sweeps

from .test_evaluation import Recorder, sweeper


class FlakyJudge(RuleJudge):
    """Fails (invalid) on every consistency case while `failing`; counts what it is asked."""

    def __init__(self) -> None:
        self.failing, self.asked = True, 0

    def consistency(self, cases):
        self.asked += len(cases)
        if self.failing:
            return [Judgment(None, "invalid: HTTP 400: refused") for _ in cases]
        return super().consistency(cases)


def test_invalid_verdicts_are_asked_again_on_resume_and_only_they(shipped_lalm, mini_dir, tmp_path):
    data = SakeData.load(mini_dir)
    fabric = Fabric(accelerator="cpu", devices=1)
    judge = FlakyJudge()
    sw = sweeper(shipped_lalm, Recorder(), mini_dir)
    sw.judge = judge
    identity = {"editor": "recorder", "judge": "flaky"}
    first = run_sweeps(fabric, sw, tmp_path, ["single"], data.test[:3], [], identity)
    invalid = first["invalid_judgments"]["single"]
    assert invalid == first["counts"]["single"]["audio_locality"] + first["counts"]["single"]["text_locality"]
    lines = read_lines(tmp_path / "single" / "results.jsonl")[0]
    reasons = {q["reason"] for r in lines for q in r["queries"] if q["verdict"] is None}
    assert reasons == {"invalid: HTTP 400: refused"}
    judge.failing, judge.asked = False, 0
    again = run_sweeps(fabric, sw, tmp_path, ["single"], data.test[:3], [], identity)
    assert judge.asked == invalid and again["invalid_judgments"]["single"] == 0
    assert again["overall"]["audio_locality"] == 100.0  # the editor changes nothing


def test_a_second_process_is_refused_and_a_dead_ones_lock_taken_over(shipped_lalm, mini_dir, tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / LOCK).write_text(
            json.dumps({"pid": holder.pid, "host": socket.gethostname(), "since": "x"})
        )
        data = SakeData.load(mini_dir)
        fabric = Fabric(accelerator="cpu", devices=1)
        with pytest.raises(RunLocked, match=rf"in use by PID {holder.pid} on {socket.gethostname()}"):
            sw = sweeper(shipped_lalm, Recorder(), mini_dir)
            run_sweeps(fabric, sw, tmp_path, ["single"], data.test[:1], [], {"editor": "recorder"})
        assert not (tmp_path / "single").exists()
    finally:
        holder.kill()
        holder.wait()
    with RunLock(tmp_path):  # the holder is gone: its lock is stale
        assert json.loads((tmp_path / LOCK).read_text())["pid"] == os.getpid()
    assert not (tmp_path / LOCK).exists()


def test_files_are_on_disk_before_a_rename_or_a_delete_depends_on_them(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace, real_unlink = os.fsync, os.replace, Path.unlink

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(a, b):
        events.append(("replace", str(b)))
        return real_replace(a, b)

    def unlink(self, *args, **kwargs):
        events.append(("unlink", str(self)))
        return real_unlink(self, *args, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(Path, "unlink", unlink)
    durable.write_atomic(tmp_path / "metrics.json", "{}")
    kinds = [(k, Path(p).name) for k, p in events]
    assert kinds[0][0] == "fsync" and kinds[0][1].startswith(".metrics.json.tmp")  # the file's data
    assert kinds[1] == ("replace", "metrics.json") and events[2] == (
        "fsync",
        str(tmp_path),
    )  # then its folder
    events.clear()
    for r in (0, 1):
        (tmp_path / f"results.rank{r}.jsonl").write_text(json.dumps({"id": f"x:{r}"}) + "\n")
    merge(tmp_path, "single", ["x:0", "x:1"])
    order = [(k, Path(p).name) for k, p in events]
    folder_synced = order.index(("fsync", tmp_path.name))
    assert order.index(("replace", "results.jsonl")) < folder_synced
    assert all(order.index(("unlink", f"results.rank{r}.jsonl")) > folder_synced for r in (0, 1))
