"""A shared editor folder can do nothing but load weights: no target outside the project's editor
classes is built, nested targets are refused, and pickles load with weights_only=True."""

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from editors.checkpoint import load_editor, save_editor
from editors.mend import MEND
from editors.registry import ALLOWED, UnsafeConfig

ROOT = Path(__file__).resolve().parents[1]


class Payload:
    """Unpickling this touches `marker`: proof that a file's code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture
def export(shipped_lalm, tmp_path):
    cfg = {"_target_": "editors.mend.MEND", "rank": 8}
    return save_editor(MEND(shipped_lalm, rank=8), cfg, tmp_path / "mend", "mend")


def rewrite(folder: Path, change) -> Path:
    info = yaml.safe_load((folder / "editor.yaml").read_text())
    change(info)
    (folder / "editor.yaml").write_text(yaml.safe_dump(info))
    return folder / "editor.yaml"


def test_an_editor_yaml_cannot_run_a_pickle_through_evaluate(export, mini_dir, tmp_path):
    marker = tmp_path / "pwned"
    (export / "payload.pt").write_bytes(pickle.dumps(Payload(marker)))
    target = {"_target_": "torch.load", "f": str(export / "payload.pt"), "weights_only": False}
    path = rewrite(export, lambda info: info.update(network=target))
    env = {**os.environ, "PROJECT_ROOT": str(ROOT)}
    args = [f"ckpt={export}", f"hydra.run.dir={tmp_path / 'run'}", f"data.root={mini_dir}"]
    out = subprocess.run(
        [sys.executable, "evaluate.py", *args], cwd=ROOT, capture_output=True, text=True, env=env, timeout=600
    )
    assert out.returncode != 0 and not marker.exists()
    assert (
        f"{path}: key 'network._target_' names 'torch.load', which is not one of the project's editors"
        in out.stderr
    )


def test_nested_targets_and_hydra_keys_are_refused(export, shipped_lalm):
    path = rewrite(export, lambda info: info["network"].update(rank={"_target_": "os.getcwd"}))
    with pytest.raises(UnsafeConfig, match=rf"{path}: key 'network.rank._target_': a nested _target_"):
        load_editor(export, shipped_lalm)
    rewrite(export, lambda info: info["network"].update(rank=8, _partial_=True))
    with pytest.raises(UnsafeConfig, match="network._partial_"):
        load_editor(export, shipped_lalm)


def test_the_allow_list_holds_exactly_the_project_editor_classes():
    assert set(ALLOWED) == {
        "editors.mend.MEND", "editors.ke.KE", "editors.finetune.FineTune", "editors.ike.InstructionIKE",
        "editors.ie_ike.DemonstrationIKE", "editors.wise.WISE", "editors.unke.UnKE", "editors.rome.ROME",
        "editors.alphaedit.AlphaEdit", "editors.steering.OTSteering",
    }  # fmt: skip


def test_calibrated_state_is_read_with_weights_only(shipped_lalm, mini_dir, tmp_path):
    from editors.checkpoint import save_calibrated
    from editors.wise import WISE

    wise = WISE(shipped_lalm, -2, str(mini_dir), n_text=2, n_audio=2)
    cfg = {
        "_target_": "editors.wise.WISE",
        "layer": -2,
        "preservation_root": str(mini_dir),
        "n_text": 2,
        "n_audio": 2,
    }
    out = save_calibrated(wise, cfg, tmp_path / "wise", "wise")
    marker = tmp_path / "pwned"
    (out / "state.pt").write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(pickle.UnpicklingError):
        load_editor(out, shipped_lalm)
    assert not marker.exists()
