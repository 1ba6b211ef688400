"""train.py editor=wise|unke: calibration on the train split, export, loading, resume; TIES merging."""

import lightning as L
import pytest
import torch
import yaml

from editors.checkpoint import EditorModelMismatch, load_editor, read_info
from editors.unke import UnKE
from editors.wise import WISE, ties_merge
from evaluation.sweep import request
from lalms import Qwen2Audio
from lit_modules.base import ExportEditor
from lit_modules.calibration import best_threshold
from lit_modules.unke import quantile
from tests.helpers import configured, load_model, training_module
from tests.test_baseline_editors import sweeper
from tests.test_meta_training import Kill, data, trainer

# The calibrations as train.py builds them on the tiny model, with fewer questions and steps.
SMALL_WISE = ("editor.hparams.preservation.text=3", "editor.hparams.preservation.audio=3",
              "editor.hparams.training.steps=25")  # fmt: skip
SMALL_UNKE = ("editor.hparams.preservation.text=4", "editor.hparams.preservation.audio=2",
              "editor.hparams.block.steps=5")  # fmt: skip


def unke_calibration(lalm, pool, *overrides):
    return training_module("unke", lalm, pool, *SMALL_UNKE, *overrides)


def test_best_threshold_separates_and_stays_below_the_edit_prompts_own_distance():
    t, acc = best_threshold(torch.tensor([0.9, 0.8, 0.95]), torch.tensor([0.1, 0.2, 0.3]))
    assert 0.3 <= t < 0.8 and acc == 1.0
    t, acc = best_threshold(torch.tensor([0.6, 0.9]), torch.tensor([0.1, 0.7]))  # one overlap
    assert acc == 0.75 and (0.1 <= t < 0.6 or 0.7 <= t < 0.9)
    t, _ = best_threshold(torch.tensor([1.5, 2.0]), torch.tensor([1.2]))  # the best cut would be >= 1
    assert t < 1.0


def test_ties_merge_trims_elects_a_sign_and_averages_the_agreeing_entries():
    a = torch.tensor([[2.0, -1.0, 0.0, 0.1]])
    b = torch.tensor([[4.0, 3.0, -2.0, 0.0]])
    c = torch.tensor([[0.0, -1.0, 0.0, 0.0]])
    merged = ties_merge([a, b, c], density=1.0)
    # entry 0: both positive -> mean 3; entry 1: sum +1 elects +, only b agrees -> 3;
    # entry 2: only b -> -2; entry 3: only a -> 0.1
    assert torch.allclose(merged, torch.tensor([[3.0, 3.0, -2.0, 0.1]]))
    trimmed = ties_merge([a, b], density=0.5)  # a keeps 2.0 and -1.0 of its three; b keeps 4.0, 3.0
    assert torch.allclose(trimmed, torch.tensor([[3.0, 3.0, 0.0, 0.0]]))
    assert torch.equal(ties_merge([a, torch.zeros_like(a)], density=0.5), a)  # one memory: itself
    assert quantile([5, 1, 3, 2, 4], 0.95) == 5 and quantile([5, 1, 3, 2, 4], 0.4) == 2


def test_wise_shards_train_their_own_edits_and_undo_exactly(shipped_lalm, pool, mini, mini_dir):
    wise = configured("wise", shipped_lalm, pool, *SMALL_WISE, "editor.hparams.shards=2")
    sw = sweeper(shipped_lalm, wise, mini_dir)
    weight = wise.module.weight.detach().clone()
    first = wise.apply(request(mini.sequences[0][0], sw.prompt(mini.sequences[0][0].reliability)))
    assert wise.shards[0].any() and not wise.shards[1].any()
    assert torch.equal(wise.side, weight + wise.shards[0])  # one active memory: W' is that shard
    shard0 = wise.shards[0].clone()
    second = wise.apply(request(mini.sequences[0][1], sw.prompt(mini.sequences[0][1].reliability)))
    assert torch.equal(wise.shards[0], shard0) and wise.shards[1].any()
    assert torch.allclose(wise.side, weight + ties_merge(wise.shards, wise.hp.merge_density))
    assert len(wise.in_scope) == 2 and wise.threshold == pytest.approx(0.88 * min(wise.in_scope))
    second.undo()
    assert torch.equal(wise.shards[0], shard0) and not wise.shards[1].any()
    first.undo()
    assert torch.equal(wise.side, weight) and not wise.shards[0].any() and not wise._hooks
    assert torch.equal(wise.module.weight, weight)


