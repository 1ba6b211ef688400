"""Option parsing, the loader round trip, and `check` on malformed files."""

import json
import re

import pytest

from datamodules import SakeData, SchemaError, load_file, parse_options
from datamodules.sake import main as sake_main
from datamodules.schema import instance_to_json, norm_label

from .conftest import SMALL_MINI


@pytest.mark.parametrize(
    ("question", "options"),
    [
        ("Which animal?\n\nOptions:\ndog\ncat\nfrog", ("dog", "cat", "frog")),
        ("Which animal?\n\nOptions:\n dog \n\ncat\n", ("dog", "cat")),
        ("How many beeps? The answer could be one, two, three, or four.", ("one", "two", "three", "four")),
        ("Is it noise? The answer could be noise or tone.", ("noise", "tone")),
        ("Rising?\nThe answer could be rising, falling", ("rising", "falling")),
        ("Title?\n\nOptions:\nMr.\nMs.", ("Mr.", "Ms.")),
        ("No options here.", ()),
    ],
)
def test_options_are_parsed_from_both_question_styles(question, options):
    assert parse_options(question) == options


def test_labels_compare_case_insensitively():
    assert norm_label(" Male") == norm_label("male")


def test_loader_round_trip_on_a_built_set(mini_dir):
    data = SakeData.load(mini_dir)
    assert len(data.train) == 4 * SMALL_MINI["train_per_attribute"]
    assert len(data.val) == 4 * SMALL_MINI["val_per_attribute"]
    assert len(data.test) == 4 * SMALL_MINI["test_per_attribute"]
    assert [len(s) for s in data.sequences] == [SMALL_MINI["sequence_length"]] * SMALL_MINI["sequences"]
    for inst in data.train + data.test:
        assert instance_to_json(inst) == {k: v for k, v in inst.raw.items() if k != "track"}
    inst = data.test[0]
    assert [q.type for q in inst.generality] == [1, 2, 3]
    expected = [1, 3, 4] if inst.attribute == "gender" else [1, 2, 3, 4]
    assert [q.type for q in inst.audio_locality] == expected
    assert inst.portability and inst.portability[0].category
    assert all(q.options for q in inst.queries())
    assert all(q.file is None for q in inst.text_locality)
    assert inst.reliability.track == inst.attribute.capitalize()
    assert all(not i.portability for i in data.train)


def test_check_reports_expected_counts(mini_dir, capsys):
    assert sake_main(["check", str(mini_dir), "--audio-root", str(mini_dir / "audio")]) == 0
    out = capsys.readouterr().out
    assert re.search(rf"^train +{4 * SMALL_MINI['train_per_attribute']} instances", out, re.M)
    assert re.search(rf"^test +{4 * SMALL_MINI['test_per_attribute']} instances", out, re.M)
    assert re.search(r"audio: \d+ clips referenced, 0 missing, 0 unreadable", out)


def corrupt(mini_dir, tmp_path, mutate):
    """A copy of the Gender train file with one record mutated."""
    records = json.loads((mini_dir / "data/train/Gender.json").read_text())
    mutate(records)
    (tmp_path / "train").mkdir()
    path = tmp_path / "train" / "Gender.json"
    path.write_text(json.dumps(records))
    return path


@pytest.mark.parametrize(
    ("mutate", "field", "problem"),
    [
        (lambda r: r[3].pop("edited_answer"), "edited_answer", "missing"),
        (lambda r: r[3]["generality"].pop(), "generality", "expected 3 entries"),
        (
            lambda r: r[3]["locality"]["audio"].append(r[3]["locality"]["audio"][0]),
            "locality.audio",
            "expected 3 entries",
        ),
        (
            lambda r: r[3]["generality"][1].update(question="Which?"),
            "generality[1].question",
            "lists no options",
        ),
        (
            lambda r: r[3]["locality"]["text"][0].update(answer=7),
            "locality.text[0].answer",
            "expected a non-empty str",
        ),
        (lambda r: r[3].update(edited_answer=r[3]["original_answer"].upper()), "edited_answer", "equals"),
    ],
)
def test_schema_errors_name_file_record_and_field(mini_dir, tmp_path, capsys, mutate, field, problem):
    path = corrupt(mini_dir, tmp_path, mutate)
    with pytest.raises(SchemaError) as err:
        load_file(path)
    assert (err.value.source, err.value.index, err.value.field) == (str(path), 3, field)
    assert problem in str(err.value)
    assert sake_main(["check", str(tmp_path)]) != 0
    msg = capsys.readouterr().err
    assert f"{path}: record 3: field '{field}'" in msg


def test_invalid_json_and_missing_layout_are_errors(tmp_path, capsys):
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "Animal.json").write_text("[{")
    assert sake_main(["check", str(tmp_path)]) == 2
    assert "Animal.json" in capsys.readouterr().err
    assert sake_main(["check", str(tmp_path / "nowhere")]) == 2
    assert "no SAKE layout" in capsys.readouterr().err


def test_build_mini_if_missing_keeps_a_finished_build_and_refuses_without_it(mini_dir):
    """`make run` builds SAKE-mini as its own stage: a second run finds the build and keeps it."""
    stamp = (mini_dir / "build.json").stat().st_mtime_ns
    assert sake_main(["build-mini", "--out", str(mini_dir), "--if-missing"]) == 0
    assert (mini_dir / "build.json").stat().st_mtime_ns == stamp
    with pytest.raises(FileExistsError, match="remove it to rebuild"):
        sake_main(["build-mini", "--out", str(mini_dir)])
