"""Spoken facts (datamodules/spoken_facts.py, datamodules/mini/facts.py) and the study's editing
metrics (evaluation/fact_metrics.py): the manifest's schema and its errors, espeak-ng's word
times, the deterministic offline world, and ES/PS/NS/Score on hand-made logits."""

from __future__ import annotations

import copy
import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from datamodules.mini.facts import subject_words
from datamodules.mini.speech import Espeak, Voice
from datamodules.spoken_facts import FactError, check, load_manifest, parse_fact
from evaluation.fact_metrics import Reading, fact_metrics, harmonic_mean, object_scores
from lalms.base import IGNORE_INDEX

ROOT = Path(__file__).resolve().parents[1]


def prompt(text, subject_span, times=None):
    words = text.split()
    times = times or [(0.3 * i, 0.3 * (i + 1)) for i in range(len(words))]
    return {
        "text": text,
        "audio": "a.wav",
        "subject_words": list(subject_span),
        "words": [{"word": w, "start": s, "end": e} for w, (s, e) in zip(words, times, strict=True)],
    }


RECORD = {
    "id": "f1",
    "subject": "Veltran Osk",
    "relation": "native_language",
    "object": "German",
    "target": "Korean",
    "prompt": prompt("Veltran Osk's native language is", (0, 1)),
    "paraphrases": [prompt("The mother tongue of Veltran Osk is", (4, 5))],
    "neighbours": [
        {"subject": "Mira Tes", "object": "German", "prompt": prompt("Mira Tes's native language is", (0, 1))}
    ],
}


def test_a_record_parses_with_its_anchors_and_subject_span():
    fact = parse_fact(RECORD, "m.jsonl", 3)
    assert fact.editable and fact.line == 3
    assert fact.prompt.anchor("first_subject").text == "Veltran"
    assert fact.prompt.anchor("last_subject").text == "Osk's"
    assert fact.prompt.anchor("last_word").text == "is"
    assert fact.prompt.subject_span == (0.0, 0.6)
    assert fact.paraphrases[0].subject == (4, 5)
    assert [p.text for p in fact.prompts()][-1] == "Mira Tes's native language is"
    trace_only = {k: v for k, v in RECORD.items() if k not in ("target", "paraphrases", "neighbours")}
    assert not parse_fact(trace_only, "m.jsonl", 1).editable


def broken(change):
    rec = copy.deepcopy(RECORD)
    change(rec)
    return rec


@pytest.mark.parametrize(
    "change, field, says",
    [
        (lambda r: r.pop("subject"), "subject", "missing"),
        (lambda r: r.update(target="german"), "target", "equals the object"),
        (lambda r: r["prompt"].update(subject_words=[1, 2]), "prompt.subject_words", "not the subject"),
        (lambda r: r["prompt"].update(subject_words=[0, 2]), "prompt.subject_words", "not the subject"),
        (lambda r: r["prompt"].update(subject_words=[0, 9]), "prompt.subject_words", "is not a span"),
        (lambda r: r["prompt"]["words"][2].update(start=0.1), "prompt.words[2].start", "before the previous"),
        (lambda r: r["prompt"]["words"][1].update(end=0.1), "prompt.words[1]", "start <= end"),
        (lambda r: r["paraphrases"][0].pop("audio"), "paraphrases[0].audio", "missing"),
        (lambda r: r["neighbours"][0].update(subject="veltran  osk"), "neighbours[0].subject", "own subject"),
        (lambda r: r["neighbours"][0].pop("prompt"), "neighbours[0].prompt", "missing"),
    ],
)
def test_bad_records_name_file_line_and_field(change, field, says):
    with pytest.raises(FactError) as err:
        parse_fact(broken(change), "facts.jsonl", 7)
    assert err.value.field == field and err.value.line == 7
    assert str(err.value).startswith(f"facts.jsonl: line 7: field '{field}'") and says in str(err.value)


def test_manifest_lines_invalid_json_and_duplicate_ids(tmp_path):
    path = tmp_path / "m.jsonl"
    other = dict(copy.deepcopy(RECORD), id="f2")
    path.write_text(json.dumps(RECORD) + "\n\n" + json.dumps(other) + "\n", encoding="utf-8")
    assert [(f.id, f.line) for f in load_manifest(path)] == [("f1", 1), ("f2", 3)]
    path.write_text(json.dumps(RECORD) + "\n" + json.dumps(RECORD) + "\n", encoding="utf-8")
    with pytest.raises(FactError, match=r"line 2: field 'id': 'f1' is already the id of line 1"):
        load_manifest(path)
    path.write_text(json.dumps(RECORD) + "\n{oops\n", encoding="utf-8")
    with pytest.raises(FactError, match=r"m.jsonl: line 2: field '<line>': not valid JSON"):
        load_manifest(path)


