"""Pretraining the tiny LALM on SAKE-mini so that every SAKE metric means something on a CPU."""

from __future__ import annotations

import json
import logging
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch

from evaluation.exact import exact_match
from lalms.base import LALM
from lit_modules.base import TrainedLALMModule, finite_everywhere, refuse_fp16, saved_hparams

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PretrainSchedule:
    """AdamW with a linear warm-up and a cosine decay, stepped once per batch over the trainer's
    estimated steps (configs/experiment/pretrain_tiny.yaml: one pass over data.steps batches)."""

    lr: float
    """The peak learning rate, reached at the end of the warm-up."""
    weight_decay: float
    """AdamW's decoupled weight decay on the matrices (ndim >= 2); biases and norms get none."""
    warmup_steps: int
    """Steps of linear warm-up: step s (from 0) runs at lr * (s + 1) / warmup_steps."""
    min_lr_ratio: float
    """The cosine decay's floor as a share of lr, reached at the last step."""


@dataclass(frozen=True)
class PretrainHParams:
    """How the tiny LALM is pretrained: the module's `hp` (pretrain_tiny.yaml's `module` keys)."""

    schedule: PretrainSchedule
    """The optimiser's settings (the objective is the answer NLL, with no settings)."""
    max_new_tokens: int
    """Greedy decoding's limit for the validation accuracies (exact match)."""


class TinyPretrainModule(TrainedLALMModule):
    """Teacher-forced answer NLL on mixed pretraining tasks; greedy exact-match accuracy in validation."""

    HParams = PretrainHParams

    def __init__(self, *, lalm: LALM, hp: PretrainHParams) -> None:
        super().__init__(lalm)
        self.hp = hp
        saved_hparams(self, hp=hp)
        self._correct: dict[str, list[float]] = defaultdict(list)
        self.register_buffer("skipped_steps", torch.zeros((), dtype=torch.long))

    def on_fit_start(self) -> None:
        refuse_fp16(self.trainer, "pretraining the tiny LALM")

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """A step with a non-finite gradient on any rank is skipped on every rank: without
        gradients the optimiser leaves every weight as it is."""
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not finite_everywhere([p.grad for p in params], self.trainer):
            for p in params:
                p.grad = None
            self.skipped_steps += 1
            log.warning("step %d: non-finite gradients, skipped", self.global_step)
        self.log("train/skipped_steps", self.skipped_steps.float())

    def on_train_epoch_start(self) -> None:
        self.model.train()  # Lightning keeps submodule modes; the adapter loads models in eval mode

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self.lalm.loss(batch["prompts"], batch["answers"])
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["prompts"]))
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        n = len(batch["prompts"])
        self.log("val/loss", self.lalm.loss(batch["prompts"], batch["answers"]), batch_size=n)
        responses = self.lalm.generate(batch["prompts"], self.hp.max_new_tokens)
        for resp, ans, task, attr in zip(
            responses, batch["answers"], batch["tasks"], batch["attributes"], strict=True
        ):
            ok = float(exact_match(resp, ans))
            self._correct[task].append(ok)
            if task == "attribute":
                self._correct[f"attribute_{attr}"].append(ok)

    def on_validation_epoch_end(self) -> None:
        for key, values in sorted(self._correct.items()):
            self.log(f"val/acc_{key}", sum(values) / len(values))
        self._correct.clear()

    def configure_optimizers(self):
        settings = self.hp.schedule
        decay = [p for n, p in self.model.named_parameters() if p.ndim >= 2]
        no_decay = [p for n, p in self.model.named_parameters() if p.ndim < 2]
        opt = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": settings.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=settings.lr,
        )
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warm, floor = settings.warmup_steps, settings.min_lr_ratio

        def schedule(step: int) -> float:  # linear warm-up, cosine decay to floor * lr
            if step < warm:
                return (step + 1) / warm
            progress = min(1.0, (step - warm) / max(1, total - warm))
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class ExportLALM(L.Callback):
    """At the end of training, save the trained LALM as a model folder (rank 0)."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        pl_module.lalm.save(self.out_dir)
        metrics = {k: round(float(v), 4) for k, v in trainer.callback_metrics.items()}
        info = {
            "global_step": trainer.global_step,
            "metrics": metrics,
            "run_dir": str(trainer.default_root_dir),
        }
        (self.out_dir / "training.json").write_text(json.dumps(info, indent=1), encoding="utf-8")
        log.info("exported the trained LALM to %s", self.out_dir)
