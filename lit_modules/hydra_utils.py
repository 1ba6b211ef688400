"""Small helpers shared by the Hydra entry points (train.py, evaluate.py)."""

from __future__ import annotations

import logging
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from editors.checkpoint import export_digest, load_editor, read_info

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


def eval_run_name(
    mode: str, ckpt: str | None, editor: str | None, model: str, data: str, results: str | None
) -> str:
    """The evaluation run folder's name: stable, so re-running a command resumes it."""
    if mode == "rescore":
        return f"rescore-{Path(str(results)).parent.name}-{Path(str(results)).stem}"
    return f"{Path(ckpt).name if ckpt else editor or 'none'}-{model}-{data}"


def register_resolvers() -> None:
    """OmegaConf resolvers the configs use (idempotent)."""
    from analysis.tracing import traced_layer

    OmegaConf.register_new_resolver("eval_run_name", eval_run_name, replace=True)
    OmegaConf.register_new_resolver("traced_layer", traced_layer, replace=True)


def build_editor(cfg: DictConfig, lalm):
    """(editor, description, settings) from ckpt= (trained editors) or editor=<name> (no training
    needed); the settings (the config, and what training chose) go into the reports."""
    if cfg.ckpt:
        info = read_info(cfg.ckpt)
        name = f"{info['editor']} ({Path(cfg.ckpt).name}, {export_digest(cfg.ckpt)})"  # retrained: other run
        settings = {"config": info.get("config") or info["network"], "calibration": info.get("calibration")}
        return load_editor(cfg.ckpt, lalm), name, {k: v for k, v in settings.items() if v}
    editor = require(cfg, "editor", "an editor is needed (or ckpt=<exported editor>)")
    if "editor" not in editor:
        raise MissingChoiceError(
            f"editor={editor.name} is trained first: python train.py editor={editor.name} "
            f"model={cfg.model.name}, then python evaluate.py "
            f"ckpt=checkpoints/{editor.name}-{cfg.model.name}-{cfg.data.name}"
        )
    config = OmegaConf.to_container(editor.editor, resolve=True)
    return instantiate(editor.editor, lalm=lalm), editor.name, {"config": config}
