"""What the Hydra entry points (train.py, evaluate.py, analyze.py) share: resolvers, clear errors
for missing choices, the plan they print, and the editor a config describes."""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

import transformers
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import InterpolationToMissingValueError, MissingMandatoryValue

from common.hparams import HParamsError
from editors.checkpoint import export_digest, load_editor, read_info
from editors.registry import build
from evaluation.identity import config_digest, digest
from lalms.enhancement import Enhancement
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


def log_config() -> None:
    """Where Hydra saved the composed config (printing its hundred lines would bury the plan);
    `--cfg job` prints it instead of running."""
    hydra = HydraConfig.get()
    if hydra.output_subdir is None:
        log.info("config: not saved (hydra.output_subdir=null); print it with --cfg job")
        return
    saved = Path(hydra.runtime.output_dir) / hydra.output_subdir / "config.yaml"
    log.info("config: %s (print it with --cfg job)", saved)


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
    enhanced = "-enhanced" if cfg.get("enhancement") is not None else ""
    return f"{editor}-{cfg.model.name}-{cfg.data.name}{split}{enhanced}-{tag}"


def enhancement_tag(*, _root_: DictConfig) -> str:
    """`-enhanced-<digest of the setting>` with `enhancement=`, else nothing: what an analysis
    folder's name (analyze.yaml's hydra.run.dir) carries, so an enhanced model's lens never
    lands in the plain model's folder."""
    enhancement = Enhancement.from_config(_root_.get("enhancement"))
    return "" if enhancement is None else f"-enhanced-{digest(enhancement.as_dict(), 8)}"


def model_enhancement(cfg: DictConfig) -> Enhancement | None:
    """The `enhancement=` of a config (lalms/enhancement.py: null, a mapping of its fields or the
    path of the file `analyze.py enhance` writes), for the unedited model only: an editor edits
    the plain model, so `ckpt=` / `editor=<an editor>` with an enhancement is refused."""
    enhancement = Enhancement.from_config(cfg.get("enhancement"))
    editor = cfg.get("editor")
    if enhancement is not None and (cfg.get("ckpt") or (editor is not None and not editor.get("base_only"))):
        used = f"ckpt={cfg.ckpt}" if cfg.get("ckpt") else f"editor={editor.name}"
        raise ValueError(f"enhancement= is a setting of the unedited model (editor=none, or an analysis "
                         f"without an editor); drop it or {used}")  # fmt: skip
    return enhancement


def enhance(enhancement: Enhancement | None, lalm) -> Enhancement | None:
    """Put `enhancement` (`model_enhancement`'s) on `lalm` for the rest of the run; the one
    applied (its layers counted from 0), or None."""
    if enhancement is None:
        return None
    applied = enhancement.apply(lalm).enhancement
    log.info("enhancement (AudioLens): %s", applied.describe())
    return applied


# Config keys of train.py that change what it trains (its recipe), and parts of them that do not.
RECIPE_KEYS = ("model", "data", "editor", "module", "trainer", "seed")
NOT_RECIPE = {"editor": ("callbacks",), "trainer": ("default_root_dir",), "data": ("num_workers",)}


def train_recipe(*, _root_: DictConfig) -> DictConfig:
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
    return OmegaConf.create(_relative(recipe, str(_root_.paths.root_dir)))  # a node: --resolve prints it


def _relative(value, root: str):
    """Paths under the project folder written relative to it: a clone elsewhere has the same recipe."""
    if isinstance(value, str):
        return value.replace(root, "<project>") if root else value
    if isinstance(value, dict):
        return {k: _relative(v, root) for k, v in value.items()}
    if isinstance(value, list):
        return [_relative(v, root) for v in value]
    return value


class _Drop(logging.Filter):
    """Drops the records whose message starts with one of `starts`."""

    def __init__(self, *starts: str) -> None:
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.starts)


