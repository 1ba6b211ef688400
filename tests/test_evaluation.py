"""The sweeps, their bookkeeping and resumption, pooled metrics, reports and rescoring."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.fabric import Fabric

from common.hparams import to_dict
from datamodules import AudioResolver, SakeData
from editors.checkpoint import save_editor
from editors.hypernet import HypernetEditor
from evaluation import metrics as M
from evaluation import rescore
from evaluation.judges.rule import RuleJudge
from evaluation.records import QueryResult, ResultsLog, read_lines
from evaluation.responses import ResponseCache
from evaluation.run import RunMismatch, SweepPlan, run_sweeps
from evaluation.sweep import Generation, Sweeper
from tests.helpers import configured

ROOT = Path(__file__).resolve().parents[1]


class Recorder:
    """An editor that changes nothing and records what the sweep asks of it."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []

    def apply(self, request):
        target = request.target
        self.events.append(("apply", target))
        recorder = self

        class Handle:
            def undo(self) -> None:
                recorder.events.append(("undo", target))

        return Handle()


def sweeper(lalm, editor, mini_dir, cache=None, edits_per_batch=1, **kw) -> Sweeper:
    cache = cache or ResponseCache(None, lalm.answers_fingerprint())
    generation = Generation(max_new_tokens=8, batch_size=64, edits_per_batch=edits_per_batch)
    return Sweeper(
        lalm, editor, RuleJudge(), AudioResolver(Path(mini_dir) / "audio"), cache, generation, **kw
    )


def strip_time(records):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


def test_a_full_single_sweep_restores_every_parameter_bitwise(shipped_lalm, mini, mini_dir, tmp_path):
    before = {k: v.clone() for k, v in shipped_lalm.model.state_dict().items()}
    editor = HypernetEditor(configured("mend", shipped_lalm, None, "editor.hparams.edit_lr=5.0"))
    log = ResultsLog(tmp_path / "results.jsonl")
    sweeper(shipped_lalm, editor, mini_dir).single(mini.test[:6], log)
    assert len(read_lines(log.path)[0]) == 6
    changed = sum(q["post"] != q["pre"] for r in log for q in r["queries"])
    assert changed > 0, "the edits should change some answers, or this test checks nothing"
    after = shipped_lalm.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # and after a sequence of cumulative edits
    sweeper(shipped_lalm, editor, mini_dir).sequential(
        [mini.sequences[0][:3]], ResultsLog(tmp_path / "seq.jsonl")
    )
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_killed_single_sweep_resumes_to_the_same_results(shipped_lalm, mini, mini_dir, tmp_path):
    editor = HypernetEditor(configured("mend", shipped_lalm, None, "editor.hparams.edit_lr=5.0"))
    items = mini.test[:5]
    whole = ResultsLog(tmp_path / "whole.jsonl")
    sweeper(shipped_lalm, editor, mini_dir).single(items, whole)

    part = tmp_path / "part.jsonl"
    sweeper(shipped_lalm, editor, mini_dir).single(items[:2], ResultsLog(part))
    with part.open("a") as f:  # killed while writing the third line
        f.write('{"id": "torn", "queries": [')
    resumed = ResultsLog(part)
    assert len(resumed.records) == 2 and not part.read_text().endswith("[")
    sweeper(shipped_lalm, editor, mini_dir).single(items, resumed)
    assert strip_time(read_lines(part)[0]) == strip_time(read_lines(whole.path)[0])


