"""Per-model settings are written once: what a family of models shares lives in its profile
(configs/tuning/_profiles/<profile>/<editor>.yaml, named by the model config: `override profile:`),
what one model has of its own in configs/tuning/<model>/<editor>.yaml; every entry point
composes both, the model's own last."""

import json
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from cli.config import register_resolvers

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TUNING = CONFIGS / "tuning"
PROFILES = TUNING / "_profiles"
MODELS = sorted(p.stem for p in (CONFIGS / "model").glob("*.yaml"))
ANALYSES = sorted(p.stem for p in (CONFIGS / "analysis").glob("*.yaml"))


def compose_(entry, *overrides):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name=entry, overrides=list(overrides), return_hydra_config=True)


def composed(entry, *overrides) -> dict:
    """The composed config's values, flattened (interpolations as written)."""
    return leaves(OmegaConf.to_container(compose_(entry, *overrides), resolve=False))


def leaves(node, prefix=""):
    """{"editor.hparams.lr": 0.01} for a file's values (its defaults list aside)."""
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            if not (prefix == "" and k == "defaults"):
                out.update(leaves(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: node}


def values(path: Path) -> dict:
    return leaves(yaml.safe_load(path.read_text()) or {})


def tuning_files():
    """Every tuning file: (folder, its path); folder is a model's name or `_profiles/<profile>`."""
    for path in sorted(TUNING.rglob("*.yaml")):
        yield str(path.parent.relative_to(TUNING)), path


@pytest.fixture(scope="module")
def profile_of():
    """The profile each model's config names (`none`: only its own folder)."""
    register_resolvers()
    return {m: compose_("evaluate", f"model={m}").hydra.runtime.choices["model/profile"] for m in MODELS}


def test_each_model_names_a_profile_that_exists(profile_of):
    """A name only (no config of its own): a misspelt one would silently set nothing."""
    for model, profile in profile_of.items():
        assert profile == "none" or (PROFILES / profile).is_dir(), (model, profile)
    assert {profile_of[m] for m in ("qwen", "af3", "desta")} == {"paper_7b"}
    assert {profile_of[m] for m in ("tiny", "tiny_af3", "tiny_desta")} == {"tiny"}
    assert not (CONFIGS / "model" / "profile").exists()  # the choice has no configs


def test_no_tuning_file_repeats_another_of_its_name():
    """No two files for the same editor (or analysis) say the same: what models share is their
    profile's, not a copy per model."""
    seen: dict[tuple[str, str], str] = {}
    for folder, path in tuning_files():
        content = json.dumps(yaml.safe_load(path.read_text()), sort_keys=True)
        key = (path.name, content)
        assert key not in seen, f"{folder}/{path.name} says what {seen[key]}/{path.name} says"
        seen[key] = folder


def test_a_models_own_file_only_sets_what_its_profile_does_not(profile_of):
    """A model's own value differs from its profile's (an equal one belongs to the profile alone)."""
    for folder, path in tuning_files():
        if folder.startswith("_profiles") or profile_of.get(folder, "none") == "none":
            continue
        shared = PROFILES / profile_of[folder] / path.name
        if shared.is_file():
            same = {k for k, v in values(path).items() if values(shared).get(k, object()) == v}
            assert not same, f"{folder}/{path.name} repeats its profile's {sorted(same)}"


def test_model_configs_hold_no_editor_layers():
    """MEND's and KE's layers are the editors' (configs/editor/_hypernet.yaml), not the models'."""
    for path in sorted((CONFIGS / "model").glob("*.yaml")):
        assert "edit_layers" not in (yaml.safe_load(path.read_text()) or {}), path.name


def profile_cases():
    """(profile file, entry point, group) for each entry point that has the file's group."""
    for path in sorted(PROFILES.glob("*/[!_]*.yaml")):
        group = "analysis" if path.stem in ANALYSES else "editor"
        for entry in ("analyze",) if group == "analysis" else ("train", "evaluate", "analyze"):
            yield f"{path.parent.name}/{path.stem}", entry, group


@pytest.mark.parametrize(("tuning", "entry", "group"), list(profile_cases()))
def test_a_profile_applies_to_each_of_its_models_in_every_entry_point(tuning, entry, group, profile_of):
    """Each value of configs/tuning/_profiles/<profile>/<name>.yaml is composed for every model of
    the profile (but where the model's own file sets another), and for no model of another profile."""
    profile, name = tuning.split("/")
    own = values(PROFILES / profile / f"{name}.yaml")
    other = composed(entry, f"{group}={name}", "model=tiny_init")  # a model of no profile
    assert not any(other.get(k) == v for k, v in own.items()), f"tiny_init has {tuning}'s values"
    for model in (m for m, p in profile_of.items() if p == profile):
        cfg = composed(entry, f"{group}={name}", f"model={model}")
        overridden = TUNING / model / f"{name}.yaml"
        mine = values(overridden) if overridden.is_file() else {}
        for key, value in own.items():
            assert cfg[key] == mine.get(key, value), (model, key)


@pytest.mark.parametrize("model", [m for m in MODELS if m != "tiny_init"])
def test_every_model_with_tuning_leaves_no_analysis_value_open(model):
    """Every value an analysis leaves to the model (???) is set, for every model that ships tuning
    (the editors' values: tests/test_composed_configs.py, test_a_new_model_...)."""
    for analysis in ANALYSES:
        cfg = compose_("analyze", f"analysis={analysis}", f"model={model}")
        assert "???" not in json.dumps(OmegaConf.to_container(cfg.analysis, resolve=False)), analysis


def test_config_names_are_their_files():
    """One name each: an editor's `name` (run folders, exports, reports) is its file's, written in
    the file itself (not inherited from the editor it builds on); so for models, analyses, data, judges."""
    for path in sorted((CONFIGS / "editor").glob("[!_]*.yaml")):
        assert yaml.safe_load(path.read_text())["name"] == path.stem, path.name
    for group in ("model", "analysis", "data", "judge"):
        for path in sorted((CONFIGS / group).glob("*.yaml")):
            named = (yaml.safe_load(path.read_text()) or {}).get("name")
            assert named in (None, path.stem), (group, path.stem, named)
