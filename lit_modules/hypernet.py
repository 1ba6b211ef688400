"""Meta-training a hypernetwork editor (MEND, KE) on SAKE edit instances.

The objective is the one SAKE's MEND and KE were trained with (the SAKE authors' EasyEdit fork,
`easyeditor/trainer/LALMTrainer.py` edit_step): for each edit,
    loss = cedit * sum over its generality queries of the query's mean answer NLL
         + cloc * sum over its locality queries of KL(pre || post), averaged over the
           query's attended positions (prompt and answer alike),
averaged over the edits of a step (the reference: one edit per batch, two accumulated and
divided by two). The edit query itself carries the gradient the editor reads, not the loss.

Each training step takes B edit instances and, for all of them at once:
1. encodes one batch of rows: per edit, the edit query, its equivalents (generality: the text
   paraphrase and the other-audio queries, all answered with the target) and its locality
   queries (audio and text, answered with their own labels);
2. runs the frozen model once to capture each edit's gradient at the edited layers (its own
   loss only) and the pre-edit logits of every row;
3. turns the gradients into each edit's low-rank update and runs the model again with every
   row under its own edit (editors/hypernet.py), differentiably;
4. scores the edited rows: the losses above, and teacher-forced success: a row succeeds when
   every answer token (and the turn end) is the argmax, which is exactly when greedy decoding
   produces the answer; locality, when the argmax of every answer position is unchanged.
Subclasses (lit_modules/mend.py, lit_modules/ke.py) pick the optimiser. The objective's weights
and the schedule are the module's `hp` (`MetaTraining`: `Objective` and `Schedule`), parsed from
the editor's `module` keys side by side (configs/editor/_hypernet.yaml, mend.yaml, ke.yaml).
The base model is frozen and not a submodule: checkpoints hold the hypernetwork, its running
statistics and the optimiser, nothing of the LALM.
"""

from __future__ import annotations

import logging
import math
import random
import time
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torchmetrics import MeanMetric

from common import TrainPool
from common.prompt import Prompt
from datamodules.examples import EditExample
from editors.checkpoint import save_editor
from editors.hypernet import HyperNetwork
from editors.registry import build
from lalms.base import IGNORE_INDEX, LALM, answer_nll, greedy_hits
from lit_modules.base import (
    FrozenLALMModule,
    data_info,
    finite_everywhere,
    plain,
    refuse_fp16,
    run_info,
    saved_hparams,
)

log = logging.getLogger(__name__)

KINDS = ("edit", "text_equiv", "audio_equiv", "locality")
METRICS = (
    "loss",
    "edit_loss",
    "loc_loss",
    "success_edit",
    "success_text_equiv",
    "success_audio_equiv",
    "locality",
)


@dataclass
class MetaBatch:
    """The rows of B edits, and which rows belong to which edit."""

    prompts: list[Prompt]
    answers: list[str]
    kinds: list[str]  # one of KINDS per row
    groups: list[list[int]]  # rows of edit b
    edit_rows: list[int]  # the edit query's row of edit b

    @classmethod
    def build(cls, examples: Sequence[EditExample], locality: int | None = None, seed: int = 0) -> MetaBatch:
        """`locality`: how many locality queries (audio or text) per edit, sampled uniformly;
        None: all. The sample is a function of (seed, instance), not of any global RNG."""
        out = cls([], [], [], [], [])

        def add(prompt: Prompt, answer: str, kind: str) -> None:
            out.groups[-1].append(len(out.prompts))
            out.prompts.append(prompt)
            out.answers.append(answer)
            out.kinds.append(kind)

        for ex in examples:
            inst = ex.instance
            out.groups.append([])
            out.edit_rows.append(len(out.prompts))
            add(ex.edit.prompt, inst.target, "edit")
            for g in ex.generality:
                add(g.prompt, inst.target, "text_equiv" if g.query.type == 1 else "audio_equiv")
            loc = list(ex.locality)
            if locality is not None and locality < len(loc):  # a uniform sample, fixed per instance
                rng = random.Random(zlib.crc32(f"{seed}:{Path(inst.source).name}:{inst.index}".encode()))
                loc = rng.sample(loc, locality)
            for q in loc:
                add(q.prompt, q.answer, "locality")
        return out


def answer_positions(labels: torch.Tensor) -> torch.Tensor:
    """Mask [B, T-1] of the positions whose next token is an answer token."""
    return labels[:, 1:] != IGNORE_INDEX


