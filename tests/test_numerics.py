"""A non-finite step is skipped on purpose-made NaNs and training goes on; fp16 is refused."""

from types import SimpleNamespace

import lightning as L
import pytest
import torch

from lalms.tiny import new_tiny
from lit_modules.calibration import _finite
from lit_modules.mend import MENDModule
from lit_modules.pretrain import TinyPretrainModule
from tests.helpers import recipe_data, recipe_module

from .test_meta_training import data, module, trainer


class Watch(L.Callback):
    """The module's trainable state before and after each training batch."""

    def __init__(self) -> None:
        self.before: dict[int, dict] = {}
        self.after: dict[int, dict] = {}

    @staticmethod
    def state(module):
        params = module.net.named_parameters() if hasattr(module, "net") else module.model.named_parameters()
        return {n: p.detach().clone() for n, p in params}

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.before[batch_idx] = self.state(module)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.after[batch_idx] = self.state(module)


def changed(a: dict, b: dict) -> bool:
    return any(not torch.equal(a[k], b[k]) for k in a)


class NaNAtBatch1(MENDModule):
    calls = 0

    def objective(self, out):
        loss, self.calls = super().objective(out), self.calls + 1
        return loss * float("nan") if self.calls == 2 else loss


def test_a_non_finite_meta_step_is_skipped_and_training_goes_on(shipped_lalm, mini_dir, tmp_path):
    L.seed_everything(0)
    mod = module("mend", shipped_lalm, "editor.module._target_=tests.test_numerics.NaNAtBatch1")
    watch = Watch()
    trainer(tmp_path, [watch], limit_train_batches=4).fit(mod, datamodule=data(mini_dir))
    assert int(mod.skipped_steps) == 1
    assert not changed(watch.before[1], watch.after[1])  # the NaN step left every weight as it was
    assert changed(watch.before[2], watch.after[2]) and changed(watch.before[3], watch.after[3])
    assert all(torch.isfinite(p).all() for p in mod.net.parameters())


class NaNPretrain(TinyPretrainModule):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if batch_idx == 1 else loss


def test_a_non_finite_pretraining_step_is_skipped(mini_dir, tmp_path):
    lalm = new_tiny(seed=0)
    mod = recipe_module("pretrain_tiny", lalm, "module._target_=tests.test_numerics.NaNPretrain",
                        "module.warmup_steps=1")  # fmt: skip
    dm = recipe_data("pretrain_tiny", f"data.root={mini_dir}", "data.batch_size=2", "data.steps=4",
                     "data.val_examples=2")  # fmt: skip
    watch = Watch()
    trainer(tmp_path, [watch], limit_train_batches=4, gradient_clip_val=1.0).fit(mod, datamodule=dm)
    assert int(mod.skipped_steps) == 1
    assert not changed(watch.before[1], watch.after[1])
    assert changed(watch.before[2], watch.after[2])
    assert all(torch.isfinite(p).all() for p in lalm.model.parameters())


@pytest.mark.parametrize("precision", ["16-mixed", "16-true"])
def test_fp16_is_refused_with_a_clear_message(shipped_lalm, precision):
    mod = module("mend", shipped_lalm)
    mod._trainer = SimpleNamespace(precision=precision)
    with pytest.raises(ValueError, match=rf"trainer.precision={precision} is not supported.*bf16-mixed"):
        mod.on_fit_start()


def test_calibration_records_with_non_finite_figures_are_skipped():
    assert _finite({"edit": "a", "inside": [0.5, 1.0], "norm": None})
    assert not _finite({"edit": "a", "inside": [0.5, float("nan")]})
    assert not _finite({"edit": "a", "norm": float("inf")})
