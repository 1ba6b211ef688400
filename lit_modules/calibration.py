"""Fitting the settings of editors that are not meta-trained (WISE, UnKE) on SAKE's train split.

Such an editor has no network to train, but its settings decide how well it edits (WISE's
routing threshold and margins, UnKE's key search). A CalibrationModule runs the editor over the
train split's edits on the same Trainer, DataModule (DDP sharding, resume) and TensorBoard
logging as the hypernetwork editors:
- `training_step` edits each train instance with every candidate setting, records what the
  choice depends on (one JSON-able dict per edit and candidate) and undoes the edit;
- at the start of validation the records of all ranks are gathered and `choose` picks the
  settings from them; `validation_step` runs the validation split's edits under them (and under
  whatever the subclass compares them with) and records the outcome;
- at the end of validation `score` gives the held-out figures and the values they choose,
  which are logged and go into the export (`ExportEditor` -> `export`), so that
  `evaluate.py ckpt=` builds the editor with them and reports them.
Chosen values are nested like the editor's hparams ({"margins": {"alpha": ...}}) and written
over them.
Nothing is optimised by gradient. The records are module state saved in Lightning checkpoints,
so a run resumed from `last.ckpt` keeps the edits already done.
"""

from __future__ import annotations

import abc
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist

from common import TrainPool
from datamodules.examples import EditExample
from editors.checkpoint import save_calibrated
from editors.registry import build
from lalms.base import LALM, greedy_hits
from lit_modules.base import FrozenLALMModule, data_info, plain, run_info, saved_hparams

log = logging.getLogger(__name__)
SPLITS = ("train", "val")