@dataclass(frozen=True)
class Objective:
    """What meta-training minimises: SAKE's loss (the module docstring), per edit."""

    cedit: float
    """Weight of the edit loss: the sum over an edit's generality queries (its text paraphrase and
    other-audio queries, answered with the target) of each query's mean answer NLL under the edit."""
    cloc: float
    """Weight of the locality loss: the sum over an edit's locality queries of KL(pre || post),
    averaged over each query's attended positions (prompt and answer alike)."""
    locality_per_edit: int | None
    """Locality queries (audio or text) sampled per edit in training, uniformly; None: all of
    them. Validation always scores all of them."""
    seed: int
    """Seed of that sample: an edit's locality queries are a function of (seed, instance), not
    of any global RNG."""


@dataclass(frozen=True)
class Schedule:
    """How the hypernetwork is optimised (one optimiser step per batch of edits; the steps are the
    trainer's: editor.training.trainer.max_steps)."""

    lr: float
    """The optimiser's learning rate (MEND: Adam, KE: RMSprop), constant over training."""
    max_grad_norm: float
    """The meta-gradient's global norm is clipped to this before each step."""


@dataclass(frozen=True)
class MetaTraining:
    """A hypernetwork's meta-training: the module's `hp`, the editor YAML's `module` keys (the
    groups' fields side by side: `editor.module.lr`, `editor.module.cedit`)."""

    objective: Objective
    """The loss minimised."""
    schedule: Schedule
    """The optimiser's settings."""


