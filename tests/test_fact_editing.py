"""Editing spoken facts (issue 29): keys over a subject word (editors/locate.py: position `span`,
lalms/spans.py), AlphaEdit's audio stage, fine-tuning several sites, the fact sweep with reset
and accumulated edits and its resume (evaluation/fact_sweep.py), the study's tables
(evaluation/fact_compare.py), and the pretraining task that teaches the facts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.fabric import Fabric

from datamodules.spoken_facts import SpokenFactsData
from editors.locate import ClipSpan, LinearSite, key_positions
from evaluation import fact_compare, fact_sweep
from evaluation.fact_eval import fact_readings
from lalms.spans import frame_seconds, span_frames, span_rows
from tests.helpers import configured

ROOT = Path(__file__).resolve().parents[1]
INSTRUCTION = "Complete the sentence you hear."
CORPUS = "editor.hparams.corpus"
SMALL = (f"{CORPUS}.text=16", f"{CORPUS}.audio=16", f"{CORPUS}.cache_dir=null")  # locate-then-edit only


@pytest.fixture(scope="module")
def data(world, mini_dir):
    a, _ = world
    preserved = {"root": str(mini_dir), "name": "sake_mini"}
    return SpokenFactsData(str(a), "spoken_facts", INSTRUCTION, max_facts=1, preserved=preserved)


@pytest.fixture(scope="module")
def facts(data):
    return data.facts("test")


def params(lalm) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in lalm.model.named_parameters()}


def changed(lalm, before) -> set[str]:
    return {n for n, p in lalm.model.named_parameters() if not torch.equal(p, before[n])}


def test_span_frames_and_rows_by_hand():
    assert list(span_frames((0.10, 0.15), 200, 0.02)) == [5, 6, 7]  # frames of [0.10, 0.16)
    assert list(span_frames((5.0, 6.0), 200, 0.02)) == [199]  # past the end: the last frame
    assert list(span_frames((0.101, 0.102), 200, 0.02)) == [5]  # at least one
    assert span_rows((0.3, 0.5), list(range(100, 110)), 2.0) == [101, 102]  # 0.2 s a row
    with pytest.raises(ValueError, match="known duration"):
        span_rows((0.0, 1.0), [], 1.0)


def test_max_facts_takes_the_first_of_each_relation_and_anchors_pick_their_word(data, facts):
    assert [f.relation for f in facts] == ["native_language", "pet", "mood"]
    fact = facts[0]
    first, last = fact.prompt.subject
    for anchor, index in (("first_subject", first), ("last_subject", last), ("last_word", -1)):
        word = fact.prompt.words[index]
        assert data.request(fact, 16000, anchor).span == (word.start, word.end)
    req = data.request(fact, 16000)
    assert (req.target, req.original, req.attribute) == (fact.target, fact.object, fact.relation)
    assert req.prompt.question == INSTRUCTION and req.prompt.audio is not None


def test_span_keys_weigh_exactly_the_words_frames_and_audio_rows(shipped_lalm, data, facts):
    request = data.request(facts[0], shipped_lalm.sampling_rate, "last_subject")
    span = ClipSpan.of(request, shipped_lalm.sampling_rate)
    assert span.seconds == pytest.approx(len(request.prompt.audio) / 16000)
    assert frame_seconds(shipped_lalm) == pytest.approx(0.02)  # Whisper's stem: 10 ms x stride 2
    batch = shipped_lalm.to_device(shipped_lalm.encode([request.prompt], [request.target]))

    audio = LinearSite(shipped_lalm, "audio.layers.1.fc2", "span")
    keys, _, w = audio.keys_and_outputs(batch, span)
    where = span_frames(request.span, w.shape[1], 0.02)
    assert w[0].nonzero().flatten().tolist() == list(where) and float(w.sum()) == pytest.approx(1.0)
    from lalms.hooks import Trace

    with Trace(audio.module) as t, torch.no_grad():
        shipped_lalm.logits(batch)
    assert torch.allclose(keys[0], t.input[0, list(where)].mean(0), atol=1e-6)

    llm = LinearSite(shipped_lalm, "llm.layers.1.mlp.down_proj", "span")
    _, _, w = llm.keys_and_outputs(batch, span)
    rows = (batch["input_ids"][0] == shipped_lalm.audio_token_id).nonzero().flatten().tolist()
    expected = span_rows(request.span, rows, span.seconds)
    assert w[0].nonzero().flatten().tolist() == expected and set(expected) < set(rows)
    with pytest.raises(ValueError, match="needs an edit request with a time span"):
        key_positions(shipped_lalm, batch, "llm", "span", 0)


def test_rome_on_a_subject_word_moves_the_fact_and_undoes_bitwise(shipped_lalm, pool, data, facts):
    rome = configured("facts_rome_cross", shipped_lalm, pool, *SMALL)
    fact = facts[0]
    before_w, before = params(shipped_lalm), fact_readings(shipped_lalm, data, [fact])[0]
    handle = rome.apply(data.request(fact, shipped_lalm.sampling_rate))
    after = fact_readings(shipped_lalm, data, [fact])[0]
    touched = changed(shipped_lalm, before_w)
    assert touched == {s.param for s in rome.sites} and len(touched) == 2  # one audio, one LLM layer
    assert any("audio_tower" in n for n in touched)
    assert after.target - after.true > before.target - before.true  # the target gained on the true object
    handle.undo()
    assert not changed(shipped_lalm, before_w)


def test_alphaedit_edits_the_audio_stage_then_the_llm_stage(shipped_lalm, pool, data, facts):
    before = params(shipped_lalm)
    audio = configured("facts_alphaedit_audio", shipped_lalm, pool, *SMALL)
    assert [s.tower for s in audio.sites] == ["audio", "audio"]
    handle = audio.apply(data.request(facts[1], shipped_lalm.sampling_rate))
    assert changed(shipped_lalm, before) == {s.param for s in audio.sites}
    handle.undo()
    assert not changed(shipped_lalm, before) and not audio.previous
    cross = configured("facts_alphaedit_cross", shipped_lalm, pool, *SMALL)
    assert [s.tower for s in cross.sites] == ["audio", "audio", "llm", "llm"]
    handle = cross.apply(data.request(facts[1], shipped_lalm.sampling_rate))
    assert changed(shipped_lalm, before) == {s.param for s in cross.sites}
    assert set(cross.previous) == {s.path for s in cross.sites}  # C_prev gained every layer's keys
    handle.undo()
    assert not changed(shipped_lalm, before)


def test_fine_tuning_tunes_every_named_site_together(shipped_lalm, pool, data, facts):
    ft = configured("facts_ft_both", shipped_lalm, pool)
    assert {n.split(".layers.")[0] for n in ft.param_names} == {"model.audio_tower", "model.language_model"}
    before = params(shipped_lalm)
    handle = ft.apply(data.request(facts[2], shipped_lalm.sampling_rate))
    touched = changed(shipped_lalm, before)
    assert touched <= set(ft.param_names) and any("audio_tower" in n for n in touched)
    assert any("language_model" in n for n in touched)
    handle.undo()
    assert not changed(shipped_lalm, before)


def test_accumulated_edits_stay_until_the_sweep_ends_then_the_model_is_restored(
    shipped_lalm, pool, data, facts, tmp_path
):
    fabric = Fabric(accelerator="cpu", devices=1)
    editor = configured("facts_alphaedit_text", shipped_lalm, pool, *SMALL)
    before = params(shipped_lalm)
    runs = {}
    for accumulate in (False, True):
        sweep = fact_sweep.FactSweep(shipped_lalm, editor, data, accumulate=accumulate, batch_size=16)
        selection = {"name": "f", "split": "test", "selection": {"facts": 3}, "anchor": "first_subject"}
        ident = {"editor": {"name": "x"}, "model": {"name": "t"}, "judge": {"name": "lp"}, "data": selection}
        runs[accumulate] = fact_sweep.run(fabric, sweep, facts, tmp_path / str(accumulate), ident)
        assert not changed(shipped_lalm, before) and not editor.previous
    lines = {
        a: [json.loads(x) for x in (tmp_path / str(a) / "facts.jsonl").read_text().splitlines()] for a in runs
    }
    assert lines[False][0]["readings"] == lines[True][0]["readings"]  # the first edit: same model
    assert lines[False][1]["readings"] != lines[True][1]["readings"]  # the second: the first in place
    assert runs[True]["baseline"] == runs[False]["baseline"] and runs[True]["accumulate"]
    assert runs[True]["edited"]["ES_edits"] == 3


def _evaluate(world, mini_dir, out, *overrides):
    a, _ = world
    cmd = [sys.executable, "evaluate.py", "data=spoken_facts", f"data.root={a}", "data.build_mini=false",
           f"data.preserved.root={mini_dir}", "data.preserved.build_mini=false", "data.max_facts=1",
           f"response_cache={out.parent / 'cache.sqlite'}", f"hydra.run.dir={out}", *overrides]  # fmt: skip
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    return run


def test_evaluate_py_runs_strategies_and_compare_tabulates_them(world, mini_dir, tmp_path):
    """Through the command a user types: a cross-modal ROME and an FT run (each reset after every
    fact), the unedited baseline, then mode=compare's Table 1."""
    for editor in ("facts_rome_cross", "facts_ft_both", "none"):
        extra = SMALL if editor == "facts_rome_cross" else ()
        _evaluate(world, mini_dir, tmp_path / "runs" / editor, f"editor={editor}", *extra)
    m = json.loads((tmp_path / "runs" / "facts_rome_cross" / "metrics.json").read_text())
    assert m["study"] == "spoken_facts" and not m["accumulate"] and m["edited"]["ES_edits"] == 3
    assert set(m["per_relation"]) == {"native_language", "pet", "mood"}
    assert m["identity"]["data"]["anchor"] == "first_subject"
    none = json.loads((tmp_path / "runs" / "none" / "metrics.json").read_text())
    assert "edited" not in none and none["baseline"] == m["baseline"]
    report = (tmp_path / "runs" / "facts_rome_cross" / "report.md").read_text()
    assert "| Baseline (unedited) |" in report and "| facts_rome_cross |" in report
    cmd = [sys.executable, "evaluate.py", "mode=compare", f"runs={tmp_path / 'runs'}/*",
           f"hydra.run.dir={tmp_path / 'compare'}"]  # fmt: skip
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    table = (tmp_path / "compare" / "table1.csv").read_text().splitlines()
    assert table[0] == "strategy,modality,layers,anchor,Score,ES,PS,NS"
    assert [r.split(",")[:3] for r in table[1:]] == [
        ["Baseline (unedited)", "-", "-"],
        ["facts_ft_both", "cross-modal", "audio -1; text 1"],
        ["facts_rome_cross", "cross-modal", "audio -1; text 1"],
    ]


