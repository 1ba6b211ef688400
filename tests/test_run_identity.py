"""Figures a reader can trust: a run folder holds one evaluation, its metrics count exactly the
instances the command selects, and cached answers and verdicts are keyed by what decides them."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from lightning.fabric import Fabric

from datamodules import SakeData, SakeDataModule
from datamodules.audio_io import AudioResolver
from datamodules.examples import PromptMaker
from datamodules.schema import Query
from evaluation import rescore
from evaluation.judges.base import Judgment
from evaluation.judges.rule import RuleJudge
from evaluation.records import read_lines
from evaluation.responses import QueryKeys
from evaluation.run import RunMismatch, SweepPlan, run_sweeps
from tests.helpers import openai_judge

from .test_evaluation import Recorder, sweeper

ROOT = Path(__file__).resolve().parents[1]


def evaluate(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PROJECT_ROOT": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "evaluate.py", *args], cwd=ROOT, capture_output=True, text=True, env=env, timeout=600
    )
    if check:
        assert out.returncode == 0, out.stderr[-3000:]
    return out


@pytest.fixture
def common(mini_dir, tmp_path):
    data = [f"data.root={mini_dir}", "data.build_mini=false"]
    return [
        "editor=i_ike",
        *data,
        "sweeps=[single]",
        "max_new_tokens=4",
        f"response_cache={tmp_path / 'c.db'}",
    ]


def test_other_settings_go_to_other_folders_and_a_shared_folder_is_refused(common, tmp_path):
    """The run-mixing sequence: 3 instances, then other editor settings, then 2 instances."""
    runs = tmp_path / "runs"
    evaluate(*common, "data.max_instances=3", f"hydra.run.dir={runs}/${{run_name}}")
    brief = "editor.hparams.base_system=Be brief."
    evaluate(*common, "data.max_instances=3", brief, f"hydra.run.dir={runs}/${{run_name}}")
    folders = sorted(p.name for p in runs.iterdir())
    assert len(folders) == 2 and all(f.startswith("i_ike-tiny-sake_mini-") for f in folders)

    shared = [f"hydra.run.dir={tmp_path / 'shared'}"]
    evaluate(*common, "data.max_instances=3", *shared)
    other = evaluate(*common, "data.max_instances=3", brief, *shared, check=False)
    assert other.returncode != 0
    said = 'editor.config.hparams.base_system: "You are a helpful assistant." there, "Be brief." now'
    assert said in other.stderr
    fewer = evaluate(*common, "data.max_instances=2", *shared, check=False)
    assert fewer.returncode != 0 and "data.selection.single: 3 there, 2 now" in fewer.stderr
    metrics = json.loads((tmp_path / "shared" / "metrics.json").read_text())
    assert metrics["counts"]["single"]["reliability"] == 3


def test_metrics_count_exactly_the_selected_instances_each_once(shipped_lalm, mini_dir, tmp_path):
    data = SakeData.load(mini_dir)
    fabric = Fabric(accelerator="cpu", devices=1)
    identity = {"editor": "recorder", "model": "tiny", "data": "mini", "judge": "rule"}

    def run(instances):
        editor = sweeper(shipped_lalm, Recorder(), mini_dir)
        return run_sweeps(fabric, editor, tmp_path, SweepPlan(["single"], instances, [], 5, 5), identity)

    run(data.test[:3])
    results = tmp_path / "single" / "results.jsonl"
    lines = results.read_text().splitlines(keepends=True)
    results.write_text("".join(lines + lines[:1]))  # an instance written twice (two processes)
    m = run(data.test[:2])
    assert m["counts"]["single"]["reliability"] == 2 and m["counts"]["instances"]["single"] == 2


def test_pre_edit_answers_are_keyed_by_the_audio_content_not_its_name(tmp_path, shipped_lalm):
    def clip(name: str, freq: float) -> None:
        t = np.arange(8000) / 16000
        sf.write(tmp_path / name, (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), 16000)

    def key(name: str) -> str:
        keys = QueryKeys(PromptMaker(AudioResolver(tmp_path), 16000), shipped_lalm.render, 8)
        return keys(Query("audio_locality", "Which animal?", "dog", ("dog", "cat"), name, None))

    clip("a.wav", 440)
    first = key("a.wav")
    clip("b.wav", 440)
    assert key("b.wav") == first  # same samples under another name: the same question
    clip("a.wav", 880)
    assert key("a.wav") != first  # a rebuilt clip under the old name: another question
    other = QueryKeys(PromptMaker(AudioResolver(tmp_path), 16000), shipped_lalm.render, 9)
    assert other(Query("audio_locality", "Which animal?", "dog", ("dog", "cat"), "b.wav", None)) != first


def test_the_llm_judges_cache_key_includes_its_server(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    a = openai_judge(base_url="http://127.0.0.1:1/v1")
    b = openai_judge(base_url="http://127.0.0.1:2/v1")
    assert a._cache_key("correctness", "p") != b._cache_key("correctness", "p")
    assert a.identity()["base_url"] != b.identity()["base_url"]


class CountingJudge(RuleJudge):
    def __init__(self, name: str = "counting") -> None:
        self.name, self.calls = name, 0

    def identity(self):
        return {"name": self.name}

    def correctness(self, cases):
        self.calls += len(cases)
        return super().correctness(cases)

    def consistency(self, cases):
        self.calls += len(cases)
        return [Judgment(None, "invalid") for _ in cases]  # a judge that fails on every consistency


def easyedit_record() -> dict:
    """One record of the SAKE authors' EasyEdit output format."""

    def q(question, answer, path="Animal/dog_1.wav"):
        return {"audio_path": path, "question": question, "answer": answer}

    animals = "Which animal?\n\nOptions:\ndog\ncat\npig"
    record = {
        "reliability": q(animals, "cat"),
        **{f"generality_type_{i}": q(animals, "cat") for i in range(3)},
        **{f"locality_audio_type_{i}": q(animals, "pig") for i in range(4)},
        "locality_text": q("What is 2+2?\n\nOptions:\nfour\nfive", "four", ""),
        "portability_audio": q("Eats?\n\nOptions:\nmice\nbones", "mice"),
    }
    return record | {"pre_edit": dict.fromkeys(record, "dog"), "post_edit": dict.fromkeys(record, "cat")}


