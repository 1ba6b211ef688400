"""Meta-training the hypernetwork editors: batches, the Lightning loop, export/load, resume, DDP."""

import itertools
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from datamodules import SakeDataModule
from editors.checkpoint import EditorModelMismatch, load_editor
from lalms import Qwen2Audio
from lalms.base import IGNORE_INDEX, answer_nll
from lit_modules.base import ExportEditor
from lit_modules.hypernet import MetaBatch
from tests.helpers import load_model, training_module

ROOT = Path(__file__).resolve().parents[1]
# The modules as train.py builds them on the tiny model, with smaller networks.
SMALL = {
    "mend": ("editor.hparams.rank=32",),
    "ke": ("editor.hparams.lstm_dim=8", "editor.hparams.condition_dim=16", "editor.hparams.hidden_dim=8",
           "editor.hparams.max_scale=1.0"),
}  # fmt: skip


@pytest.fixture(scope="module")
def shipped():
    return load_model(Qwen2Audio, ROOT / "checkpoints" / "tiny-lalm", name="tiny")


def module(kind, lalm, *overrides, pool=None):
    L.seed_everything(0)
    return training_module(kind, lalm, pool, *SMALL[kind], *overrides)


def trainer(tmp_path, callbacks=(), **kw):
    args = dict(
        default_root_dir=tmp_path,
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        deterministic=True,
    )
    args.update(kw)
    return L.Trainer(callbacks=list(callbacks), **args)


def data(mini_dir, batch_size=2):
    return SakeDataModule(str(mini_dir), name="sake_mini", num_workers=0, batch_size=batch_size)


def test_meta_batch_rows_and_deterministic_locality(mini_dir):
    examples = [ex for _, ex in zip(range(3), data(mini_dir).dataset("train"), strict=False)]
    batch = MetaBatch.build(examples, locality=2, seed=0)
    assert len(batch.groups) == 3 and all(len(g) == 1 + 3 + 2 for g in batch.groups)
    for b, group in enumerate(batch.groups):
        kinds = [batch.kinds[r] for r in group]
        assert kinds[:4] == ["edit", "text_equiv", "audio_equiv", "audio_equiv"]
        assert kinds[4:] == ["locality", "locality"]
        assert batch.edit_rows[b] == group[0]
        questions = {q.prompt.question for q in examples[b].locality}
        assert {batch.prompts[r].question for r in group[4:]} <= questions
        assert batch.answers[group[0]] == examples[b].instance.target
    again = MetaBatch.build(examples, locality=2, seed=0)
    assert [p.question for p in again.prompts] == [p.question for p in batch.prompts]
    full = MetaBatch.build(examples, locality=None)
    assert all(len(g) == 1 + 3 + len(ex.locality) for g, ex in zip(full.groups, examples, strict=True))