def test_an_accumulating_run_resumes_to_the_same_readings(shipped_lalm, pool, data, facts, tmp_path):
    """A multi-layer run cut after its first fact resumes: the first edit is re-applied (not
    re-scored) and the later facts are scored as an uninterrupted run scores them; the same folder
    is refused to a run that resets instead."""
    from evaluation.run import RunMismatch

    fabric = Fabric(accelerator="cpu", devices=1)
    editor = configured("facts_alphaedit_cross", shipped_lalm, pool, *SMALL)
    selection = {"name": "f", "split": "test", "selection": {"facts": 3}, "anchor": "first_subject"}
    ident = {"editor": {"name": "x"}, "model": {"name": "t"}, "judge": {"name": "lp"}, "data": selection}

    def run(accumulate=True):
        sweep = fact_sweep.FactSweep(shipped_lalm, editor, data, accumulate=accumulate, batch_size=16)
        return fact_sweep.run(fabric, sweep, facts, tmp_path, {**ident, "sweeps": {"accumulate": accumulate}})

    first = run()
    whole = (tmp_path / "facts.jsonl").read_text().splitlines()
    assert first["accumulate"] and len(whole) == 3
    (tmp_path / "facts.jsonl").write_text(whole[0] + "\n")
    again = run()
    lines = (tmp_path / "facts.jsonl").read_text().splitlines()
    assert [json.loads(x)["readings"] for x in lines] == [json.loads(x)["readings"] for x in whole]
    assert again["edited"] == first["edited"]
    with pytest.raises(RunMismatch, match="accumulate"):
        run(accumulate=False)