class HypernetModule(FrozenLALMModule):
    """Meta-training loop shared by the hypernetwork editors (manual optimisation). Subclasses
    pick the optimiser and may set their own `HParams` (the type of their record `hp`)."""

    HParams: type = MetaTraining

    def __init__(
        self, *, lalm: LALM, pool: TrainPool, method: str, editor_hparams: Mapping[str, Any], hp: MetaTraining
    ) -> None:
        """The network is `method` with `editor_hparams` (the editor's: editor.method,
        editor.hparams, plain data kept for the export); `hp` is how it is meta-trained."""
        super().__init__(lalm)
        self.automatic_optimization = False
        self.method, self.editor_hparams, self.hp = method, plain(editor_hparams), hp
        saved_hparams(self, method=method, editor_hparams=self.editor_hparams, hp=hp)
        self.net: HyperNetwork = build(
            method, self.editor_hparams, lalm, pool, "editor.module", "editor_hparams"
        )
        self.register_buffer("skipped_steps", torch.zeros((), dtype=torch.long))
        # Validation means over all edits (and all DDP ranks), logged once per validation run.
        self.val_metrics = torch.nn.ModuleDict({k: MeanMetric() for k in METRICS})

    def on_fit_start(self) -> None:
        refuse_fp16(self.trainer, f"meta-training {type(self.net).__name__}")
        super().on_fit_start()

    # ------------------------------------------------------------------ the meta step
    def meta_step(self, batch: MetaBatch) -> dict[str, torch.Tensor]:
        lalm = self.lalm
        enc = lalm.encode(batch.prompts, batch.answers)
        captured, pre = self.net.capture(enc, batch.edit_rows)
        deltas = self.net.deltas(captured)
        with self.net.row_edits(deltas, batch.groups):
            post = lalm.logits(enc)
        labels = enc["labels"].to(post.device)
        attended = enc["attention_mask"].to(post.device).bool()
        kinds = batch.kinds

        def rows_of(*wanted: str) -> torch.Tensor:
            return torch.tensor([i for i, k in enumerate(kinds) if k in wanted], dtype=torch.long)

        generality, loc = rows_of("text_equiv", "audio_equiv"), rows_of("locality")
        edit_of = torch.empty(len(kinds), dtype=torch.long)
        for b, group in enumerate(batch.groups):
            edit_of[group] = b
        edit_of = edit_of.to(post.device)

        def per_edit_mean(values: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
            """Sum of `values` (one per row in `rows`) within each edit, averaged over edits."""
            sums = values.new_zeros(len(batch.groups)).index_add(0, edit_of[rows.to(post.device)], values)
            return sums.mean()

        out: dict[str, torch.Tensor] = {}
        out["edit_loss"] = (
            per_edit_mean(answer_nll(post[generality], labels[generality], reduction="none"), generality)
            if len(generality)
            else post.new_zeros(())
        )
        success = greedy_hits(post, labels).float()
        for k in ("edit", "text_equiv", "audio_equiv"):
            rows = rows_of(k)
            if len(rows):
                out[f"success_{k}"] = success[rows].mean()
        if len(loc):
            pre_lp = pre[loc].float().log_softmax(-1)
            post_lp = post[loc].float().log_softmax(-1)
            kl = (pre_lp.exp() * (pre_lp - post_lp)).sum(-1)  # KL(pre || post) per position
            mask = attended[loc]
            out["loc_loss"] = per_edit_mean((kl * mask).sum(-1) / mask.sum(-1), loc)
            answer = answer_positions(labels[loc])
            same = (pre_lp[:, :-1].argmax(-1) == post_lp[:, :-1].argmax(-1)) | ~answer
            out["locality"] = same.all(-1).float().mean()
        else:
            out["loc_loss"] = post.new_zeros(())
        return out

    def objective(self, out: dict[str, torch.Tensor]) -> torch.Tensor:
        """cedit * edit loss + cloc * locality loss (SAKE's MEND and KE alike)."""
        objective = self.hp.objective
        return objective.cedit * out["edit_loss"] + objective.cloc * out["loc_loss"]

    def _batch(self, examples: Sequence[EditExample], train: bool) -> MetaBatch:
        locality = self.hp.objective.locality_per_edit if train else None
        return MetaBatch.build(examples, locality, self.hp.objective.seed)

    def training_step(self, examples: list[EditExample], batch_idx: int) -> None:
        start = time.perf_counter()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.net.train()
        out = self.meta_step(self._batch(examples, train=True))
        loss = self.objective(out)
        opt = self.optimizers()
        opt.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        grads = [p.grad for p in self.net.parameters() if p.grad is not None]
        finite = finite_everywhere(grads, self.trainer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.hp.schedule.max_grad_norm)
        if finite:
            opt.step()
        else:  # a non-finite meta-gradient: skip the step on every rank
            self.skipped_steps += 1
        n = len(examples)
        logs = {f"train/{k}": v.detach() for k, v in out.items()}
        logs.update(
            {
                "train/loss": loss.detach(),
                "train/grad_norm": grad_norm.detach()
                if math.isfinite(float(grad_norm))
                else torch.tensor(-1.0),
                "train/skipped_steps": self.skipped_steps.float(),
                "time/step_s": torch.tensor(time.perf_counter() - start),
            }
        )
        if self.device.type == "cuda":
            logs["mem/peak_gib"] = torch.tensor(torch.cuda.max_memory_allocated(self.device) / 2**30)
        logs.update(self.extra_logs())
        self.log_dict(logs, batch_size=n, on_step=True, on_epoch=False)
        self.log("loss", loss.detach(), prog_bar=True, batch_size=n, logger=False)

    def extra_logs(self) -> dict[str, torch.Tensor]:
        return {}

    def validation_step(self, examples: list[EditExample], batch_idx: int) -> None:
        self.net.eval()
        with torch.inference_mode(False):  # capturing the edit gradient needs autograd
            out = self.meta_step(self._batch(examples, train=False))
        out["loss"] = self.objective(out)
        for k, v in out.items():
            self.val_metrics[k].update(v.detach(), weight=len(examples))
            self.log(f"val/{k}", self.val_metrics[k], on_step=False, on_epoch=True)

    def export(self, out_dir: Path, trainer: L.Trainer, recipe: Mapping[str, Any] | None = None) -> Path:
        """Write the network for `evaluate.py ckpt=` (rank 0): the best validation checkpoint's
        weights when a ModelCheckpoint monitors one, else the final ones."""
        monitoring = [c for c in trainer.checkpoint_callbacks if getattr(c, "monitor", None)]
        best = monitoring[0].best_model_path if monitoring else ""
        state, source = None, "final weights"
        if best and Path(best).is_file():
            ckpt = torch.load(best, map_location="cpu", weights_only=True)
            state = {k[len("net.") :]: v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
            score = float(monitoring[0].best_model_score)
            source = f"{best} ({monitoring[0].monitor} {score:.4f})"
        net = self.net
        if state is not None:
            current = {k: v.detach().clone() for k, v in net.state_dict().items()}
            net.load_state_dict(state)
        training = {**run_info(trainer), "weights": source}
        name = type(net).__name__.lower()
        out = save_editor(
            net, self.method, self.editor_hparams, out_dir, name, data_info(trainer), training, recipe
        )
        if state is not None:
            net.load_state_dict(current)
        log.info("exported the %s editor (%s) to %s", type(net).__name__, source, out)
        return out


class RecordSeenInstances(L.Callback):
    """Append the instances each rank trains on to `<out_dir>/seen-rank<r>.txt` (file:index per line).

    An audit of the data order: which records each DDP rank saw, and in what order.
    """

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        lines = [f"{Path(ex.instance.source).name}:{ex.instance.index}\n" for ex in batch]
        with open(self.out_dir / f"seen-rank{trainer.global_rank}.txt", "a", encoding="utf-8") as f:
            f.writelines(lines)