def test_sequential_bookkeeping_evaluates_the_first_five_edits_at_gaps_0_to_5(
    shipped_lalm, mini, mini_dir, tmp_path
):
    seq = mini.sequences[0]
    assert len(seq) == 10
    editor = Recorder()
    log = ResultsLog(tmp_path / "seq.jsonl")
    sweeper(shipped_lalm, editor, mini_dir).sequential([seq], log)
    pairs = [(r["step"], e["edit_step"], e["gap"]) for r in log for e in r["evals"]]
    expected = [(t, i, t - i) for t in range(10) for i in range(5) if 0 <= t - i <= 5]
    assert pairs == expected
    assert sorted({g for *_, g in pairs}) == [0, 1, 2, 3, 4, 5]
    # cumulative: ten applies, then ten undos in reverse order
    targets = [i.target for i in seq]
    assert editor.events == [("apply", t) for t in targets] + [("undo", t) for t in reversed(targets)]

    # resume after step 3: the first four edits are re-applied without evaluation, then it goes on
    part = tmp_path / "part.jsonl"
    part.write_text("".join(json.dumps(r) + "\n" for r in read_lines(log.path)[0][:4]))
    editor2 = Recorder()
    resumed = ResultsLog(part)
    sweeper(shipped_lalm, editor2, mini_dir).sequential([seq], resumed)
    assert strip_time(read_lines(part)[0]) == strip_time(read_lines(log.path)[0])
    assert editor2.events == editor.events


def test_sweeps_deal_instances_to_ranks_without_overlap(shipped_lalm, mini, mini_dir, tmp_path):
    seen = []
    for rank in range(3):
        log = ResultsLog(tmp_path / f"r{rank}.jsonl")
        sweeper(shipped_lalm, Recorder(), mini_dir, rank=rank, world_size=3).single(mini.test[:7], log)
        seen += [r["id"] for r in log]
    assert sorted(seen) == sorted(f"{Path(i.source).stem}:{i.index}" for i in mini.test[:7])


def _record(attribute, verdicts):
    """A single-editing record whose queries are (kind, type, verdict)."""
    queries = [
        QueryResult(kind, type_, "q", ["a", "b"], "a", "a", "a", verdict=v) for kind, type_, v in verdicts
    ]
    return {"id": attribute, "attribute": attribute, "seconds": 1.0, "queries": queries}


def test_metrics_pool_queries_as_the_paper_does():
    """DeSTA FT(LLM) in the paper: types at 87.92/15.78/74.67/69.08 over 1,200/900/1,200/1,200
    queries pool to an audio locality of 64.93, not the mean of types (61.86)."""
    tally = M.Tally(M.all_keys(["animal", "gender"], []))
    hits = {1: (1055, 1200), 2: (142, 900), 3: (896, 1200), 4: (829, 1200)}
    queries = []
    for t, (h, n) in hits.items():
        queries += [("audio_locality", t, True)] * h + [("audio_locality", t, False)] * (n - h)
    M.update_single(tally, json.loads(json.dumps(_record("animal", queries), default=vars)))
    m = M.summarise(tally.compute())
    assert m["overall"]["audio_locality"] == pytest.approx(64.9333, abs=1e-3)
    assert m["by_type"]["audio_locality_type2"] == pytest.approx(15.7778, abs=1e-3)
    assert m["by_attribute"]["Animal"]["audio_locality"] == pytest.approx(64.9333, abs=1e-3)
    assert "Gender" not in m["by_attribute"]  # nothing measured for it
    assert m["overall"]["reliability"] is None and m["counts"]["single"]["audio_locality"] == 4500


def test_invalid_judgments_count_as_wrong_and_are_reported():
    tally = M.Tally(M.all_keys(["emotion"], []))
    rec = _record("emotion", [("reliability", None, True), ("reliability", None, None)])
    M.update_single(tally, json.loads(json.dumps(rec, default=vars)))
    m = M.summarise(tally.compute())
    assert m["overall"]["reliability"] == 50.0 and m["invalid_judgments"]["single"] == 1