@pytest.mark.slow
@pytest.mark.parametrize(
    "editor",
    ["facts_rome_audio", "facts_rome_text", "facts_alphaedit_audio", "facts_alphaedit_text",
     "facts_ft_audio", "facts_ft_text"],
)  # fmt: skip
def test_evaluate_py_runs_every_other_strategy(world, mini_dir, tmp_path, editor):
    small = () if "_ft_" in editor else SMALL
    _evaluate(world, mini_dir, tmp_path / editor, f"editor={editor}", *small)
    m = json.loads((tmp_path / editor / "metrics.json").read_text())
    assert m["edited"]["ES_edits"] == 3 and m["accumulate"] == ("alphaedit" in editor)


def _fake_run(folder: Path, name: str, hparams: dict, anchor: str, score: float) -> None:
    folder.mkdir(parents=True)
    figures = {"Score": score, "ES": score, "PS": score, "NS": score, "ES_edits": 3}
    ident = {"editor": {"name": name, "config": {"method": "editors.rome.ROME", "hparams": hparams}},
             "model": {"name": "tiny", "fingerprint": "f"},
             "data": {"name": "spoken_facts", "split": "test", "content": "c", "selection": {"facts": 3},
                      "anchor": anchor}}  # fmt: skip
    baseline = {**figures, "Score": 1.0}
    metrics = {"study": "spoken_facts", "baseline": baseline, "edited": figures, "identity": ident}
    (folder / "metrics.json").write_text(json.dumps(metrics))