def merged(base: Mapping[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    """`base` with `changes` written over it, nested mappings merged key by key."""
    out = dict(base)
    for k, v in changes.items():
        out[k] = merged(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
    return out


class CalibrationModule(FrozenLALMModule, abc.ABC):
    """Subclasses set `HParams`, the record of their calibration's settings (`hp`: the fields of
    the editor YAML's `module`, lit_modules/base.py: build_module)."""

    HParams: type

    def __init__(
        self, *, lalm: LALM, pool: TrainPool, method: str, editor_hparams: Mapping[str, Any], hp: Any
    ) -> None:
        """The editor is `method` with `editor_hparams` (the editor's: editor.method,
        editor.hparams, plain data); `hp` is how it is calibrated."""
        super().__init__(lalm)
        self.automatic_optimization = False
        self.pool = pool
        self.method, self.editor_hparams, self.hp = method, plain(editor_hparams), hp
        saved_hparams(self, method=method, editor_hparams=self.editor_hparams, hp=hp)
        self.records: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
        self.chosen: dict[str, Any] | None = None  # the calibrated values
        self.summary: dict[str, Any] = {}  # figures behind the choice, exported with it
        # DDP wraps a module only if it has a trainable parameter; calibration has none to train.
        self.ddp_anchor = torch.nn.Parameter(torch.zeros(()))
        self.skipped_records = 0

    def build(self, changes: Mapping[str, Any] | None = None) -> Any:
        """The editor of the config with `changes` (nested like its hparams), on this module's model."""
        raw = merged(self.editor_hparams, changes or {})
        return build(self.method, raw, self.lalm, self.pool, "editor.module", "editor_hparams")

    # ------------------------------------------------------------------ what subclasses define
    @abc.abstractmethod
    def record(self, examples: Sequence[EditExample], split: str) -> list[dict[str, Any]]:
        """Edit each example (under the candidates, or under the chosen values for `val`) and
        return one record per edit; every edit is undone."""

    @abc.abstractmethod
    def choose(self, train: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
        """(the calibrated config values, figures behind them) from the train records."""

    @abc.abstractmethod
    def score(self, val: list[dict[str, Any]]) -> tuple[dict[str, float], dict[str, Any]]:
        """(held-out figures, the values they choose) from the validation records."""

    @abc.abstractmethod
    def exported_editor(self) -> Any:
        """The editor under the chosen values whose cached state is exported."""

    # ------------------------------------------------------------------ the loop
    def configure_optimizers(self) -> torch.optim.Optimizer:
        # A no-op optimiser (the anchor never gets a gradient): stepping it counts the batch in
        # global_step, which drives step-based checkpoints (resume), logging and max_steps.
        return torch.optim.SGD([self.ddp_anchor], lr=0.0)

    def training_step(self, examples: list[EditExample], batch_idx: int) -> None:
        self.optimizers().step()
        records = self.record(examples, "train")
        kept = [r for r in records if _finite(r)]  # an edit whose figures are NaN/inf says nothing
        if len(kept) < len(records):
            self.skipped_records += len(records) - len(kept)
            log.warning("batch %d: %d non-finite records skipped", batch_idx, len(records) - len(kept))
        self.records["train"].extend(kept)
        self.log("train/skipped_records", float(self.skipped_records), batch_size=len(examples))
        records = kept
        logs = self.step_logs(records) if records else {}
        if logs:
            self.log_dict({f"train/{k}": v for k, v in logs.items()}, batch_size=len(examples))

    def step_logs(self, records: list[dict[str, Any]]) -> dict[str, float]:
        """Scalars to log per training step (e.g. the running success rate)."""
        return {}

    def gathered(self, split: str) -> list[dict[str, Any]]:
        """The records of every rank."""
        mine = self.records[split]
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return list(mine)
        parts: list[list[dict[str, Any]]] = [[] for _ in range(dist.get_world_size())]
        dist.all_gather_object(parts, mine)
        return [r for part in parts for r in part]

    def calibrate(self) -> None:
        train = self.gathered("train")
        if not train:
            raise RuntimeError(
                f"{type(self).__name__}: no training edits were recorded; nothing to calibrate"
            )
        self.chosen, self.summary = self.choose(train)
        self.summary["train_edits"] = len({r["edit"] for r in train})
        log.info("calibrated %s on %d train edits", self.chosen, self.summary["train_edits"])

    def on_train_epoch_start(self) -> None:
        self.chosen = None

    def on_train_epoch_end(self) -> None:
        if self.chosen is None:  # no validation ran this epoch (no split, or limit_val_batches=0)
            self.calibrate()

    def on_validation_epoch_start(self) -> None:
        if not self.trainer.sanity_checking:
            self.records["val"] = []  # a resumed run repeats its validation from the start
            self.calibrate()

    def validation_step(self, examples: list[EditExample], batch_idx: int) -> None:
        if self.trainer.sanity_checking or self.chosen is None:
            return
        with torch.inference_mode(False):  # editing needs autograd
            self.records["val"].extend(self.record(examples, "val"))

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking or self.chosen is None:
            return
        val = self.gathered("val")
        if val:
            held_out, self.chosen = self.score(val)
            self.summary["val"] = {**held_out, "edits": len({r["edit"] for r in val})}
            self.log_dict({f"val/{k}": float(v) for k, v in held_out.items()}, rank_zero_only=True)

    # ------------------------------------------------------------------ checkpoints and export
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["calibration_records"] = self.records

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.records = checkpoint.get("calibration_records", {s: [] for s in SPLITS})

    def export(self, out_dir: Path, trainer: L.Trainer, recipe: Mapping[str, Any] | None = None) -> Path:
        if self.chosen is None:
            raise RuntimeError("export before calibration: the training epoch did not finish")
        raw = merged(self.editor_hparams, self.chosen)
        name = self.editor_name
        out = save_calibrated(
            self.exported_editor(), self.method, raw, out_dir, name, data_info(trainer), run_info(trainer),
            {"chosen": self.chosen, **self.summary}, recipe,
        )  # fmt: skip
        log.info("exported the calibrated %s editor (%s) to %s", name, self.chosen, out)
        return out

    def answers(self, prompts: Sequence[Any], target: str) -> torch.Tensor:
        """(N,) whether greedy decoding gives `target` for each prompt (one batch, no gradient)."""
        batch = self.lalm.to_device(self.lalm.encode(list(prompts), [target] * len(prompts)))
        with torch.no_grad():
            return greedy_hits(self.lalm.logits(batch), batch["labels"])

    @property
    def editor_name(self) -> str:
        return self.method.rsplit(".", 1)[-1].lower()


def _finite(value: Any) -> bool:
    """Whether every number in a record (nested lists and dicts) is finite."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    if isinstance(value, list | tuple):
        return all(_finite(v) for v in value)
    return True


def edit_key(example: EditExample) -> str:
    inst = example.instance
    return f"{Path(inst.source).name}:{inst.index}"


def best_threshold(inside: torch.Tensor, outside: torch.Tensor, below: float = 1.0) -> tuple[float, float]:
    """(t, balanced accuracy) of the threshold t < `below` that best separates values that should
    exceed it (`inside`) from values that should not (`outside`): the mean of the share of
    `inside` above t and the share of `outside` at or below t. Ties go to the smallest t."""
    inside, outside = inside.double().sort().values, outside.double().sort().values
    values = torch.cat([inside, outside, torch.zeros(1, dtype=torch.double)]).unique()
    candidates = torch.cat([values[:1], (values[1:] + values[:-1]) / 2])
    candidates = candidates[candidates < below]
    if not len(candidates):
        candidates = torch.zeros(1, dtype=torch.double)
    above_in = 1 - torch.searchsorted(inside, candidates, right=True) / max(len(inside), 1)
    below_out = torch.searchsorted(outside, candidates, right=True) / max(len(outside), 1)
    balanced = (above_in + below_out) / 2
    best = int(balanced.argmax())
    return float(candidates[best]), float(balanced[best])
