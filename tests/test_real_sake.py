"""The real SAKE release, through its verbatim sample in ../shared/data/sake-sample: option
phrasings of the general-audio tasks, label-id answers, the train/validation overlap, missing
and re-encoded audio, and train.py / evaluate.py end to end on real-schema data."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from datamodules import SakeData, SakeDataModule, parse_options, resolve_answer
from datamodules.audio_io import AudioResolver
from datamodules.availability import MissingAudioError
from datamodules.loader import VAL_FILE
from datamodules.options import option_letters
from datamodules.sake import main as sake_main
from evaluation.judges.base import CorrectnessCase
from evaluation.judges.rule import RuleJudge

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT.parent / "shared" / "data" / "sake-sample"
pytestmark = pytest.mark.skipif(not SAMPLE.is_dir(), reason="no ../shared/data/sake-sample beside the repo")


def general_audio(data: SakeData):
    return [q for inst in data.test for q in inst.audio_locality if q.track.startswith("DynamicSuperb/")]


def write_clips(instances, audio_root: Path, seed: int = 0) -> int:
    """A short synthetic clip at every file name the instances reference, in per-track folders;
    every 7th as FLAC at 44.1 kHz under the same stem (as a re-encoded download would be)."""
    rng = np.random.default_rng(seed)
    refs = sorted({(q.file, q.track) for inst in instances for q in inst.queries() if q.file})
    for n, (file, track) in enumerate(refs):
        folder = audio_root / track
        folder.mkdir(parents=True, exist_ok=True)
        rate = 44100 if n % 7 == 0 else 16000
        t = np.arange(int(0.6 * rate)) / rate
        wave = 0.2 * np.sin(2 * np.pi * rng.uniform(100, 2000) * t) + 0.02 * rng.standard_normal(len(t))
        name = Path(file).stem + ".flac" if n % 7 == 0 else file
        sf.write(folder / name, wave.astype(np.float32), rate)
    return len(refs)


@pytest.fixture(scope="module")
def real_dir(tmp_path_factory):
    """The sample's JSON as is, plus generated clips at the names it references."""
    root = tmp_path_factory.mktemp("sake") / "SAKE"
    shutil.copytree(SAMPLE, root / "data", ignore=shutil.ignore_patterns("README.md"))
    data = SakeData.load(root)
    write_clips([i for split in data.splits().values() for i in split], root / "audio")
    return root


# ------------------------------------------------------------------ options and answers
def test_every_general_audio_question_of_the_sample_has_readable_options():
    queries = general_audio(SakeData.load(SAMPLE))
    assert len({q.track for q in queries}) == 30  # every Dynamic-SUPERB task of the test split
    assert all(len(q.options) >= 2 for q in queries)
    unresolved = {q.answer for q in queries if q.truth is None}
    # The two answers that name no option in the release itself: a key the question omits and a
    # reply ("<silence>") that question does not offer.
    assert unresolved == {"Bb minor", "<silence>"}


@pytest.mark.parametrize(
    ("question", "options"),
    [
        ("Is it spoofed? The answer could be spoofed or authentic.", ("spoofed", "authentic")),
        ("Pick one from the following: close, mid, or open.", ("close", "mid", "open")),
        ("Name the tonic. Choices: e, csh, b.", ("e", "csh", "b")),
        ("Is it belt, lip trill, or vocal fry?", ("belt", "lip trill", "vocal fry")),
        ("Label the stroke as 'dhin', 'cha', or 'thi'.", ("dhin", "cha", "thi")),
        ("Which category\u2014Bangu, Naobo, or Daluo\u2014does it fall into?", ("Bangu", "Naobo", "Daluo")),
        (
            "Is it from an acoustic, electronic, or synthetic instrument?",
            ("acoustic", "electronic", "synthetic"),
        ),
        (
            "Groups: Teenager (below 20), Young adult (20-39), and Elderly adult (60+). Which one?",
            ("Teenager (below 20)", "Young adult (20-39)", "Elderly adult (60+)"),
        ),
        (
            "Convert the word into the list: up, down and on. If it is not there, respond with <unknown>.",
            ("up", "down", "on", "<unknown>"),
        ),
        (
            "Based on the list rock, jazz, pop, choose one or more genres that describe this music.",
            ("rock", "jazz", "pop"),
        ),
        (
            "Sounds such as crying baby, snoring, or drinking or sipping.",
            ("crying baby", "snoring", "drinking or sipping"),
        ),
        (
            "Choose the reply. (A) Sure, why not.\n(B) No, thanks. (C) Maybe later.",
            ("Sure, why not.", "No, thanks.", "Maybe later."),
        ),
        ("Describe what you hear in this recording.", ()),
    ],
)
def test_prose_options_are_read_by_general_rules(question, options):
    assert parse_options(question) == options


