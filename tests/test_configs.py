"""Every config composes through Hydra; the entry points fail clearly on missing or unknown choices."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.errors import MissingConfigException
from hydra.utils import get_method
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
GROUPS = ["model", "trainer", "logger", "editor", "data", "judge", "experiment", "tuning", "tuning/_profiles",
          "analysis", "probes"]  # fmt: skip
# Choices that are a name only, with no config of their own: the profile a model config names
# (a folder of configs/tuning/_profiles/; tests/test_config_profiles.py).
NAMES = ["model/profile"]


def entry_groups(entry):
    """The groups in an entry point's defaults list."""
    defaults = yaml.safe_load((CONFIGS / f"{entry}.yaml").read_text())["defaults"]
    return [next(iter(d)).removeprefix("optional ").split("@")[0] for d in defaults if isinstance(d, dict)]


def overridden_groups(path):
    """The groups an experiment overrides, with those of the experiments it builds on."""
    defaults = yaml.safe_load(path.read_text()).get("defaults", [])
    groups = {next(iter(d)).split("/")[-1] for d in defaults if isinstance(d, dict)}
    for d in defaults:
        if isinstance(d, str) and d != "_self_":  # another experiment of the same group
            groups |= overridden_groups(path.parent / f"{d}.yaml")
    return groups


def fits(entry, group, path):
    """Experiments override groups; they compose with the entry points that have those groups."""
    return group != "experiment" or overridden_groups(path) <= set(entry_groups(entry))


def group_options():
    return [
        (entry, g, p.stem)
        for entry in ("train", "evaluate", "analyze")
        for g in entry_groups(entry)
        if g != "tuning"  # chosen by the editor and model (test below)
        for p in sorted((CONFIGS / g).glob("*.yaml"))
        if fits(entry, g, p)
    ]


@pytest.mark.parametrize(("entry", "group", "option"), group_options())
def test_every_config_composes(entry, group, option):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(config_name=entry, overrides=[f"{group}={option}"])
    # `???` values stay unresolved; experiments are global packages (they set module, data, ...)
    node = OmegaConf.to_container(cfg[group] if group in cfg else cfg, resolve=False)
    nested = [v for v in node.values() if isinstance(v, dict) and "_target_" in v]
    targets = [node["_target_"]] if "_target_" in node else [v["_target_"] for v in nested]
    for target in targets:
        assert callable(get_method(target)), target


def tuning_cases():
    """(tuning file, entry point, group) for each entry point that has the file's group."""
    for path in sorted((CONFIGS / "tuning").glob("*/*.yaml")):
        group = "analysis" if (CONFIGS / "analysis" / path.name).is_file() else "editor"
        for entry in ("train", "evaluate", "analyze"):
            if group in entry_groups(entry):
                yield f"{path.parent.name}/{path.stem}", entry, group


@pytest.mark.parametrize(("tuning", "entry", "group"), list(tuning_cases()))
def test_tuning_applies_to_its_model_and_editor_in_every_entry_point(tuning, entry, group):
    """configs/tuning/<model>/<name>.yaml sets its values whenever that model and that editor (or
    analysis) are chosen, in each entry point that has the group; a model without one does not get them."""
    model, name = tuning.split("/")
    node, path = yaml.safe_load((CONFIGS / "tuning" / f"{tuning}.yaml").read_text()), []
    while isinstance(node, dict):  # the first value the file sets, and its dotted path
        key, node = next(iter(node.items()))
        path.append(key)
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(config_name=entry, overrides=[f"{group}={name}", f"model={model}"])
        other = compose(config_name=entry, overrides=[f"{group}={name}", "model=tiny_init"])  # no folder
    assert OmegaConf.select(cfg, ".".join(path)) == node
    assert (
        OmegaConf.select(other, ".".join(path), default="<absent>") in ("???", "<absent>")
        or OmegaConf.select(other, ".".join(path)) != node
    )


def test_all_groups_exist_and_known_models_are_there():
    assert set(entry_groups("train")) | set(entry_groups("evaluate")) | set(entry_groups("analyze")) == set(
        GROUPS + NAMES
    )
    for group in GROUPS:
        assert (CONFIGS / group).is_dir(), group
    assert {"tiny", "qwen", "af3", "desta"} <= {p.stem for p in (CONFIGS / "model").glob("*.yaml")}
    assert {"cpu", "gpu", "ddp", "ddp_cpu"} <= {p.stem for p in (CONFIGS / "trainer").glob("*.yaml")}


def test_unknown_choice_fails_with_hydras_message():
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        with pytest.raises(MissingConfigException, match="model/nonexistent"):
            compose(config_name="train", overrides=["model=nonexistent"])


def run(script, *args):
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    return subprocess.run(
        [sys.executable, script, *args], cwd=ROOT, capture_output=True, text=True, env=env, timeout=300
    )


def test_cfg_job_prints_the_composed_config():
    out = run("train.py", "--cfg", "job", "model=qwen", "trainer=ddp")
    assert out.returncode == 0, out.stderr
    assert "Qwen/Qwen2-Audio-7B-Instruct" in out.stdout and "strategy: ddp" in out.stdout


def test_train_without_an_editor_names_the_missing_choice():
    out = run("train.py", "hydra.run.dir=/tmp/sake-test-run")
    assert out.returncode != 0
    assert "no editor chosen" in out.stderr and "editor=<name>" in out.stderr


def test_unknown_editor_fails_through_hydra():
    out = run("train.py", "editor=nonexistent")
    assert out.returncode != 0 and "Could not find 'editor/nonexistent'" in out.stderr


def test_evaluate_names_a_folder_that_is_not_an_exported_editor(tmp_path):
    out = run("evaluate.py", f"ckpt={tmp_path}", "data=sake_mini", f"hydra.run.dir={tmp_path / 'run'}")
    assert out.returncode != 0
    assert f"{tmp_path}: not an exported editor (no editor.yaml)" in out.stderr
