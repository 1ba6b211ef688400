"""What every LightningModule around an LALM shares, building one from its config, and the
export of trained editors."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml
from hydra.utils import get_class
from omegaconf import DictConfig, ListConfig, OmegaConf

from common.hparams import HParamsError, parse_flat, to_dict
from evaluation.identity import differences, digest
from lalms.base import LALM


def plain(value: Any) -> Any:
    """Config containers as plain dicts and lists (what Lightning checkpoints may hold: they load
    with weights_only=True, which refuses OmegaConf objects)."""
    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


def build_module(cfg: Any, source: str, key: str = "module", **objects: Any) -> L.LightningModule:
    """The LightningModule a module config describes (train.py's `module`, an editor's
    `module`): `_target_` names the class; keys its constructor names (an editor's `method` and
    `editor_hparams`) are passed as they are, and every other key is a field of its record
    `cls.HParams` (its `hp`: objective and schedule, read by common.hparams.parse_flat, so that a
    missing, unknown or mistyped key is an HParamsError naming `source` and the key); `objects`
    (the LALM, the train pool) are passed too. The constructor's arguments are keyword-only and
    have no defaults: the config gives each."""
    raw = plain(cfg)
    if not isinstance(raw, Mapping) or not isinstance(raw.get("_target_"), str):
        raise HParamsError(f"{source}: {key} must be a mapping with a _target_ (a LightningModule class)")
    cls = get_class(raw["_target_"])
    params = [n for n in inspect.signature(cls.__init__).parameters if n not in ("self", "hp", *objects)]
    args = {n: raw[n] for n in params if n in raw}
    missing = [n for n in params if n not in raw]
    if missing:
        raise HParamsError(f"{source}: {', '.join(f'{key}.{n}' for n in missing)} missing ({cls.__name__})")
    fields = {k: v for k, v in raw.items() if k not in args and k not in ("_target_", "_recursive_")}
    return cls(**objects, **args, hp=parse_flat(cls.HParams, fields, source, key))


def saved_hparams(module: L.LightningModule, **values: Any) -> None:
    """`module.save_hyperparameters` with plain data only (records as the mappings they were
    parsed from): Lightning checkpoints load with weights_only=True."""
    module.save_hyperparameters({k: plain(to_dict(v)) for k, v in values.items()})


# fp16 needs a gradient scaler: checks and clipping would act on scaled gradients, and a skipped
# step would never let the scaler lower its scale. bf16 has fp32's range and needs none.
FP16 = ("16", "16-mixed", "16-true")


def refuse_fp16(trainer: L.Trainer, what: str) -> None:
    if str(trainer.precision) in FP16:
        raise ValueError(
            f"{what}: trainer.precision={trainer.precision} is not supported (the non-finite-step check and "
            "gradient clipping would see scaled gradients); use trainer.precision=bf16-mixed (GPU) or 32-true"
        )


def finite_everywhere(grads: list[torch.Tensor], trainer: L.Trainer) -> bool:
    """Whether every gradient is finite on every rank (all ranks then skip or step together)."""
    local = torch.stack([torch.isfinite(g).all() for g in grads]).all() if grads else torch.tensor(True)
    return bool(trainer.strategy.reduce(local.float(), reduce_op="min") > 0)


class TrainedLALMModule(L.LightningModule):
    """Trains the LALM itself (pretraining): its model is a registered submodule (moved,
    optimised, checkpointed) and is unfrozen here."""

    def __init__(self, lalm: LALM) -> None:
        super().__init__()
        self.lalm = lalm
        self.model = lalm.model.requires_grad_(True)


class FrozenLALMModule(L.LightningModule):
    """Trains an editor around a frozen LALM (meta-training, calibration). The LALM is not a
    submodule: it is neither optimised nor in checkpoints, which hold the editor only; it is
    moved to the module's device when fitting or validating starts."""

    def __init__(self, lalm: LALM) -> None:
        super().__init__()
        self.lalm = lalm

    def _place_base_model(self) -> None:
        if self.lalm.device != self.device:
            self.lalm.model.to(self.device)

    def on_fit_start(self) -> None:
        self._place_base_model()

    def on_validation_start(self) -> None:
        self._place_base_model()


class ExportConflict(FileExistsError):
    """The export folder holds an editor trained by another recipe."""


class ExportEditor(L.Callback):
    """At the end of training, rank 0 exports the editor (the module's `export`) to `out_dir`.

    Every trained editor (MEND and KE's networks, WISE and UnKE's calibrations) exports to the
    same layout, so `evaluate.py ckpt=<out_dir>` loads each alike. The export records the
    training `recipe` (cli/config.py: train_recipe) and never replaces an export of
    another recipe: that is refused before training starts, naming what differs.
    """

    def __init__(self, out_dir: str, recipe: Mapping[str, Any] | None = None) -> None:
        self.out_dir = Path(out_dir)
        self.recipe = plain(recipe) if recipe is not None else None

    def status(self) -> str:
        """ "missing", "same" (an export of this recipe is there) or "other" (see `check`)."""
        info = self.out_dir / "editor.yaml"
        if not info.is_file():
            return "missing"
        there = yaml.safe_load(info.read_text(encoding="utf-8")).get("recipe")
        return "same" if there == self.recipe else "other"

    def check(self) -> None:
        """ExportConflict when `out_dir` holds an editor of another recipe."""
        if self.recipe is None or self.status() != "other":
            return
        there = yaml.safe_load((self.out_dir / "editor.yaml").read_text(encoding="utf-8")).get("recipe") or {}
        diff = differences(there, self.recipe)
        raise ExportConflict(
            f"{self.out_dir} holds an editor trained by another recipe (recipe {digest(there, 8)} there, "
            f"{digest(self.recipe, 8)} now); what differs:\n  "
            + "\n  ".join(diff)
            + f"\nExport this one elsewhere (editor.callbacks.export.out_dir=...), or remove {self.out_dir}."
        )

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.check()  # before any training: a conflicting run would only find out at the end

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not hasattr(pl_module, "export"):
            raise TypeError(f"ExportEditor: {type(pl_module).__name__} has no export(out_dir, trainer)")
        if trainer.is_global_zero:
            pl_module.export(self.out_dir, trainer, self.recipe)


def data_info(trainer: L.Trainer) -> dict[str, Any]:
    """The training data an export records: its name and a digest of its files."""
    datamodule = trainer.datamodule
    data = {"name": getattr(datamodule, "name", None)}
    if hasattr(datamodule, "fingerprint"):
        data["fingerprint"] = datamodule.fingerprint()
    return data


def run_info(trainer: L.Trainer) -> dict[str, Any]:
    """The training run an export records: its step, scalar metrics and folder."""
    return {
        "global_step": trainer.global_step,
        "metrics": {k: round(float(v), 4) for k, v in trainer.callback_metrics.items() if v.numel() == 1},
        "run_dir": str(trainer.default_root_dir),
    }