@pytest.mark.parametrize(
    ("answer", "options", "question", "meant"),
    [
        ("vocal_fry", ("belt", "vocal fry"), "", "vocal fry"),
        ("elderly_adult", ("Teenager", "Elderly adult (60+)"), "", "Elderly adult (60+)"),
        ("middle_aged_adult", ("Middle-aged adult", "Young adult"), "", "Middle-aged adult"),
        ("daluo", ("Bangu", "Daluo"), "", "Daluo"),
        ("C", ("Yes.", "No.", "Hold on."), "Reply. (A) Yes.\n(B) No.\n(C) Hold on.", "Hold on."),
        ("crying", ("breath", "cry", "laugh"), "", "cry"),
        ("healthy", ("healthy voice", "flux laryngitis"), "", "healthy voice"),
        ("Bb minor", ("A minor", "B minor"), "", None),
        ("C", ("Yes.", "No.", "Hold on."), "", None),  # no letters in the question
    ],
)
def test_label_ids_map_onto_the_option_they_mean(answer, options, question, meant):
    assert resolve_answer(answer, options, question) == meant


def test_the_rule_judge_scores_label_id_answers_of_the_sample():
    """Every sample query whose answer is a label id (not an option's text): a response giving
    the option's wording is correct, one giving another option is not."""
    judge = RuleJudge()
    queries = [q for q in general_audio(SakeData.load(SAMPLE)) if q.truth and q.truth != q.answer]
    assert any(option_letters(q.question) for q in queries) and any("_" in q.answer for q in queries)
    right = [CorrectnessCase(q.question, q.options, q.answer, f"It is {q.truth}.") for q in queries]
    other = [next(o for o in q.options if o != q.truth) for q in queries]
    wrong = [CorrectnessCase(q.question, q.options, q.answer, o) for q, o in zip(queries, other, strict=True)]
    assert all(j.verdict for j in judge.correctness(right))
    assert not any(j.verdict for j in judge.correctness(wrong))
    letter = [q for q in queries if option_letters(q.question)][0]
    case = CorrectnessCase(letter.question, letter.options, letter.answer, letter.answer)
    assert judge.correctness([case])[0].verdict


# ------------------------------------------------------------------ check and the loader
def test_check_passes_on_the_sample_and_reports_options_per_track(capsys):
    assert sake_main(["check", str(SAMPLE)]) == 0
    out = capsys.readouterr().out
    assert "test           142 instances" in out and "sequences  2 of lengths [10]" in out
    row = next(line for line in out.splitlines() if "MARBLEVocalTechniqueDetection" in line)
    assert row.split()[-3:] == ["10", "10", "10"]


def test_validation_edits_are_left_out_of_the_train_split(tmp_path, capsys):
    """As in the real release: ALL_val.json repeats records of the attribute files."""
    shutil.copytree(SAMPLE, tmp_path / "data", ignore=shutil.ignore_patterns("README.md"))
    val = json.loads((tmp_path / "data" / VAL_FILE).read_text())
    for record in val:
        path = tmp_path / "data" / "train" / f"{record['track']}.json"
        train = json.loads(path.read_text())
        path.write_text(json.dumps(train + [{k: v for k, v in record.items() if k != "track"}]))
    data = SakeData.load(tmp_path)
    assert (len(data.train), len(data.val), data.overlap) == (24, 6, 6)
    assert not {(i.file, i.target) for i in data.train} & {(i.file, i.target) for i in data.val}
    assert sake_main(["check", str(tmp_path)]) == 0
    assert "6 records left out: they are validation edits" in capsys.readouterr().out
    stream = SakeDataModule(str(tmp_path), audio_root=str(tmp_path), num_workers=0).dataset("train")
    assert sum(1 for _ in stream.stream) == 24