def test_espeak_word_times_tile_the_utterance():
    engine, voice = Espeak(), Voice("en", "m3")
    alone, _ = engine.say_words("Kabel", voice)
    wave, words = engine.say_words("Kabel Dortes, is it", voice)
    assert [w for w, _, _ in words] == ["Kabel", "Dortes,", "is", "it"]
    assert words[0][1] == 0.0 and math.isclose(words[-1][2], len(wave) / 16000, abs_tol=1e-3)
    assert all(s < e for _, s, e in words) and all(
        a[2] == b[1] for a, b in zip(words, words[1:], strict=False)
    )
    # the second word starts where the first, spoken alone, would be nearly over
    assert 0.6 * len(alone) / 16000 < words[1][1] < len(alone) / 16000


def test_subject_words_finds_the_span():
    assert subject_words("Growing up, Nu Bel spoke", "Nu Bel") == [2, 3]
    assert subject_words("Nu Bel's pet is a", "Nu Bel") == [0, 1]
    with pytest.raises(ValueError, match="not in"):
        subject_words("The pet is a", "Nu Bel")


def test_the_offline_world_is_deterministic_and_checks_clean(world, capsys):
    """Built twice, in processes whose string hashing differs (conftest.py: world): the same
    manifests and renditions (subject names once came out in a set's order)."""
    a, b = world
    for name in ("val.jsonl", "test.jsonl", "pretrain.jsonl"):
        assert (a / name).read_text() == (b / name).read_text()
    for split in ("val", "test"):
        assert check(a / f"{split}.jsonl") == 0
    assert "0 problems" in capsys.readouterr().out
    facts = load_manifest(a / "test.jsonl")
    assert len(facts) == 12 and {f.relation for f in facts} == {"native_language", "pet", "mood"}
    for f in facts:
        assert f.editable and len(f.paraphrases) == 2
        assert all(n.object == f.object for n in f.neighbours)  # CounterFact's neighbourhood
        assert {n.prompt.audio for n in f.neighbours} <= {g.prompt.audio for g in facts}


def test_check_on_the_command_line_names_the_bad_record(world, tmp_path):
    a, _ = world
    lines = (a / "test.jsonl").read_text().splitlines()
    rec = json.loads(lines[1])
    rec["prompt"]["subject_words"] = [5, 1]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join([lines[0], json.dumps(rec), *lines[2:]]) + "\n")

    def run(*args):
        cmd = [sys.executable, "-m", "datamodules.spoken_facts", "check", *args]
        return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)

    out = run(str(bad), "--audio-root", str(a))
    assert out.returncode == 2 and f"{bad}: line 2: field 'prompt.subject_words'" in out.stderr
    (tmp_path / "audio").mkdir()
    out = run(str(a / "test.jsonl"), "--audio-root", str(tmp_path))
    assert out.returncode == 1 and "no such audio file" in out.stdout


def test_object_scores_on_hand_made_logits():
    """Row 0 labels tokens 1, 2 and the turn end 3; row 1 token 3 and the turn end 4. Logits at
    position t predict the token at t + 1; the turn end is left out of the score."""
    logits = torch.full((2, 4, 5), -1e4)
    logits[0, 0, 1] = logits[0, 1, 2] = 0.0  # certain of 1 then 2
    logits[0, 2, :] = 0.0  # the turn end: uniform (would cost log 5 if it counted)
    logits[1, 1, :4] = 0.0  # uniform over 4 for the object's one token
    labels = torch.tensor([[IGNORE_INDEX, 1, 2, 3], [IGNORE_INDEX, IGNORE_INDEX, 3, 4]])
    scores = object_scores(logits, labels, suffix=1)
    assert torch.allclose(scores, torch.tensor([0.0, -math.log(4)]), atol=1e-5)
    assert object_scores(logits, labels, suffix=0)[0] == pytest.approx(-math.log(5) / 3, abs=1e-4)
    with pytest.raises(ValueError, match="without tokens of its own"):
        object_scores(logits, labels, suffix=2)


def test_es_ps_ns_and_the_harmonic_score():
    readings = [
        Reading("a", "prompt", -1.0, -2.0, known=False),  # target wins: efficacy
        Reading("b", "prompt", -3.0, -2.0, known=True),
        Reading("a", "paraphrase", -1.0, -2.0),
        Reading("a", "paraphrase", -3.0, -2.0),  # a: 1 of 2
        Reading("b", "paraphrase", -1.0, -2.0),  # b: 1 of 1
        Reading("a", "neighbour", -1.0, -2.0),  # the edit spilled over: failure
        Reading("b", "neighbour", -3.0, -2.0),
    ]
    m = fact_metrics(readings)
    assert (m["ES"], m["PS"], m["NS"]) == (50.0, 75.0, 50.0) and m["PS_edits"] == 2
    assert m["known"] == 50.0 and fact_metrics(readings[2:])["known"] is None
    assert math.isclose(m["Score"], 3 / (1 / 50 + 1 / 75 + 1 / 50))
    assert round(harmonic_mean([20.4, 24.4, 76.18]), 2) == 29.09  # the study's Table 1, Baseline
    assert fact_metrics(readings[:2])["Score"] is None and harmonic_mean([0.0, 50.0]) == 0.0
    with pytest.raises(ValueError, match="unknown prompt kind"):
        Reading("a", "other", 0.0, 0.0)


