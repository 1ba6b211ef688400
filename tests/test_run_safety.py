"""A run folder survives a failing judge, a second process and a crash."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from lightning.fabric import Fabric

from common import files as durable
from datamodules import SakeData
from evaluation.judges.base import Judgment
from evaluation.judges.rule import RuleJudge
from evaluation.lock import LOCK, RunLock, RunLocked
from evaluation.records import read_lines
from evaluation.run import SweepPlan, merge, run_sweeps

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
    first = run_sweeps(fabric, sw, tmp_path, SweepPlan(["single"], data.test[:3], [], 5, 5), identity)
    invalid = first["invalid_judgments"]["single"]
    assert invalid == first["counts"]["single"]["audio_locality"] + first["counts"]["single"]["text_locality"]
    lines = read_lines(tmp_path / "single" / "results.jsonl")[0]
    reasons = {q["reason"] for r in lines for q in r["queries"] if q["verdict"] is None}
    assert reasons == {"invalid: HTTP 400: refused"}
    judge.failing, judge.asked = False, 0
    again = run_sweeps(fabric, sw, tmp_path, SweepPlan(["single"], data.test[:3], [], 5, 5), identity)
    assert judge.asked == invalid and again["invalid_judgments"]["single"] == 0
    assert again["overall"]["audio_locality"] == 100.0  # the editor changes nothing


HOLD = """
import sys, time
from evaluation.lock import RunLock, RunLocked
folder, start, hold = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
time.sleep(max(0.0, start - time.time()))  # all racers try at once
try:
    with RunLock(folder):
        print("held", flush=True)
        time.sleep(hold)
except RunLocked as e:
    print("refused:", e, flush=True)
"""


def holder(folder, start=0.0, hold=60.0):
    return subprocess.Popen(
        [sys.executable, "-c", HOLD, str(folder), str(start), str(hold)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).parents[1],
    )


def test_processes_racing_for_a_folder_get_it_one_at_a_time(tmp_path):
    for round in range(4):
        folder = tmp_path / str(round)
        racers = [holder(folder, time.time() + 1.5, hold=1.0) for _ in range(3)]
        outs = {p.pid: p.communicate(timeout=60)[0].strip() for p in racers}
        winners = [pid for pid, out in outs.items() if out == "held"]
        assert len(winners) == 1, outs
        for pid, out in outs.items():
            if pid != winners[0]:
                assert out.startswith(f"refused: {folder} is in use by PID ") and "on " in out, out


def test_a_second_process_is_refused_and_a_killed_ones_lock_is_free(shipped_lalm, mini_dir, tmp_path):
    proc = holder(tmp_path)
    try:
        assert proc.stdout.readline().strip() == "held"
        data = SakeData.load(mini_dir)
        fabric = Fabric(accelerator="cpu", devices=1)
        with pytest.raises(RunLocked, match=rf"in use by PID {proc.pid} on {socket.gethostname()}"):
            sw = sweeper(shipped_lalm, Recorder(), mini_dir)
            run_sweeps(
                fabric, sw, tmp_path, SweepPlan(["single"], data.test[:1], [], 5, 5), {"editor": "recorder"}
            )
        assert not (tmp_path / "single").exists()
    finally:
        proc.send_signal(signal.SIGKILL)  # no cleanup runs: the kernel drops its lock
        proc.wait()
    assert json.loads((tmp_path / LOCK).read_text())["pid"] == proc.pid  # what it left behind
    with RunLock(tmp_path):
        assert json.loads((tmp_path / LOCK).read_text())["pid"] == os.getpid()
        with pytest.raises(RunLocked, match=rf"PID {os.getpid()}"):  # not twice, even in one process
            RunLock(tmp_path).__enter__()
    with RunLock(tmp_path):  # released on exit
        pass


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