def test_easyedit_output_is_rescored_with_gender_types_mapped(tmp_path):
    def q(question, answer, path="Gender/x.wav"):
        return {"audio_path": path, "question": question, "answer": answer, "transcription": ""}

    opts = "Who speaks?\n\nOptions:\nmale\nfemale"
    record = {
        "reliability": q(opts, "female"),
        **{f"generality_type_{i}": q(opts, "female") for i in range(3)},
        **{f"locality_audio_type_{i}": q("How loud?\n\nOptions:\nloud\nquiet", "loud") for i in range(3)},
        "locality_text": q("What is 2+2?\n\nOptions:\nfour\nfive", "four", ""),
        "portability_audio": q("Voice?\n\nOptions:\nhigh\nlow", "high"),
    }
    keys = [k for k in record]
    pre = dict.fromkeys(keys, "male") | {"locality_text": "four", "locality_audio_type_1": "quiet"}
    post = {
        "reliability": "The answer is female.",
        "generality_type_0": "female",
        "generality_type_1": "Male.",
        "generality_type_2": "dogdogdogdogdogdogdogdog",
        "locality_audio_type_0": "male",
        "locality_audio_type_1": "loud",
        "locality_audio_type_2": "male",
        "locality_text": "four",
        "portability_audio": "high",
    }
    path = tmp_path / "Gender_results.json"
    path.write_text(json.dumps([record | {"pre_edit": pre, "post_edit": post}]))
    m = rescore.run(str(path), RuleJudge(), tmp_path / "out")
    assert m["overall"]["reliability"] == 100.0
    assert m["overall"]["generality"] == pytest.approx(100 / 3, abs=1e-3)
    assert m["by_type"]["audio_locality_type1"] == 100.0  # EasyEdit type_0
    assert m["by_type"]["audio_locality_type3"] == 0.0  # type_1 for gender: "quiet" -> "loud"
    assert m["by_type"]["audio_locality_type4"] == 100.0 and m["by_type"]["audio_locality_type2"] is None
    assert m["degenerate"]["single"] == 1
    assert (tmp_path / "out" / "report.md").read_text().count("|") > 20


def test_rescore_names_the_record_and_field_of_a_bad_file(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([{"reliability": {"question": "q"}, "pre_edit": {}, "post_edit": {}}]))
    with pytest.raises(ValueError, match=r"bad.json: record 0: field 'reliability"):
        rescore.run(str(path), RuleJudge(), tmp_path / "out")


def test_run_writes_reports_and_refuses_to_mix_runs(shipped_lalm, mini_dir, tmp_path):
    data = SakeData.load(mini_dir)
    fabric = Fabric(accelerator="cpu", devices=1)
    identity = {"editor": "recorder", "model": "tiny", "data": "mini", "judge": "rule", "max_new_tokens": 8}
    args = (SweepPlan(["single", "sequential"], data.test[:4], [data.sequences[0][:6]], 5, 5),)
    m = run_sweeps(fabric, sweeper(shipped_lalm, Recorder(), mini_dir), tmp_path, *args, identity)
    assert set(m["overall"]) == set(M.METRICS) and set(m["sequential"]) == set(M.METRICS)
    # an editor that changes nothing keeps every locality answer
    assert m["overall"]["audio_locality"] == 100.0 and m["sequential"]["text_locality"]["0"] == 100.0
    for name in ("metrics.json", "report.md", "plots/sequential.png", "plots/types.png", "run.json"):
        assert (tmp_path / name).is_file(), name
    assert list((tmp_path / "tb").glob("events.*"))
    again = run_sweeps(fabric, sweeper(shipped_lalm, Recorder(), mini_dir), tmp_path, *args, identity)
    assert {k: again[k] for k in ("overall", "sequential")} == {k: m[k] for k in ("overall", "sequential")}
    with pytest.raises(RunMismatch, match='editor: "recorder" there, "other" now'):
        run_sweeps(
            fabric,
            sweeper(shipped_lalm, Recorder(), mini_dir),
            tmp_path,
            *args,
            identity | {"editor": "other"},
        )


def evaluate_cli(*args, cwd=ROOT, check=True, timeout=600):
    env = {**os.environ, "PROJECT_ROOT": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "evaluate.py", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )
    if check:
        assert out.returncode == 0, out.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def exported(shipped_lalm, tmp_path_factory):
    """An (untrained) MEND exported like train.py does."""
    net = configured("mend", shipped_lalm, None, "editor.hparams.rank=16", "editor.hparams.edit_lr=5.0")
    return save_editor(
        net, "editors.mend.MEND", to_dict(net.hp), tmp_path_factory.mktemp("ed") / "mend", "mend"
    )


