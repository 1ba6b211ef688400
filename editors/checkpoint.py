"""Exported hypernetwork editors: `editor.safetensors` + `editor.yaml`, and loading them back.

editor.yaml records what is needed to rebuild the network (its config), which model it was
trained on (name, path, a digest of the edited weights, the edited parameter names) and on
which data (name and a digest of the training files). Loading onto another model fails with
an error that names both.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from hydra.utils import instantiate
from safetensors.torch import load_file, save_file

from editors.hypernet import HypernetEditor, HyperNetwork
from lalms.base import LALM

log = logging.getLogger(__name__)

WEIGHTS, INFO = "editor.safetensors", "editor.yaml"


class EditorModelMismatch(ValueError):
    """An exported editor was trained on a different model than the one it is loaded onto."""


def model_info(network: HyperNetwork) -> dict[str, Any]:
    lalm = network.lalm
    return {
        "name": lalm.name,
        "family": type(lalm).__name__,
        "path": str(getattr(lalm.model.config, "_name_or_path", "")),
        "edited_parameters": list(network.param_names),
        "edited_shapes": [list(s) for s in network.shapes],
        "fingerprint": network.fingerprint(),
    }


def save_editor(
    network: HyperNetwork,
    network_cfg: Mapping[str, Any],
    out_dir: str | Path,
    editor: str,
    data: Mapping[str, Any] | None = None,
    training: Mapping[str, Any] | None = None,
) -> Path:
    """Write the editor to `out_dir` atomically; an existing export moves to `<out_dir>.previous`."""
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = {k: v.detach().cpu().contiguous() for k, v in network.state_dict().items()}
    save_file(state, tmp / WEIGHTS)
    info = {
        "editor": editor,
        "network": dict(network_cfg),
        "model": model_info(network),
        "data": dict(data or {}),
        "training": dict(training or {}),
    }
    (tmp / INFO).write_text(yaml.safe_dump(info, sort_keys=False), encoding="utf-8")
    if out.exists():
        previous = out.with_name(out.name + ".previous")
        shutil.rmtree(previous, ignore_errors=True)
        out.rename(previous)
        log.info("kept the earlier export at %s", previous)
    tmp.rename(out)
    return out


def read_info(ckpt: str | Path) -> dict[str, Any]:
    path = Path(ckpt)
    for name in (INFO, WEIGHTS):
        if not (path / name).is_file():
            raise FileNotFoundError(
                f"{path}: not an exported editor (no {name}); train one with train.py editor=..."
            )
    return yaml.safe_load((path / INFO).read_text(encoding="utf-8"))


def load_editor(ckpt: str | Path, lalm: LALM, check_model: bool = True) -> HypernetEditor:
    """Rebuild an exported editor on `lalm`; raises EditorModelMismatch for another model."""
    info = read_info(ckpt)
    trained = info["model"]
    network: HyperNetwork = instantiate(info["network"], lalm=lalm)
    here = model_info(network)
    if check_model:
        for key in ("edited_parameters", "edited_shapes", "fingerprint"):  # fingerprint: the weights
            if here[key] != trained[key]:
                raise EditorModelMismatch(
                    f"{ckpt}: this {info['editor']} editor was trained on model {trained['name']!r} "
                    f"({trained['path']}, edited weights {trained['fingerprint']}), but the loaded model is "
                    f"{here['name']!r} ({here['path']}, edited weights {here['fingerprint']}): "
                    f"{key.replace('_', ' ')} differ. Load the model it was trained on (model=...); "
                    f"from Python, load_editor(..., check_model=False) skips this check."
                )
    network.load_state_dict(load_file(str(Path(ckpt) / WEIGHTS), device=str(lalm.device)))
    return HypernetEditor(network)