def test_table2_ranks_each_strategys_layers_per_anchor(tmp_path):
    scores = {("first_subject", 0): 40.0, ("first_subject", 1): 60.0, ("first_subject", 2): 50.0,
              ("last_subject", 0): 70.0, ("last_subject", 1): 20.0}  # fmt: skip
    for (anchor, layer), score in scores.items():
        sites = [f"audio.layers.{layer}.fc2"]
        _fake_run(tmp_path / "runs" / f"{anchor}{layer}", "facts_rome_audio", {"sites": sites}, anchor, score)
    _fake_run(tmp_path / "runs" / "multi", "facts_alphaedit_text", {"layers": [1, 2], "audio_layers": []},
              "first_subject", 90.0)  # fmt: skip
    runs = fact_compare.find_fact_runs(str(tmp_path / "runs" / "*"))
    assert fact_compare.table2_rows(runs) == [
        ["facts_rome_audio", "audio", "first_subject", "1 (60.00)", "2 (50.00)", "0 (40.00)"],
        ["facts_rome_audio", "audio", "last_subject", "0 (70.00)", "1 (20.00)", "-"],
    ]
    rows = fact_compare.table1_rows(runs)
    assert rows[0][:1] == ["Baseline (unedited)"] and ["facts_alphaedit_text", "text", "text 1,2"] in [
        r[:3] for r in rows
    ]
    assert fact_compare.edited_layers({"sites": ["audio.layers.-1.fc2", "llm.layers.3.mlp.down_proj"]}) == {
        "audio": [-1],
        "text": [3],
    }
    _fake_run(tmp_path / "other", "x", {"sites": []}, "first_subject", 1.0)
    other = json.loads((tmp_path / "other" / "metrics.json").read_text())
    other["identity"]["data"]["content"] = "d"
    (tmp_path / "other" / "metrics.json").write_text(json.dumps(other))
    with pytest.raises(ValueError, match="score different facts"):
        fact_compare.run([*runs, *fact_compare.find_fact_runs(str(tmp_path / "other"))], tmp_path / "out")


