"""A shared editor folder can do nothing but load weights: no target outside the project's editor
classes is built, nested targets are refused, and pickles load with weights_only=True."""

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from common.hparams import HParamsError, to_dict
from editors.checkpoint import load_editor, save_editor
from editors.registry import ALLOWED, UnsafeConfig, method
from tests.helpers import configured

ROOT = Path(__file__).resolve().parents[1]


class Payload:
    """Unpickling this touches `marker`: proof that a file's code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture
def export(shipped_lalm, tmp_path):
    net = configured("mend", shipped_lalm, None, "editor.hparams.rank=8")
    return save_editor(net, "editors.mend.MEND", to_dict(net.hp), tmp_path / "mend", "mend")


def rewrite(folder: Path, change) -> Path:
    info = yaml.safe_load((folder / "editor.yaml").read_text())
    change(info)
    (folder / "editor.yaml").write_text(yaml.safe_dump(info))
    return folder / "editor.yaml"


def test_an_editor_yaml_cannot_run_a_pickle_through_evaluate(export, mini_dir, tmp_path):
    marker = tmp_path / "pwned"
    (export / "payload.pt").write_bytes(pickle.dumps(Payload(marker)))
    path = rewrite(export, lambda info: info.update(method="torch.load"))
    env = {**os.environ, "PROJECT_ROOT": str(ROOT)}
    args = [f"ckpt={export}", f"hydra.run.dir={tmp_path / 'run'}", f"data.root={mini_dir}"]
    out = subprocess.run(
        [sys.executable, "evaluate.py", *args], cwd=ROOT, capture_output=True, text=True, env=env, timeout=600
    )
    assert out.returncode != 0 and not marker.exists()
    assert f"{path}: key 'method' names 'torch.load', which is not one of the project's editors" in out.stderr


def test_nested_targets_and_hydra_keys_are_refused(export, shipped_lalm):
    """Hyperparameters are plain data of the method's record: a target anywhere in them is a key
    the record does not have (or a value of the wrong type), refused before anything is built."""
    path = rewrite(export, lambda info: info["hparams"].update(rank={"_target_": "os.getcwd"}))
    with pytest.raises(HParamsError, match=rf"{path}: hparams.rank must be int"):
        load_editor(export, shipped_lalm, None)
    rewrite(export, lambda info: info["hparams"].update(rank=8, _partial_=True))
    with pytest.raises(HParamsError, match=r"unknown hparams._partial_"):
        load_editor(export, shipped_lalm, None)
    rewrite(export, lambda info: info.update(kind="pickle"))
    with pytest.raises(ValueError, match="key 'kind' must be one of"):
        load_editor(export, shipped_lalm, None)


def test_the_allow_list_holds_exactly_the_project_editor_classes():
    assert set(ALLOWED) == {
        "editors.mend.MEND", "editors.ke.KE", "editors.finetune.FineTune", "editors.i_ike.IIKE",
        "editors.ie_ike.IEIKE", "editors.wise.WISE", "editors.unke.UnKE", "editors.rome.ROME",
        "editors.alphaedit.AlphaEdit", "editors.steering.Steering",
    }  # fmt: skip
    with pytest.raises(UnsafeConfig, match="a file: key 'method' names 'os.system'"):
        method("os.system", "a file")


def test_calibrated_state_is_read_with_weights_only(shipped_lalm, pool, tmp_path):
    from editors.checkpoint import save_calibrated

    smaller = ("editor.hparams.preservation.text=2", "editor.hparams.preservation.audio=2")
    wise = configured("wise", shipped_lalm, pool, *smaller)
    out = save_calibrated(wise, "editors.wise.WISE", to_dict(wise.hp), tmp_path / "wise", "wise")
    marker = tmp_path / "pwned"
    (out / "state.pt").write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(pickle.UnpicklingError):
        load_editor(out, shipped_lalm, pool)
    assert not marker.exists()


def test_a_pickle_in_last_ckpt_does_not_run_through_train_resume(mini_dir, tmp_path):
    """`train.py ckpt_path=` loads with weights_only=True explicitly: also where the environment
    turns torch's default off (TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1), the payload never runs."""
    import torch

    marker = tmp_path / "pwned"
    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": {}, "global_step": 1, "payload": Payload(marker)}, ckpt)
    env = {**os.environ, "PROJECT_ROOT": str(ROOT), "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}
    args = [
        "editor=mend", "experiment=quickstart", f"data.root={mini_dir}", "data.build_mini=false",
        "data.max_instances=4", f"ckpt_path={ckpt}", f"hydra.run.dir={tmp_path / 'run'}",
        f"editor.callbacks.export.out_dir={tmp_path / 'export'}",
    ]  # fmt: skip
    out = subprocess.run(
        [sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True, env=env, timeout=600
    )
    assert out.returncode != 0 and not marker.exists(), out.stderr[-2000:]
    assert "Weights only load failed" in out.stderr, out.stderr[-2000:]
    assert not (tmp_path / "export").exists()