def test_two_processes_give_the_metrics_of_one(exported, mini_dir, tmp_path):
    """DDP over CPU processes: instances and sequences dealt to ranks, results merged, the
    torchmetrics tallies reduced; the numbers equal a single-process run's."""
    common = [
        f"ckpt={exported}", f"data.root={mini_dir}", "data.build_mini=false", "data.max_instances=6",
        f"response_cache={tmp_path / 'cache.sqlite'}", "max_new_tokens=8",
    ]  # fmt: skip
    evaluate_cli(*common, f"hydra.run.dir={tmp_path / 'one'}")
    evaluate_cli(*common, "fabric.devices=2", "fabric.strategy=ddp", f"hydra.run.dir={tmp_path / 'two'}")
    one, two = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("one", "two"))
    for key in ("overall", "by_attribute", "by_type", "sequential", "counts", "degenerate"):
        assert one[key] == two[key], key
    assert one["counts"]["single"]["reliability"] == 6
    merged = read_lines(tmp_path / "two" / "single" / "results.jsonl")[0]
    assert [r["id"] for r in merged] == [
        r["id"] for r in read_lines(tmp_path / "one" / "single" / "results.jsonl")[0]
    ]
    assert not list((tmp_path / "two").glob("*/results.rank*.jsonl"))


def test_a_refused_two_process_run_ends_on_every_rank(exported, mini_dir, tmp_path):
    """Rank 0 finds the folder holds another run: every rank exits with its message (no rank
    waits at a barrier for it), and the folder keeps what it held."""
    held = {"identity": {"editor": {"name": "another"}}}
    (tmp_path / "run.json").write_text(json.dumps(held))
    out = evaluate_cli(
        f"ckpt={exported}", f"data.root={mini_dir}", "data.build_mini=false", "data.max_instances=2",
        f"response_cache={tmp_path / 'cache.sqlite'}", "max_new_tokens=4", "fabric.devices=2",
        "fabric.strategy=ddp", f"hydra.run.dir={tmp_path}", check=False, timeout=300,
    )  # fmt: skip
    assert out.returncode != 0
    assert out.stderr.count("holds results of another evaluation") >= 2, out.stderr[-3000:]  # both ranks
    assert json.loads((tmp_path / "run.json").read_text()) == held
    assert not (tmp_path / "single").exists()


def test_editor_none_reports_the_unedited_models_accuracy(mini_dir, tmp_path):
    cache = f"response_cache={tmp_path / 'c.sqlite'}"
    data = (f"data.root={mini_dir}", "data.build_mini=false")
    evaluate_cli("editor=none", *data, cache, f"hydra.run.dir={tmp_path}")
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["base"]["attribute/gender"]["accuracy"] >= 75 and m["base"]["text_qa"]["n"] > 0
    # identified and held like a sweep: run.json, a refusal of other settings, the lock
    run = json.loads((tmp_path / "run.json").read_text())["identity"]
    assert run["editor"] == {"name": "none"} and run["model"]["answers"] == m["identity"]["model"]["answers"]
    other = evaluate_cli(
        "editor=none", *data, cache, "max_new_tokens=5", f"hydra.run.dir={tmp_path}", check=False
    )
    assert other.returncode != 0 and "generation.max_new_tokens: 32 there, 5 now" in other.stderr
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        busy = evaluate_cli("editor=none", *data, cache, f"hydra.run.dir={tmp_path}", check=False)
        assert busy.returncode != 0 and f"in use by PID {holder.pid}" in busy.stderr
    finally:
        holder.kill()
        holder.wait()


HOLD_LOCK = """
import sys, time
from evaluation.lock import RunLock
with RunLock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(120)
"""