def test_pretraining_teaches_the_facts_from_their_renditions(world, mini_dir):
    from datamodules.pretrain import PretrainDataModule

    a, _ = world
    dm = PretrainDataModule(
        root=str(mini_dir), mini_seed=0, batch_size=4, steps=3, val_examples=8, holdout=0.25, seed=0,
        mix={"fact": 1.0}, attribute_mix={"gender": 1.0}, portability_mix={"gender": 1.0},
        facts={"root": str(a), "mini_seed": 3, "instruction": INSTRUCTION,
               "transcribe": "Repeat the sentence you hear."},
    )  # fmt: skip
    dm.setup()
    taught = [json.loads(x) for x in (a / "pretrain.jsonl").read_text().splitlines()]
    train, val = dm.train_set.facts, dm.val_set.facts
    assert len(train) + len(val) == len(taught) and not {t.audio for t in train} & {t.audio for t in val}
    scored = SpokenFactsData(str(a), "s", INSTRUCTION).facts("test")
    test_clips = {p.audio for f in scored for p in f.prompts()}
    assert not {t["audio"] for t in taught} & test_clips  # never the clips the facts are scored on
    for i in range(6):
        ex = dm.val_set[i]
        assert ex.task == "fact" and ex.prompt.question == INSTRUCTION
        match = [t for t in val if np.array_equal(dm.val_set.fact_waves[t.audio], ex.prompt.audio)]
        assert match and ex.answer == match[0].object and ex.attribute == match[0].relation
    said = type(dm.train_set)(
        [], {}, {"attributes": {}}, length=4, seed=0, mix={"transcribe": 1.0}, attribute_mix={},
        portability_mix={}, augment=False, facts=val, fact_waves=dm.val_set.fact_waves,
        transcribe_instruction="Repeat the sentence you hear.",
    )  # fmt: skip
    texts = {t["audio"]: t["text"] for t in taught}
    for i in range(4):  # transcription: a rendition's own words
        ex = said[i]
        match = [t for t in val if np.array_equal(dm.val_set.fact_waves[t.audio], ex.prompt.audio)]
        assert ex.task == "transcribe" and ex.prompt.question == "Repeat the sentence you hear."
        assert match and ex.answer == texts[match[0].audio] == match[0].text
    with pytest.raises(ValueError, match="missing transcribe"):
        PretrainDataModule(
            root=str(mini_dir), mini_seed=0, batch_size=4, steps=3, val_examples=8, holdout=0.25, seed=0,
            mix={"fact": 1.0}, attribute_mix={}, portability_mix={},
            facts={"root": str(a), "mini_seed": 3, "instruction": INSTRUCTION},
        )  # fmt: skip
    with pytest.raises(ValueError, match="no spoken facts"):
        type(dm.train_set)([], {}, {"attributes": {}}, length=1, seed=0, mix={"fact": 1.0},
                            attribute_mix={}, portability_mix={}, augment=False)  # fmt: skip


def test_the_facts_recipe_continues_a_trained_model_on_facts_and_sake(world, mini_dir, tmp_path):
    """experiment=pretrain_tiny_facts (the shipped model's second stage) starts from model.path's
    weights, not a fresh model, mixes the fact task with SAKE-mini's, and exports."""
    from safetensors.torch import load_file

    a, _ = world
    start, run = ROOT / "checkpoints" / "tiny-lalm", tmp_path / "run"
    out = subprocess.run(
        [sys.executable, "train.py", "experiment=pretrain_tiny_facts", f"model.path={start}",
         f"data.root={mini_dir}", f"data.facts.root={a}", "data.facts.mini_seed=3", "data.steps=3",
         "data.batch_size=8", "data.val_examples=32", "trainer.val_check_interval=3", f"hydra.run.dir={run}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = json.loads((run / "tiny-lalm" / "training.json").read_text())["metrics"]
    assert {"val/acc_fact", "val/acc_attribute", "val/acc_portability"} <= set(metrics)
    before, after = load_file(start / "model.safetensors"), load_file(run / "tiny-lalm" / "model.safetensors")
    assert before.keys() == after.keys()
    moved = [(after[k] - before[k]).abs().max().item() for k in before]
    assert 0 < max(moved) < 0.05  # three small steps away from the trained weights, not a new model
    assert (run / "tiny-lalm" / "tokenizer.json").read_bytes() == (start / "tokenizer.json").read_bytes()
