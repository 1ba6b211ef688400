"""Shared by the tests: editors and modules built from the configs the commands compose, and what
the entry-point tests run inside train.py (named in Hydra overrides: +callbacks.x._target_=...)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import lightning as L
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig

from cli.config import apply_training_changes, editor_hparams, register_resolvers
from editors.registry import build
from lit_modules.base import build_module


class Pace(L.Callback):
    """Sleeps `seconds` after every training batch: a window in which a test can kill the run."""

    def __init__(self, seconds: float = 0.5) -> None:
        self.seconds = seconds

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        time.sleep(self.seconds)


ROOT = Path(__file__).resolve().parents[1]


def composed(entry: str, *overrides: str) -> DictConfig:
    """The config `python <entry>.py <overrides>` composes (resolvers registered, the project root set)."""
    os.environ.setdefault("PROJECT_ROOT", str(ROOT))
    register_resolvers()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name=entry, overrides=[*overrides, "paths.output_dir=OUT"])
    if entry == "train":
        apply_training_changes(cfg, overrides)
    return cfg


def configured(name: str, lalm, pool, *overrides: str, model: str = "tiny"):
    """Editor `name` as evaluate.py builds it for `model`, with `overrides` (e.g. smaller corpora)."""
    cfg = composed("evaluate", f"editor={name}", f"model={model}", *overrides)
    return build(cfg.editor.method, editor_hparams(cfg), lalm, pool, f"configs/editor/{name}.yaml")


def training_module(name: str, lalm, pool, *overrides: str, model: str = "tiny"):
    """Editor `name`'s LightningModule as train.py builds it for `model`."""
    cfg = composed("train", f"editor={name}", f"model={model}", *overrides)
    return build_module(cfg.editor.module, f"configs/editor/{name}.yaml", lalm=lalm, pool=pool)


def recipe_module(experiment: str, lalm, *overrides: str):
    """The LightningModule of `experiment=<experiment>` (e.g. pretrain_tiny) as train.py builds it."""
    cfg = composed("train", f"experiment={experiment}", *overrides)
    return build_module(cfg.module, f"configs/experiment/{experiment}.yaml", lalm=lalm)


def recipe_data(experiment: str, *overrides: str):
    """The DataModule of `experiment=<experiment>` as train.py instantiates it."""
    return instantiate(composed("train", f"experiment={experiment}", *overrides).data)


def load_model(cls, path, model: str = "tiny", **changes):
    """`cls.load(path)` with the values configs/model/<model>.yaml gives the loading settings
    that `load` requires (ProcessorLALM: dtype, device, random_init, arch, processor_path; they
    have no defaults), `changes` (e.g. name=...) written over them: a test loads a model folder
    with the values a command would."""
    import inspect

    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(OmegaConf.load(ROOT / "configs" / "model" / f"{model}.yaml"))
    params = inspect.signature(cls.load).parameters.values()
    required = [p.name for p in params if p.kind is p.KEYWORD_ONLY and p.default is p.empty]
    return cls.load(str(path), **{**{k: cfg[k] for k in required}, **changes})


def openai_judge(**changes):
    """The LLM judge of configs/judge/openai.yaml with `changes` by field name (base_url=...,
    max_concurrency=..., cache_path=...), each put in the group (request, connection) it belongs to."""
    from dataclasses import fields

    from omegaconf import OmegaConf

    from evaluation.judges.openai_judge import Connection, JudgeRequest, OpenAIJudge

    cfg = OmegaConf.to_container(OmegaConf.load(ROOT / "configs" / "judge" / "openai.yaml"))
    request, connection = cfg["request"], cfg["connection"]
    for key, value in changes.items():
        if key in {f.name for f in fields(JudgeRequest)}:
            request[key] = value
        elif key in {f.name for f in fields(Connection)}:
            connection[key] = value
        elif key not in ("name", "cache_path"):
            raise KeyError(f"OpenAIJudge has no setting {key!r}")
    return OpenAIJudge(changes.get("name", cfg["name"]), request, connection, changes.get("cache_path"))