def test_rescore_refuses_another_identity_before_judging_and_reasks_only_invalid(tmp_path):
    path = tmp_path / "in.json"
    path.write_text(json.dumps([easyedit_record(), easyedit_record()]))
    first = CountingJudge()
    rescore.run(str(path), first, tmp_path / "out")
    lines = read_lines(tmp_path / "out" / "single" / "results.jsonl")[0]
    invalid = sum(q["verdict"] is None for r in lines for q in r["queries"])
    assert invalid > 0 and first.calls > invalid
    again = CountingJudge()
    rescore.run(str(path), again, tmp_path / "out")
    assert again.calls == invalid  # the valid verdicts are kept, the invalid asked again
    other = CountingJudge("another")
    with pytest.raises(RunMismatch, match='judge.name: "counting" there, "another" now'):
        rescore.run(str(path), other, tmp_path / "out")
    assert other.calls == 0


def test_a_rank_without_records_is_a_clear_error(mini_dir):
    dm = SakeDataModule(str(mini_dir), num_workers=0, max_instances=1)
    assert sum(1 for _ in dm.dataset("val", rank=0, world_size=2)) == 1
    with pytest.raises(ValueError, match="fewer records than there are ranks"):
        list(dm.dataset("val", rank=1, world_size=2))


def test_compare_tabulates_a_multirun_and_refuses_runs_that_measure_different_things(common, tmp_path):
    sweep = tmp_path / "sweep"
    evaluate("-m", "editor=i_ike,ft_llm", *common[1:], "data.max_instances=2", "sweeps=[single,sequential]",
             f"hydra.sweep.dir={sweep}")  # fmt: skip
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir() and p.name.isdigit()) == ["0", "1"]
    evaluate("mode=compare", f"runs={sweep}/*", f"hydra.run.dir={tmp_path / 'cmp'}")
    table = (tmp_path / "cmp" / "compare.md").read_text()
    assert "| i_ike | tiny |" in table and "| ft_llm | tiny |" in table and "### Reliability" in table
    rows = (tmp_path / "cmp" / "compare.csv").read_text().splitlines()
    assert len(rows) == 1 + 2 * 5
    assert (tmp_path / "cmp" / "plots" / "compare_sequential.png").is_file()
    assert (tmp_path / "cmp" / "plots" / "compare_metrics.png").is_file()
    evaluate(*common, "data.max_instances=3", f"hydra.run.dir={sweep / 'three'}")
    out = evaluate("mode=compare", f"runs={sweep}/*", f"hydra.run.dir={tmp_path / 'cmp2'}", check=False)
    assert out.returncode != 0 and "data.selection.single: 2 there, 3 now" in out.stderr
