"""The training modules' settings are typed records read from the configs: a missing, unknown or
mistyped key is refused naming the file and the key, every field is documented, and no Python
default stands beside a value a config sets."""

import ast
import dataclasses
import inspect
import textwrap

import pytest
from hydra.utils import get_class
from omegaconf import OmegaConf

from analysis.tracing import CausalTracer
from analysis.tracing import run as trace_run
from common.hparams import HParamsError, parse_flat
from lalms.processor_based import ProcessorLALM
from lit_modules.base import build_module
from lit_modules.hypernet import MetaTraining, Objective, Schedule
from lit_modules.mend import MENDSchedule, MENDTraining
from lit_modules.pretrain import PretrainHParams, PretrainSchedule
from lit_modules.unke import KeySearchCalibration
from lit_modules.wise import WISECalibrationHParams
from tests.helpers import ROOT, composed

RECORDS = (Objective, Schedule, MetaTraining, MENDSchedule, MENDTraining, PretrainSchedule,
           PretrainHParams, WISECalibrationHParams, KeySearchCalibration)  # fmt: skip
EDITORS = ("mend", "ke", "wise", "unke")


def mend_module(*overrides):
    return composed("train", "editor=mend", "model=tiny", *overrides).editor.module


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "~editor.module.cloc",
            r"configs/editor/mend\.yaml: module\.cloc \(Objective\) missing \(MENDTraining\)",
        ),
        ("~editor.module.max_grad_norm", r"mend\.yaml: module\.max_grad_norm \(MENDSchedule\) missing"),
        ("+editor.module.clocc=1.0", r"configs/editor/mend\.yaml: unknown module\.clocc \(MENDTraining has"),
        ("editor.module.lr=fast", r"configs/editor/mend\.yaml: module\.lr must be float, got 'fast'"),
        (
            "editor.module.locality_per_edit=some",
            r"mend\.yaml: module\.locality_per_edit must be int, got .some.",
        ),
        ("~editor.module.method", r"configs/editor/mend\.yaml: module\.method missing \(MENDModule\)"),
    ],
)
def test_a_module_config_that_does_not_fill_its_record_is_refused_naming_the_key(override, message):
    with pytest.raises(HParamsError, match=message):
        build_module(mend_module(override), "configs/editor/mend.yaml", lalm=None, pool=None)


def test_the_flat_config_fills_the_grouped_record():
    raw = OmegaConf.to_container(mend_module(), resolve=True)
    fields = {k: v for k, v in raw.items() if k not in ("_target_", "method", "editor_hparams")}
    hp = parse_flat(MENDTraining, fields, "configs/editor/mend.yaml", "module")
    # the tiny model's tuning (configs/tuning/tiny/mend.yaml) over SAKE's settings
    assert hp == MENDTraining(
        Objective(cedit=0.1, cloc=1.0, locality_per_edit=1, seed=0),
        MENDSchedule(lr=1e-4, lr_lr=None, max_grad_norm=100.0),
    )
    pretrain = composed("train", "experiment=pretrain_tiny").module
    raw = {k: v for k, v in OmegaConf.to_container(pretrain).items() if k != "_target_"}
    hp = parse_flat(PretrainHParams, raw, "configs/experiment/pretrain_tiny.yaml", "module")
    assert hp.schedule == PretrainSchedule(lr=2e-3, weight_decay=0.01, warmup_steps=100, min_lr_ratio=0.05)
    with pytest.raises(ValueError, match="coverage in"):
        KeySearchCalibration(key_lrs=(0.5,), max_steps=10, max_clamp=4.0, coverage=1.5, margin=1.5)


@pytest.mark.parametrize("record", RECORDS, ids=lambda r: r.__name__)
def test_every_field_of_a_training_record_has_no_default_and_a_docstring(record):
    assert dataclasses.is_dataclass(record) and record.__dataclass_params__.frozen
    for f in dataclasses.fields(record):
        assert f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING, f.name
    tree = ast.parse(textwrap.dedent(inspect.getsource(record)))
    body = tree.body[0].body
    documented = {
        node.target.id
        for node, after in zip(body, body[1:], strict=False)
        if isinstance(node, ast.AnnAssign)
        and isinstance(after, ast.Expr)
        and isinstance(after.value, ast.Constant)
        and isinstance(after.value.value, str)
    }
    assert documented == {f.name for f in dataclasses.fields(record)}


def defaulted(func, keys) -> list[str]:
    """The parameters of `func` named in `keys` that have a default."""
    params = inspect.signature(func).parameters
    return [k for k in keys if k in params and params[k].default is not inspect.Parameter.empty]


def given(node) -> list[str]:
    return [k for k in node if not str(k).startswith("_")]


@pytest.mark.parametrize("case", [*(f"editor={e}" for e in EDITORS), "experiment=pretrain_tiny"])
def test_no_constructor_default_stands_beside_a_value_the_config_sets(case):
    cfg = composed("train", case, "model=tiny" if case.startswith("editor") else "model=tiny_init")
    module = cfg.editor.module if case.startswith("editor") else cfg.module
    cls = get_class(module._target_)
    assert defaulted(cls.__init__, inspect.signature(cls.__init__).parameters) == []
    if case.startswith("experiment"):
        data = get_class(cfg.data._target_)
        assert defaulted(data.__init__, given(cfg.data)) == []


@pytest.mark.parametrize("model", ["tiny", "qwen", "af3"])
def test_processor_models_load_with_the_configs_values_only(model):
    cfg = OmegaConf.load(ROOT / "configs" / "model" / f"{model}.yaml")
    assert defaulted(ProcessorLALM.load, given(cfg)) == []


def test_tracing_takes_every_setting_from_its_config():
    run = composed("analyze", "analysis=trace", "model=tiny").analysis.run
    assert defaulted(CausalTracer.__init__, given(run)) == []
    assert defaulted(trace_run, given(run)) == []


def test_the_saved_hyperparameters_are_plain_data(shipped_lalm, tmp_path):
    """What Lightning writes to a checkpoint's `hyper_parameters` loads with weights_only=True
    (resume) and is the record's fields beside the editor it trains."""
    import torch

    from tests.helpers import training_module

    module = training_module("mend", shipped_lalm, None, "editor.hparams.rank=8")
    torch.save({"hyper_parameters": dict(module.hparams)}, tmp_path / "h.pt")  # as Lightning does
    saved = torch.load(tmp_path / "h.pt", weights_only=True)["hyper_parameters"]
    assert saved["hp"] == dataclasses.asdict(module.hp) and saved["method"] == "editors.mend.MEND"
    assert saved["editor_hparams"]["rank"] == 8 and module.hp.objective.cedit == 0.1