def test_wise_calibration_exports_an_editor_that_evaluate_loads(shipped_lalm, pool, mini_dir, tmp_path):
    candidates = "editor.module.candidates=[{alpha:5.0,beta:20.0,gamma:10.0},{alpha:2.0,beta:10.0,gamma:5.0}]"
    module = training_module("wise", shipped_lalm, pool, *SMALL_WISE, candidates)
    out = tmp_path / "wise"
    trainer(tmp_path, [ExportEditor(str(out))], limit_train_batches=1, limit_val_batches=1).fit(
        module, datamodule=data(mini_dir)
    )
    train, val = module.records["train"], module.records["val"]
    assert len(train) == len(val) == 2 * 2  # 2 edits x 2 candidates
    assert all(len(r["inside"]) == 3 and len(r["outside"]) >= 3 for r in train)

    info = read_info(out)
    chosen = info["calibration"]["chosen"]
    assert info["editor"] == "wise" and info["model"]["fingerprint"] == shipped_lalm.fingerprint()
    margins = ("alpha", "beta", "gamma")
    assert 0.0 <= chosen["act_ratio"] < 1.0 and chosen in [
        {"margins": {k: c[k] for k in margins}, "act_ratio": c["act_ratio"]}
        for c in info["calibration"]["candidates"]
    ]
    # the calibrated values build the editor
    assert (
        info["hparams"]["margins"] == chosen["margins"]
        and info["hparams"]["act_ratio"] == chosen["act_ratio"]
    )
    assert info["calibration"]["val"]["edits"] == 2 and "routing" in info["calibration"]["val"]

    wise = load_editor(out, shipped_lalm, pool)
    assert isinstance(wise, WISE) and wise.hp.act_ratio == chosen["act_ratio"]
    assert wise.hp.margins.alpha == chosen["margins"]["alpha"]
    x, mask = module.exported_editor().out_of_scope()
    assert torch.equal(wise._out_x[0], x) and torch.equal(wise._out_x[1], mask)  # loaded, not recomputed