@pytest.mark.parametrize("kind", ["mend", "ke"])
def test_meta_training_logs_exports_and_the_export_loads(kind, shipped, mini_dir, tiny_dirs, tmp_path):
    mod = module(kind, shipped)
    out = tmp_path / "export"
    fit = trainer(
        tmp_path, [ExportEditor(str(out))], limit_train_batches=3, limit_val_batches=2, log_every_n_steps=1
    )
    fit.fit(mod, datamodule=data(mini_dir))
    metrics = fit.callback_metrics
    # The logged validation figures are the edit-weighted means over the 2 validation batches of 2,
    # recomputed here from the trained network.
    examples = list(itertools.islice(iter(data(mini_dir).dataset("val")), 4))
    mod.net.eval()
    outs = [mod.meta_step(MetaBatch.build(examples[i : i + 2], None, mod.hp.objective.seed)) for i in (0, 2)]
    for key in (
        "success_edit",
        "success_text_equiv",
        "success_audio_equiv",
        "locality",
        "edit_loss",
        "loc_loss",
    ):
        expected = sum(float(o[key].detach()) for o in outs) / 2
        assert float(metrics[f"val/{key}"]) == pytest.approx(expected, abs=1e-5), key
    assert float(metrics["val/edit_loss"]) > 0

    info = yaml.safe_load((out / "editor.yaml").read_text())
    assert info["editor"] == kind and info["model"]["name"] == "tiny"
    assert info["model"]["edited_parameters"] == mod.net.param_names
    assert info["data"]["name"] == "sake_mini" and len(info["data"]["fingerprint"]) == 16

    editor = load_editor(out, shipped, None)
    for a, b in zip(editor.network.state_dict().values(), mod.net.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    before = {n: p.detach().clone() for n, p in shipped.model.named_parameters()}
    request = next(iter(data(mini_dir).dataset("val"))).request()
    handle = editor.apply(request)
    assert any(not torch.equal(p, before[n]) for n, p in shipped.model.named_parameters())
    handle.undo()
    assert all(torch.equal(p, before[n]) for n, p in shipped.model.named_parameters())

    other = load_model(Qwen2Audio, tiny_dirs["qwen2_audio"])  # same shapes, other weights
    with pytest.raises(EditorModelMismatch, match="trained on model 'tiny'"):
        load_editor(out, other, None)


class Kill(L.Callback):
    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.at:
            raise RuntimeError("killed")


def test_a_killed_and_resumed_run_ends_with_the_same_weights(shipped, mini_dir, tmp_path):
    steps = 4
    whole = module("mend", shipped)
    trainer(tmp_path / "whole", limit_train_batches=steps).fit(whole, datamodule=data(mini_dir))

    ckpts = tmp_path / "ckpt"
    save = L.pytorch.callbacks.ModelCheckpoint(
        dirpath=ckpts, save_top_k=0, save_last=True, every_n_train_steps=1
    )
    killed = module("mend", shipped)
    with pytest.raises(RuntimeError, match="killed"):
        trainer(
            tmp_path / "killed", [save, Kill(2)], limit_train_batches=steps, enable_checkpointing=True
        ).fit(killed, datamodule=data(mini_dir))
    assert torch.load(ckpts / "last.ckpt", weights_only=False)["global_step"] == 2
    resumed = module("mend", shipped)
    dm = data(mini_dir)
    trainer(tmp_path / "resumed", limit_train_batches=steps).fit(
        resumed, datamodule=dm, ckpt_path=ckpts / "last.ckpt"
    )
    assert dm.state_dict() == {"epoch": 0, "batches": steps}
    for (name, a), b in zip(whole.net.state_dict().items(), resumed.net.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    # and training did move the network
    assert not torch.equal(whole.net.edit_lrs, module("mend", shipped).net.edit_lrs)


def test_two_process_cpu_ddp_trains_on_disjoint_data(mini_dir, tmp_path):
    seen = tmp_path / "seen"
    args = [
        "editor=mend",
        "trainer=ddp_cpu",
        f"data.root={mini_dir}",
        "data.build_mini=false",
        "data.batch_size=2",
        "+trainer.limit_train_batches=3",
        "+trainer.limit_val_batches=1",
        "editor.hparams.rank=32",
        "+callbacks.seen._target_=lit_modules.hypernet.RecordSeenInstances",
        f"+callbacks.seen.out_dir={seen}",
        f"editor.callbacks.export.out_dir={tmp_path / 'export'}",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    env = {**os.environ, "PROJECT_ROOT": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True, env=env, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]
    ranks = [(seen / f"seen-rank{r}.txt").read_text().split() for r in (0, 1)]
    assert all(len(r) == 6 for r in ranks)  # 3 steps of 2 on each rank
    assert not set(ranks[0]) & set(ranks[1])
    assert (tmp_path / "export" / "editor.safetensors").is_file()


def test_the_same_command_trains_the_same_editor_bit_for_bit(mini_dir, tmp_path):
    """`make run`'s reproducibility: two runs of one command export identical weights."""
    import hashlib

    digests = []
    for run in ("a", "b"):
        args = [
            "editor=mend", f"data.root={mini_dir}", "data.build_mini=false", "data.batch_size=2",
            "+trainer.max_steps=4", "+trainer.limit_val_batches=1", "editor.hparams.rank=16",
            f"editor.callbacks.export.out_dir={tmp_path / run / 'export'}", f"hydra.run.dir={tmp_path / run}",
        ]  # fmt: skip
        env = {**os.environ, "PROJECT_ROOT": str(ROOT)}
        out = subprocess.run(
            [sys.executable, "train.py", *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            env=env,
            timeout=600,
        )
        assert out.returncode == 0, out.stderr[-3000:]
        digests.append(
            hashlib.sha256((tmp_path / run / "export" / "editor.safetensors").read_bytes()).hexdigest()
        )
    assert digests[0] == digests[1]


def test_the_meta_objective_is_sakes_loss_edit_by_edit(shipped, mini_dir):
    """Per edit: the sum over its generality queries of each one's mean answer NLL, and the sum
    over its locality queries of KL(pre || post) averaged over every attended position, both
    under that edit alone; averaged over the edits (LALMTrainer.edit_step in SAKE's fork)."""
    mod = module("mend", shipped, "editor.hparams.edit_lr=1.0", "editor.module.cedit=0.3",
                 "editor.module.cloc=2.0")  # fmt: skip
    mod.net.eval()
    examples = list(itertools.islice(iter(data(mini_dir).dataset("train")), 2))
    batch = MetaBatch.build(examples, locality=None)
    out = mod.meta_step(batch)
    params = dict(shipped.model.named_parameters())
    edit_losses, loc_losses, answer_only = [], [], []
    for group in batch.groups:
        row = group[0]
        (cap,), _ = mod.net.capture(shipped.encode([batch.prompts[row]], [batch.answers[row]]), [0])
        (deltas,) = mod.net.deltas([cap])
        edited = {n: params[n] + d.dense() for n, d in zip(mod.net.param_names, deltas, strict=True)}
        nll, kl, kl_answer = 0.0, 0.0, 0.0
        with torch.no_grad():
            for r in group[1:]:
                enc = shipped.encode([batch.prompts[r]], [batch.answers[r]])
                post = shipped.logits(enc, params=edited)
                if batch.kinds[r] != "locality":
                    nll += float(answer_nll(post, enc["labels"]))
                    continue
                pre = shipped.logits(enc).log_softmax(-1)
                per_position = (pre.exp() * (pre - post.log_softmax(-1))).sum(-1)[0]
                kl += float(per_position.mean())
                kl_answer += float(per_position[:-1][enc["labels"][0, 1:] != IGNORE_INDEX].mean())
        edit_losses.append(nll)
        loc_losses.append(kl)
        answer_only.append(kl_answer)
    expected_edit, expected_loc = sum(edit_losses) / 2, sum(loc_losses) / 2
    assert float(out["edit_loss"]) == pytest.approx(expected_edit, rel=1e-4)
    assert float(out["loc_loss"]) == pytest.approx(expected_loc, rel=1e-3)
    assert expected_loc > 1e-4 and abs(sum(answer_only) / 2 - expected_loc) > 1e-2 * expected_loc
    assert float(mod.objective(out)) == pytest.approx(0.3 * expected_edit + 2.0 * expected_loc, rel=1e-3)


def test_mend_edit_lrs_learn_at_lr_as_sakes_run_or_at_their_own_rate(shipped):
    mod = module("mend", shipped, "editor.module.lr_lr=null", "editor.module.lr=0.25")
    (group,) = mod.configure_optimizers().param_groups
    assert group["lr"] == 0.25 and any(p is mod.net.edit_lrs for p in group["params"])
    mod = module("mend", shipped, "editor.module.lr_lr=0.5")
    others, lrs = mod.configure_optimizers().param_groups
    assert lrs["params"] == [mod.net.edit_lrs] and lrs["lr"] == 0.5
    assert not any(p is mod.net.edit_lrs for p in others["params"])


@pytest.mark.slow
@pytest.mark.parametrize(
    ("editor", "bars"),
    [
        (
            "mend",
            {"success_edit": 0.9, "success_text_equiv": 0.8, "success_audio_equiv": 0.8, "locality": 0.8},
        ),
        pytest.param(
            "ke",
            {"success_edit": 0.85},
            marks=pytest.mark.xfail(reason="KE, SAKE's objective: 58% on tiny (README)", strict=True),
        ),
    ],
)
def test_the_tiny_recipe_meets_the_issue_bars(editor, bars, tmp_path):
    """`python train.py editor=<editor>` on the tiny LALM and full SAKE-mini (~15 min each)."""
    args = [
        f"editor={editor}",
        f"editor.callbacks.export.out_dir={tmp_path / 'export'}",
        f"hydra.run.dir={tmp_path}",
    ]
    env = {**os.environ, "PROJECT_ROOT": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True, env=env
    )
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = yaml.safe_load((tmp_path / "export" / "editor.yaml").read_text())["training"]["metrics"]
    for key, bar in bars.items():
        assert metrics[f"val/{key}"] >= bar, (key, metrics)


def test_an_export_of_another_recipe_is_never_replaced(mini_dir, tmp_path):
    """A 2-step trial cannot replace the editor a longer run exported; `make run`'s
    skip_if_exported=true reuses an export only when it was made by the very same recipe."""
    export = tmp_path / "export"
    common = [
        "editor=mend", f"data.root={mini_dir}", "data.build_mini=false", "data.batch_size=2",
        "+trainer.limit_val_batches=1", "editor.hparams.rank=16",
        f"editor.callbacks.export.out_dir={export}",
    ]  # fmt: skip

    def train(*args):
        env = {**os.environ, "PROJECT_ROOT": str(ROOT)}
        return subprocess.run([sys.executable, "train.py", *common, *args], cwd=ROOT, capture_output=True,
                              text=True, env=env, timeout=600)  # fmt: skip

    assert train("+trainer.max_steps=4", f"hydra.run.dir={tmp_path / 'a'}").returncode == 0
    first = (export / "editor.safetensors").read_bytes()
    trial = train("+trainer.max_steps=2", f"hydra.run.dir={tmp_path / 'b'}")
    assert trial.returncode != 0 and "holds an editor trained by another recipe" in trial.stderr
    assert "trainer.max_steps: 4 there, 2 now" in trial.stderr
    assert not (tmp_path / "b" / "checkpoints").exists()  # refused before training
    same = train("+trainer.max_steps=4", "skip_if_exported=true", f"hydra.run.dir={tmp_path / 'c'}")
    assert same.returncode == 0 and "already trained by this recipe" in same.stdout + same.stderr
    assert (export / "editor.safetensors").read_bytes() == first and not (
        export.parent / "export.previous"
    ).exists()