def test_a_record_missing_a_field_is_still_an_error(tmp_path, capsys):
    shutil.copytree(SAMPLE, tmp_path / "data", ignore=shutil.ignore_patterns("README.md"))
    path = tmp_path / "data" / "test" / "single_editing" / "Animal.json"
    records = json.loads(path.read_text())
    del records[2]["locality"]["audio"][3]["question"]
    path.write_text(json.dumps(records))
    assert sake_main(["check", str(tmp_path)]) == 2
    assert f"{path}: record 2: field 'locality.audio[3].question': missing" in capsys.readouterr().err


def test_clips_are_found_under_other_extensions(tmp_path):
    (tmp_path / "Animal").mkdir()
    sf.write(tmp_path / "Animal" / "cow_1.flac", np.zeros(1600, np.float32), 16000)
    assert AudioResolver(tmp_path).path("cow_1.wav", "Animal") == tmp_path / "Animal" / "cow_1.flac"


def test_missing_clips_stop_a_run_or_are_skipped_and_counted(real_dir, tmp_path, capsys):
    audio = tmp_path / "audio"
    shutil.copytree(real_dir / "audio", audio)
    data = SakeData.load(real_dir)
    edit = data.test[0].reliability
    general = next(q for q in data.test[1].audio_locality if q.track.startswith("DynamicSuperb/"))
    for q in (edit, general):
        AudioResolver(audio).path(q.file, q.track).unlink()
    assert sake_main(["check", str(real_dir), "--audio-root", str(audio), "--no-decode"]) == 1
    out = capsys.readouterr().out
    assert f"missing {general.track}: 1" in out and f"missing {edit.track}: 1" in out
    strict = SakeDataModule(str(real_dir), audio_root=str(audio))
    with pytest.raises(MissingAudioError, match=r"needs 2 clips missing .*data.skip_missing_audio=true"):
        strict.eval_instances()
    lenient = SakeDataModule(str(real_dir), audio_root=str(audio), skip_missing_audio=True)
    kept = lenient.eval_instances()
    assert len(kept) == len(data.test) - 1
    report = lenient.report()["missing_audio"]["test"]
    assert report["clips"] == 2 and report["instances_dropped"] == 1 and report["queries_dropped"] >= 10


# ------------------------------------------------------------------ the entry points
def run(script: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PROJECT_ROOT": str(ROOT)}
    out = subprocess.run(
        [sys.executable, script, *args], cwd=ROOT, capture_output=True, text=True, env=env, timeout=900
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def test_train_and_evaluate_run_on_real_schema_data(real_dir, tmp_path):
    data = ["data=sake", f"data.root={real_dir}", f"data.audio_root={real_dir / 'audio'}"]
    run(
        "train.py", "editor=mend", *data, "data.batch_size=2", "+trainer.max_steps=3",
        "+trainer.limit_val_batches=1", "editor.hparams.rank=16",
        f"editor.callbacks.export.out_dir={tmp_path / 'mend'}", f"hydra.run.dir={tmp_path / 'train'}",
    )  # fmt: skip
    assert (tmp_path / "mend" / "editor.safetensors").is_file()
    run(
        "evaluate.py", "editor=ft_llm", *data, "data.max_instances=4", "max_new_tokens=6",
        f"response_cache={tmp_path / 'cache.sqlite'}", f"hydra.run.dir={tmp_path / 'eval'}",
    )  # fmt: skip
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["counts"]["single"]["reliability"] == 4
    assert metrics["counts"]["single"]["audio_locality"] > 0 and metrics["sequential"]
    lines = [json.loads(x) for x in (tmp_path / "eval" / "single" / "results.jsonl").read_text().splitlines()]
    general = [q for r in lines for q in r["queries"] if (q["track"] or "").startswith("DynamicSuperb/")]
    assert general and all(q["options"] for q in general)