def test_unke_calibration_chooses_the_key_search_and_exports_the_preserved_keys(
    shipped_lalm, pool, mini_dir, tiny_dirs, tmp_path
):
    module = unke_calibration(
        shipped_lalm, pool, "editor.module.key_lrs=[0.05,1.0]", "editor.module.max_steps=40"
    )
    out = tmp_path / "unke"
    trainer(tmp_path, [ExportEditor(str(out))], limit_train_batches=2, limit_val_batches=1).fit(
        module, datamodule=data(mini_dir)
    )
    train = module.records["train"]
    assert len(train) == 4 * 2 and {r["key_lr"] for r in train} == {0.05, 1.0}
    solved = {lr: [r["solved_at"] for r in train if r["key_lr"] == lr] for lr in (0.05, 1.0)}
    assert all(s is not None for s in solved[1.0])

    info = read_info(out)
    calibration = info["calibration"]
    rule = calibration["rule"]
    best = max(calibration["candidates"], key=lambda c: (c["solved"], -(c["median_steps"] or 1e9)))
    assert rule["lr"] == best["key_lr"]
    assert rule["steps"] == min(40, int(-(-1.5 * (best["steps_at_coverage"] + 1) // 1)))
    assert rule["clamp_norm"] == pytest.approx(1.5 * best["norm_at_coverage"], abs=1e-3)

    # Validation made each held-out edit end to end under both settings and kept the better one.
    val = calibration["val"]
    assert val["edits"] == 2 and len(module.records["val"]) == 2 * 2
    config = {"lr": 0.5, "steps": 25, "clamp_norm": 4.0}  # the config's stage 1
    figures = {s: (val[f"{s}/reliability"], val[f"{s}/generality"]) for s in ("calibrated", "config")}
    winner = "calibrated" if figures["calibrated"] > figures["config"] else "config"
    assert calibration["validated"] == winner and val["kept_config"] == (winner == "config")
    chosen = calibration["chosen"]["target"]
    assert chosen == (rule if winner == "calibrated" else config)
    for setting, (reliability, _) in figures.items():
        rows = [r for r in module.records["val"] if r["setting"] == setting]
        assert reliability == sum(r["reliable"] for r in rows) / 2

    unke = load_editor(out, shipped_lalm, pool)
    assert (
        isinstance(unke, UnKE)
        and unke.hp.target.lr == chosen["lr"]
        and unke.hp.target.steps == chosen["steps"]
    )
    args, kwargs, out_states, mask = module.exported_editor().preserved()
    loaded = unke.preserved()  # from the export, not recomputed
    assert torch.equal(loaded[0][0], args[0]) and torch.equal(loaded[2], out_states)
    assert torch.equal(loaded[3], mask) and set(loaded[1]) == set(kwargs)

    other = load_model(Qwen2Audio, tiny_dirs["qwen2_audio"])  # same architecture, other weights
    with pytest.raises(EditorModelMismatch, match="unke editor was trained on model .* weights differ"):
        load_editor(out, other, pool)


def test_a_killed_calibration_resumes_with_the_edits_already_recorded(shipped_lalm, pool, mini_dir, tmp_path):
    def calibration():
        return unke_calibration(
            shipped_lalm, pool, "editor.module.key_lrs=[1.0]", "editor.module.max_steps=20"
        )

    whole = calibration()
    trainer(tmp_path / "whole", limit_train_batches=3).fit(whole, datamodule=data(mini_dir))

    ckpts = tmp_path / "ckpt"
    save = L.pytorch.callbacks.ModelCheckpoint(
        dirpath=ckpts, save_top_k=0, save_last=True, every_n_train_steps=1
    )
    killed = calibration()
    with pytest.raises(RuntimeError, match="killed"):
        trainer(tmp_path / "killed", [save, Kill(2)], limit_train_batches=3, enable_checkpointing=True).fit(
            killed, datamodule=data(mini_dir)
        )
    resumed = calibration()
    trainer(tmp_path / "resumed", limit_train_batches=3).fit(
        resumed, datamodule=data(mini_dir), ckpt_path=ckpts / "last.ckpt"
    )
    assert [r["edit"] for r in resumed.records["train"]] == [r["edit"] for r in whole.records["train"]]
    assert resumed.records["train"] == whole.records["train"] and resumed.chosen == whole.chosen
    assert yaml.safe_dump(resumed.summary) == yaml.safe_dump(whole.summary)


def test_unke_validation_keeps_the_config_unless_the_calibration_edits_better(shipped_lalm, pool):
    module = unke_calibration(shipped_lalm, pool)  # the config's stage 1: lr 0.5, 25 steps, clamp 4
    rule = {"lr": 1.0, "steps": 9, "clamp_norm": 2.0}
    module.summary = {"rule": dict(rule)}

    def records(calibrated, config):  # (reliable, generality) per edit of each setting
        return [{"edit": f"e{i}", "setting": s, "reliable": r, "general": g}
                for s, rows in (("calibrated", calibrated), ("config", config))
                for i, (r, g) in enumerate(rows)]  # fmt: skip

    chosen_before = module.chosen
    _, chosen = module.score(
        records([(True, 0.0), (False, 1.0)], [(True, 0.0), (True, 0.0)])
    )  # config: more reliable
    assert chosen == {"target": {"lr": 0.5, "steps": 25, "clamp_norm": 4.0}}
    assert (
        module.summary["validated"] == "config" and module.chosen == chosen_before
    )  # score chooses, sets nothing
    figures, chosen = module.score(
        records([(True, 0.5), (True, 0.0)], [(True, 0.0), (True, 0.0)])
    )  # tie: generality
    assert (
        chosen == {"target": rule}
        and figures["calibrated/generality"] == 0.25
        and figures["kept_config"] == 0
    )
    module.score(records([(True, 0.0)], [(True, 0.0)]))  # a full tie keeps the published settings
    assert module.summary["validated"] == "config"
