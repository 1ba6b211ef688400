"""Pretraining data, the pretraining recipe end to end, and base-accuracy scoring."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from datamodules import SakeData
from datamodules.builder import load_world, read_manifest
from datamodules.pretrain import PretrainTasks, stratified_holdout
from datamodules.schema import norm_label, parse_options
from evaluation.exact import exact_match
from evaluation.unedited import probes
from tests.helpers import composed, load_model, recipe_data

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tasks(mini_dir):
    clips = [c for c in read_manifest(mini_dir / "pool.jsonl") if c.split == "train"]
    waves = {(c.track, c.file): None for c in clips}

    class Lazy(dict):  # audio is not needed to check the examples' text
        def __getitem__(self, key):
            return __import__("numpy").zeros(1600, "float32")

    data = composed("train", "experiment=pretrain_tiny").data  # the recipe's task and attribute shares
    mixes = {k: OmegaConf.to_container(data[k]) for k in ("mix", "attribute_mix", "portability_mix")}
    world = load_world(mini_dir / "world.yaml")
    return PretrainTasks(clips, Lazy(waves), world, length=400, seed=3, augment=False, **mixes)


def test_examples_are_reproducible_and_answerable(tasks):
    seen = set()
    for i in range(len(tasks)):
        ex, again = tasks[i], tasks[i]  # a pure function of i
        assert (ex.prompt.question, ex.answer, ex.task) == (again.prompt.question, again.answer, again.task)
        seen.add(ex.task)
        if ex.task == "text":
            assert ex.prompt.audio is None
        else:
            assert ex.prompt.audio is not None
        assert norm_label(ex.answer) in {norm_label(o) for o in parse_options(ex.prompt.question)}
    assert seen == {"attribute", "portability", "general", "text"}


def test_portability_examples_ask_for_the_heard_labels_fact(tasks):
    world = tasks.world
    for i in range(len(tasks)):
        ex = tasks[i]
        if ex.task == "portability":
            cats = [
                c for c in world["knowledge"][ex.attribute].values() if c["question"] in ex.prompt.question
            ]
            assert ex.answer in cats[0]["facts"].values()


def test_holdout_is_stratified_and_disjoint(mini_dir):
    clips = [c for c in read_manifest(mini_dir / "pool.jsonl") if c.split == "train"]
    train, held = stratified_holdout(clips, 0.05, 0)
    assert not {c.file for c in train} & {c.file for c in held}
    assert len(train) + len(held) == len(clips)
    assert {(c.track, c.label) for c in held} == {(c.track, c.label) for c in clips}


def test_pretrain_data_uses_training_clips_only(mini_dir):
    dm = recipe_data("pretrain_tiny", f"data.root={mini_dir}", "data.batch_size=4", "data.steps=2",
                     "data.val_examples=8")  # fmt: skip
    dm.setup()
    test_files = {c.file for c in read_manifest(mini_dir / "pool.jsonl") if c.split == "test"}
    assert not set(f for _, f in dm.train_set.waves) & test_files
    batch = next(iter(dm.train_dataloader()))
    assert len(batch["prompts"]) == 4 and len(batch["answers"]) == 4


def test_pretrain_recipe_runs_and_exports(mini_dir, tmp_path):
    run = tmp_path / "run"
    out = subprocess.run(
        [sys.executable, "train.py", "experiment=pretrain_tiny", f"data.root={mini_dir}", "data.steps=3",
         "data.batch_size=4", "data.val_examples=8", "trainer.val_check_interval=3", f"hydra.run.dir={run}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    info = json.loads((run / "tiny-lalm" / "training.json").read_text())
    assert info["global_step"] == 3 and "val/acc_attribute" in info["metrics"]
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert list((run / "tensorboard").rglob("events.*"))
    from lalms import Qwen2Audio

    assert load_model(Qwen2Audio, run / "tiny-lalm").edit_sites.num_llm_layers == 4


def test_base_truths_are_the_unedited_answers(mini_dir):
    data = SakeData.load(mini_dir)
    world = load_world(mini_dir / "world.yaml")
    inst = data.test[0]
    found = {(p.file, p.question): p for p in probes([inst], world)}
    assert found[(inst.file, inst.reliability.question)].truth == inst.original
    (port,) = inst.portability
    fact = world["knowledge"][inst.attribute][port.category]["facts"][inst.original]
    assert found[(port.file, port.question)].truth == fact != port.answer
    for q in inst.audio_locality:
        assert found[(q.file, q.question)].truth == q.answer
    assert "reliability" in found[(inst.file, inst.reliability.question)].kinds


@pytest.mark.parametrize(
    ("response", "answer", "ok"),
    [("dog", "dog", True), (" Dog.", "dog", True), ('"dog"', "dog", True), ("Mr.", "Mr.", True),
     ("a dog", "dog", False), ("", "dog", False), ("dogs", "dog", False)],
)  # fmt: skip
def test_exact_option_match(response, answer, ok):
    assert exact_match(response, answer) is ok
