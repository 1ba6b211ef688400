"""Small helpers shared by the Hydra entry points (train.py, evaluate.py)."""

from __future__ import annotations

import logging
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from editors.checkpoint import export_digest, load_editor, read_info
from evaluation.identity import config_digest
from lit_modules.base import plain

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


class MissingChoiceError(ValueError):
    """A config group the job needs was not chosen on the command line."""


def choices(group: str) -> list[str]:
    """Config names available in a group (configs/<group>/*.yaml)."""
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def require(cfg: DictConfig, group: str, why: str) -> DictConfig:
    """cfg[group], or a clear error naming the available choices."""
    if cfg.get(group) is None:
        available = ", ".join(choices(group)) or "none yet"
        raise MissingChoiceError(f"no {group} chosen: {why}. Add {group}=<name> (available: {available})")
    return cfg[group]


def instantiate_loggers(cfg: DictConfig | None) -> list:
    """Each entry of the logger group (e.g. logger.tensorboard) instantiated."""
    if not cfg:
        return []
    return [instantiate(c) for c in cfg.values() if c is not None and "_target_" in c]


def log_config(cfg: DictConfig) -> None:
    log.info("config:\n%s", OmegaConf.to_yaml(cfg, resolve=False))


def eval_run_name(*, _root_: DictConfig) -> str:
    """The evaluation run folder's name: `<editor>-<model>-<data>[-val]-<digest>`, the digest of
    the config keys that change results (evaluation/identity.py). The same command resumes its
    folder; another setting gets another folder."""
    cfg = _root_
    tag = config_digest(cfg)
    if cfg.mode == "rescore":
        results = Path(str(cfg.results))
        return f"rescore-{results.parent.name}-{results.stem}-{tag}"
    if cfg.mode == "compare":
        return f"compare-{tag}"
    editor = Path(cfg.ckpt).name if cfg.ckpt else OmegaConf.select(cfg, "editor.name", default="none")
    split = "" if cfg.get("split", "test") == "test" else f"-{cfg.split}"
    return f"{editor}-{cfg.model.name}-{cfg.data.name}{split}-{tag}"


# Config keys of train.py that change what it trains (its recipe), and parts of them that do not.
RECIPE_KEYS = ("model", "data", "editor", "module", "trainer", "seed")
NOT_RECIPE = {"editor": ("callbacks",), "trainer": ("default_root_dir",), "data": ("num_workers",)}


def train_recipe(*, _root_: DictConfig) -> dict:
    """What a train.py run trains: the model, data, editor and module configs, the trainer's
    schedule and the seed (not where it writes, logs or exports). Exports record it, and an
    export of another recipe is never replaced (lit_modules/base.py: ExportEditor)."""
    recipe = {}
    for key in RECIPE_KEYS:
        node = _root_.get(key)
        if isinstance(node, DictConfig):
            skip = NOT_RECIPE.get(key, ())
            recipe[key] = {k: plain(node[k]) for k in node if k not in skip}
        else:
            recipe[key] = node
    return _relative(recipe, str(_root_.paths.root_dir))


def _relative(value, root: str):
    """Paths under the project folder written relative to it: a clone elsewhere has the same recipe."""
    if isinstance(value, str):
        return value.replace(root, "${paths.root_dir}") if root else value
    if isinstance(value, dict):
        return {k: _relative(v, root) for k, v in value.items()}
    if isinstance(value, list):
        return [_relative(v, root) for v in value]
    return value


def register_resolvers() -> None:
    """OmegaConf resolvers the configs use (idempotent)."""
    from analysis.tracing import traced_layer

    OmegaConf.register_new_resolver("eval_run_name", eval_run_name, replace=True)
    OmegaConf.register_new_resolver("train_recipe", train_recipe, replace=True)
    OmegaConf.register_new_resolver("traced_layer", traced_layer, replace=True)


def build_editor(cfg: DictConfig, lalm):
    """(editor, identity, settings) from ckpt= (trained editors) or editor=<name> (no training
    needed). The identity (name, config, weights digest) is part of the run's; the settings
    (the config, and what training chose) go into the reports."""
    if cfg.ckpt:
        info, weights = read_info(cfg.ckpt), export_digest(cfg.ckpt)  # retrained: another run
        config = info.get("config") or info["network"]
        identity = {"name": info["editor"], "label": f"{info['editor']} ({Path(cfg.ckpt).name}, {weights})",
                    "config": config, "weights": weights}  # fmt: skip
        settings = {"config": config, "calibration": info.get("calibration")}
        return load_editor(cfg.ckpt, lalm), identity, {k: v for k, v in settings.items() if v}
    editor = require(cfg, "editor", "an editor is needed (or ckpt=<exported editor>)")
    if "editor" not in editor:
        raise MissingChoiceError(
            f"editor={editor.name} is trained first: python train.py editor={editor.name} "
            f"model={cfg.model.name}, then python evaluate.py "
            f"ckpt=checkpoints/{editor.name}-{cfg.model.name}-{cfg.data.name}"
        )
    config = OmegaConf.to_container(editor.editor, resolve=True)
    identity = {"name": editor.name, "label": editor.name, "config": config, "weights": None}
    return instantiate(editor.editor, lalm=lalm), identity, {"config": config}
