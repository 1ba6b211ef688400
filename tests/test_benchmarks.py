"""The benchmark scripts run as their docstrings say (on a few instances): a benchmark that no
longer starts after a refactor would only be found when someone needs its figures."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def bench(script: str, run_dir: Path, *args: str) -> str:
    """The script's stdout; its Hydra folder goes to `run_dir`, not the checkout's outputs/."""
    env = {**os.environ, "HYDRA_FULL_ERROR": "1"}
    out = subprocess.run(
        [sys.executable, f"benchmarks/{script}", *args, f"hydra.run.dir={run_dir}"],
        cwd=ROOT, capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def on(mini_dir: Path) -> tuple[str, ...]:
    return f"data.root={mini_dir}", "data.build_mini=false"


def test_evaluate_sweep_benchmark_prints_both_speeds(mini_dir, tmp_path):
    out = bench("evaluate_sweep.py", tmp_path, "+editors=[mend]", "+instances=4", "+k=2", *on(mini_dir))
    assert re.search(r"4 instances, tiny on cpu", out), out
    assert re.search(r"mend +[\d.]+ +[\d.]+ +[\d.]+x  (\d+)/\1", out), out  # K=2 answers as K=1


def test_meta_train_benchmark_prints_its_throughput(mini_dir, tmp_path):
    out = bench(
        "meta_train.py", tmp_path, "editor=mend", "+steps=1", "+warmup=0", "data.batch_size=2", *on(mini_dir)
    )
    assert re.search(r"mend on tiny .* batch 2 edits .* s/step", out), out


def test_fingerprint_benchmark_prints_the_digest(tmp_path):
    out = bench("fingerprint.py", tmp_path, "+repeats=1")
    assert re.search(r"fingerprint [0-9a-f]+: [\d.]+M parameters", out), out


def test_decoding_equivalence_benchmark_counts_differences_in_bf16(mini_dir, tmp_path):
    out = bench(
        "decoding_equivalence.py",
        tmp_path,
        "model.dtype=bfloat16",
        "+queries=12",
        "batch_size=6",
        *on(mini_dir),
    )
    assert "12 queries, tiny in torch.bfloat16 on cpu" in out, out
    assert re.search(r"plain generation: \d+ answers differ \(\d+ at a near-tie", out), out