def test_the_guessing_bar_answers_each_relations_commonest_object():
    from evaluation.fact_sweep import baseline_metrics, known_by_guessing

    def record(i, relation, obj, known):
        reading = {"edit": str(i), "kind": "prompt", "target": -2.0, "true": -1.0, "known": known}
        return {"id": str(i), "relation": relation, "object": obj, "readings": [reading]}

    records = [record(0, "pet", "dog", True), record(1, "pet", "dog", False), record(2, "pet", "cat", False),
               record(3, "mood", "sad", True)]  # fmt: skip
    assert known_by_guessing(records) == 75.0  # "dog" for pets (2 of 3), "sad" for moods (1 of 1)
    m = baseline_metrics(records)
    assert m["baseline"]["known"] == 50.0 and m["baseline"]["known_by_guessing"] == 75.0
    assert m["baseline_per_relation"]["pet"]["known_by_guessing"] == 100 * 2 / 3
    unread = [{**r, "readings": [{**r["readings"][0], "known": None}]} for r in records]
    assert known_by_guessing(unread) is None


def test_trace_py_on_spoken_facts_corrupts_the_subject_and_groups_by_word(world, tmp_path):
    """`python trace.py data=spoken_facts` end to end (the small test world's subjects are not
    the ones the tiny model learnt, so every fact is traced: known_only=false)."""
    a, _ = world
    out = tmp_path / "trace"
    cmd = [sys.executable, "trace.py", "data=spoken_facts", f"data.root={a}", "data.build_mini=false",
           "analysis.run.samples=1", "analysis.run.known_only=false", "analysis.run.min_drop=0",
           f"hydra.run.dir={out}"]  # fmt: skip
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    info = json.loads((out / "trace.json").read_text())
    assert info["samples"] + info["skipped_robust"] == 3 and info["skipped_wrong"] == 0
    assert info["samples"] >= 1 and info["settings"]["corrupt_at"] == "audio_conv"
    groups = {(r["tower"], r["group"]) for r in csv.DictReader(open(out / "trace.csv"))}
    anchors = {"first_subject", "last_subject", "last_word"}
    assert groups == {(t, g) for t in ("audio", "llm") for g in anchors} | {("llm", "last")}
    assert (out / "trace_audio.png").is_file() and (out / "trace_llm.png").is_file()


def test_fact_readings_batched_equal_each_answer_scored_by_hand(world, shipped_lalm):
    """Every reading's two scores are the mean log-probabilities of the answer's own tokens, as
    a forward on the prompt followed by those tokens gives them (no batching, no padding)."""
    from datamodules.spoken_facts import SpokenFactsData
    from evaluation.fact_eval import fact_readings, jobs

    a, _ = world
    data = SpokenFactsData(str(a), "spoken_facts", "Complete the sentence you hear.")
    facts = data.facts("test")[:2]
    readings = fact_readings(shipped_lalm, data, facts, batch_size=4)
    todo = jobs(facts)
    assert [(r.edit, r.kind) for r in readings] == [(f.id, k) for f, k, _, _ in todo]
    assert [r.kind for r in readings[:3]] == ["prompt", "paraphrase", "paraphrase"]

    def by_hand(spoken, answer):
        batch = shipped_lalm.encode([data.prompt(spoken)])
        ids = torch.tensor([shipped_lalm.tokenizer(answer, add_special_tokens=False).input_ids])
        n = batch["input_ids"].shape[1]
        batch["input_ids"] = torch.cat([batch["input_ids"], ids], 1)
        batch["attention_mask"] = torch.cat([batch["attention_mask"], torch.ones_like(ids)], 1)
        with torch.no_grad():
            lp = shipped_lalm.logits(batch)[0].float().log_softmax(-1)
        return float(sum(lp[n - 1 + i, t] for i, t in enumerate(ids[0].tolist())) / ids.shape[1])

    for r, (fact, _, spoken, true) in zip(readings, todo, strict=True):
        assert r.target == pytest.approx(by_hand(spoken, fact.target), abs=1e-4)
        assert r.true == pytest.approx(by_hand(spoken, true), abs=1e-4)
    m = fact_metrics(readings)
    assert m["ES_edits"] == 2 and m["NS_edits"] == sum(bool(f.neighbours) for f in facts)
