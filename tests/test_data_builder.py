"""Builder invariants on a SAKE-mini build: counts, balance, query types, disjoint clips, sequences."""

import json
import random
from collections import Counter

import numpy as np
import pytest

from datamodules import SakeData, load_audio
from datamodules.builder import balanced_pairs, load_world, read_manifest
from datamodules.schema import norm_label, parse_options


@pytest.fixture(scope="module")
def built(mini_dir):
    pool = read_manifest(mini_dir / "pool.jsonl")
    label = {(c.track, c.file): c for c in pool}
    return SakeData.load(mini_dir), label, load_world()


def test_balanced_pairs_are_exactly_balanced_per_full_round():
    labels = ["a", "b", "c", "d"]
    pairs = balanced_pairs(labels, 3 * 12, random.Random(0))
    assert all(o != t for o, t in pairs)
    assert set(Counter(o for o, _ in pairs).values()) == {9}
    assert set(Counter(t for _, t in pairs).values()) == {9}
    partial = balanced_pairs(labels, 40, random.Random(1))
    counts = Counter(o for o, _ in partial)
    assert max(counts.values()) - min(counts.values()) <= 3


def test_query_types_mean_what_sake_says(built):
    data, clip, world = built
    for inst in data.train + data.test:
        track = inst.attribute.capitalize()
        labels = {norm_label(x) for x in world["attributes"][inst.attribute]["labels"]}
        o, t = norm_label(inst.original), norm_label(inst.target)
        assert o != t and {o, t} <= labels
        assert norm_label(clip[(track, inst.file)].label) == o
        g1, g2, g3 = inst.generality
        assert g1.file == inst.file and g1.question != inst.reliability.question
        assert g2.file != inst.file and g2.question == inst.reliability.question
        assert g3.file not in (inst.file, g2.file) and g3.question == g1.question
        assert all(norm_label(clip[(track, g.file)].label) == o for g in (g2, g3))
        assert all(norm_label(g.answer) == t for g in inst.generality)
        by_type = {q.type: q for q in inst.audio_locality}
        assert by_type[1].track != track and by_type[1].track in {
            a["track"] for a in world["attributes"].values()
        }
        if inst.attribute == "gender":
            assert 2 not in by_type
        else:
            assert by_type[2].track == track and norm_label(by_type[2].answer) not in {o, t}
        assert norm_label(clip[(track, by_type[3].file)].label) == t
        assert by_type[4].track.startswith("DynamicSuperb/")
        for q in inst.audio_locality:  # locality answers are the clips' true labels
            assert norm_label(clip[(q.track, q.file)].label) == norm_label(q.answer)
            assert norm_label(q.answer) in {norm_label(x) for x in q.options}


def test_portability_answers_follow_the_target(built):
    data, _, world = built
    for inst in data.test:
        (p,) = inst.portability
        facts = world["knowledge"][inst.attribute][p.category]["facts"]
        assert p.answer == facts[inst.target] and norm_label(facts[inst.original]) != norm_label(p.answer)
        assert {facts[inst.target], facts[inst.original]} <= set(parse_options(p.question))
        assert p.file == inst.file


def test_train_validation_and_test_use_disjoint_clips(built):
    """Validation clips are held out like test clips: the tiny model pretrains on train clips."""
    data, clip, _ = built

    def files(items):
        return {(q.track, q.file) for i in items for q in i.queries() if q.file}

    train, val = files(data.train), files(data.val)
    test = files(data.test + [i for s in data.sequences for i in s])
    assert not train & test and not train & val and not val & test
    assert {clip[f].split for f in train} == {"train"} and {clip[f].split for f in val} == {"val"}
    assert {clip[f].split for f in test} == {"test"}


def test_sequences_follow_both_rules(built):
    data, _, _ = built
    for seq in data.sequences:
        labels = [norm_label(x) for i in seq for x in (i.original, i.target)]
        assert len(labels) == len(set(labels)) == 2 * len(seq)  # rule 1
        originals = {norm_label(i.original) for i in seq}
        for inst in seq:  # rule 2
            assert not {norm_label(q.answer) for q in inst.audio_locality} & originals
            assert inst.portability and inst.raw["track"] == inst.attribute.capitalize()


def test_builds_are_deterministic(mini_dir, tmp_path):
    from datamodules.mini.build import MiniSizes, build_mini

    from .conftest import SMALL_MINI

    again = build_mini(tmp_path / "again", seed=0, sizes=MiniSizes(**SMALL_MINI), workers=1)
    for rel in ["pool.jsonl", "data/train/Animal.json", "data/test/sequential_editing/all_sequences.json"]:
        assert (again / rel).read_bytes() == (mini_dir / rel).read_bytes(), rel
    clips = sorted(p.relative_to(mini_dir) for p in (mini_dir / "audio").rglob("*.ogg"))
    assert {c.parts[1] for c in clips} >= {"Emotion", "Gender", "Language", "Animal"}
    for rel in clips:  # Ogg stream serial numbers are random: compare the decoded samples
        assert np.array_equal(load_audio(again / rel), load_audio(mini_dir / rel)), rel
    info = json.loads((again / "build.json").read_text())
    assert info["seed"] == 0 and info["clips"] > 0


def test_an_unfinished_build_is_not_mistaken_for_a_dataset(tmp_path):
    from datamodules.mini.build import ensure_mini

    (tmp_path / "half").mkdir()
    with pytest.raises(FileExistsError, match="no finished SAKE-mini build"):
        ensure_mini(tmp_path / "half")