def quiet_library_notices() -> None:
    """Silence what libraries say that does not apply to a run of this project:
    - Lightning's advertisement for its cloud logger (runs log to TensorBoard);
    - Lightning's use of torch's deprecated `LeafSpec` (lightning/pytorch/utilities/_pytree.py,
      theirs to change);
    - Lightning's warning that a step-interval checkpoint of a manually optimised module holds
      the state after the step: that is the state a resumed run must continue from (the
      DataModule's count of consumed batches includes that step; datamodules/resume.py);
    - transformers' per-tensor bar while a model loads (a line per load in a log file);
    - what transformers says when Whisper's own `generate` (DeSTA's transcripts) hands its
      suppress tokens over as arguments beside our generation config, and a default
      `max_length` beside our `max_new_tokens`: the config's settings and `max_new_tokens`
      are the ones used, as the messages themselves say."""
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_Drop("💡 Tip:"))
    logging.getLogger("transformers.generation.utils").addFilter(
        _Drop("Passing `generation_config` together with generation-related", "Both `max_new_tokens`")
    )
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated")
    warnings.filterwarnings(
        "ignore", message="Using ModelCheckpoint with manual optimization and every_n_train"
    )
    transformers.utils.logging.disable_progress_bar()


def register_resolvers() -> None:
    """OmegaConf resolvers the configs use (idempotent)."""
    from analysis.tracing import traced_layer

    OmegaConf.register_new_resolver("eval_run_name", eval_run_name, replace=True)
    OmegaConf.register_new_resolver("enhancement_tag", enhancement_tag, replace=True)
    OmegaConf.register_new_resolver("train_recipe", train_recipe, replace=True)
    OmegaConf.register_new_resolver("traced_layer", traced_layer, replace=True)


def apply_training_changes(cfg: DictConfig, overrides: Sequence[str] = ()) -> None:
    """An editor's `training` written over the groups it names (data, trainer): what train.py
    trains it on (configs/tuning/tiny/unke.yaml: the first 100 train edits). A key the command
    line sets (`overrides`, e.g. data.max_instances=3) keeps the command line's value."""
    editor = cfg.get("editor")
    given = {o.split("=", 1)[0].lstrip("+~") for o in overrides}
    for group, changes in ((editor.get("training") if editor else None) or {}).items():
        node = cfg[group]
        with open_dict(node):  # a change may set a key the group leaves to the library's default
            for key, value in OmegaConf.to_container(changes).items():
                if f"{group}.{key}" not in given:
                    node[key] = value


def editor_hparams(cfg: DictConfig) -> dict:
    """The chosen editor's hyperparameters as plain data; a value the editor's YAML leaves to
    each model (`???`) and no tuning file sets is an HParamsError naming the key and the file."""
    try:
        return OmegaConf.to_container(cfg.editor.hparams, resolve=True, throw_on_missing=True)
    except (MissingMandatoryValue, InterpolationToMissingValueError) as err:
        named = re.search(r"Missing mandatory value: (\S+)", str(err))
        key = named.group(1) if named else err.full_key
        raise HParamsError(
            f"{key} has no value for model {cfg.model.name}: it is set per model, in "
            f"configs/tuning/{cfg.model.name}/{cfg.editor.name}.yaml, or in the profile its model config "
            f"names (see configs/tuning/_profiles/paper_7b/ for one)"
        ) from err


def build_editor(cfg: DictConfig, lalm, pool):
    """(editor, identity, settings) from ckpt= (trained editors) or editor=<name> (no training
    needed). The identity (name, method, hparams, weights digest) is part of the run's; the
    settings (the hparams, and what training chose) go into the reports."""
    if cfg.ckpt:
        info, weights = read_info(cfg.ckpt), export_digest(cfg.ckpt)  # retrained: another run
        config = {"method": info["method"], "hparams": info["hparams"]}
        identity = {"name": info["editor"], "label": f"{info['editor']} ({Path(cfg.ckpt).name}, {weights})",
                    "config": config, "weights": weights}  # fmt: skip
        settings = {"config": config, "calibration": info.get("calibration")}
        return load_editor(cfg.ckpt, lalm, pool), identity, {k: v for k, v in settings.items() if v}
    editor = require(cfg, "editor", "an editor is needed (or ckpt=<exported editor>)")
    if editor.get("needs_training"):
        raise MissingChoiceError(
            f"editor={editor.name} is trained first: python train.py editor={editor.name} "
            f"model={cfg.model.name}, then python evaluate.py "
            f"ckpt=checkpoints/{editor.name}-{cfg.model.name}-{cfg.data.name}"
        )
    config = {"method": editor.method, "hparams": editor_hparams(cfg)}
    identity = {"name": editor.name, "label": editor.name, "config": config, "weights": None}
    built = build(editor.method, config["hparams"], lalm, pool, f"configs/editor/{editor.name}.yaml")
    return built, identity, {"config": config}
