"""Exported editors, and loading them back for `evaluate.py ckpt=`.

Two kinds of trained editor share one layout, a folder with `editor.yaml` naming the editor's
`method` (one of editors/registry.py's) and its `hparams` (plain data):
- `kind: network`, the hypernetwork editors (MEND, KE): `editor.safetensors` holds the
  network; editor.yaml records the edited weights' digest;
- `kind: calibrated` (WISE, UnKE): `state.pt` holds what the editor cached (preservation
  activations, preserved keys); its hparams have the calibrated values written in, and
  editor.yaml records the whole model's fingerprint and the calibration's figures.
Both record the model (name, path, digest), the data (name, digest of the training files) and
the training run. Loading onto another model fails with an error that names both.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file

from common import TrainPool
from common.files import fsync_dir, fsync_tree
from editors.hypernet import HypernetEditor, HyperNetwork
from editors.registry import build, hparams
from lalms.base import LALM

log = logging.getLogger(__name__)

INFO, WEIGHTS, STATE = "editor.yaml", "editor.safetensors", "state.pt"
KINDS = {"network": WEIGHTS, "calibrated": STATE}


WHAT_DIFFERS = {
    "edited_parameters": "the edited parameters differ",
    "edited_shapes": "the edited shapes differ",
    "fingerprint": "the weights differ",
}


class EditorModelMismatch(ValueError):
    """An exported editor was trained on a different model than the one it is loaded onto."""


def model_info(network: HyperNetwork) -> dict[str, Any]:
    lalm = network.lalm
    return {
        **lalm_info(lalm, network.fingerprint()),
        "edited_parameters": list(network.param_names),
        "edited_shapes": [list(s) for s in network.shapes],
    }


def lalm_info(lalm: LALM, fingerprint: str | None = None) -> dict[str, Any]:
    """The model an editor was trained on; `fingerprint` defaults to the whole model's."""
    return {
        "name": lalm.name,
        "family": type(lalm).__name__,
        "path": lalm.source,
        "fingerprint": fingerprint or lalm.fingerprint(),
    }


def _write(out_dir: str | Path, info: Mapping[str, Any], write_state: Callable[[Path], None]) -> Path:
    """Write an export atomically; an existing one moves to `<out_dir>.previous`."""
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write_state(tmp)
    (tmp / INFO).write_text(yaml.safe_dump(dict(info), sort_keys=False), encoding="utf-8")
    fsync_tree(tmp)  # on disk before it takes the export's name
    if out.exists():
        previous = out.with_name(out.name + ".previous")
        shutil.rmtree(previous, ignore_errors=True)
        out.rename(previous)
        log.info("kept the earlier export at %s", previous)
    tmp.rename(out)
    fsync_dir(out.parent)
    return out


def save_editor(
    network: HyperNetwork,
    method: str,
    hp: Mapping[str, Any],
    out_dir: str | Path,
    editor: str,
    data: Mapping[str, Any] | None = None,
    training: Mapping[str, Any] | None = None,
    recipe: Mapping[str, Any] | None = None,
) -> Path:
    """Export a hypernetwork editor; `recipe` is the training config it came from."""
    state = {k: v.detach().cpu().contiguous() for k, v in network.state_dict().items()}
    info = {
        "editor": editor,
        "kind": "network",
        "method": method,
        "hparams": dict(hp),
        "model": model_info(network),
        "data": dict(data or {}),
        "training": dict(training or {}),
        "recipe": dict(recipe) if recipe is not None else None,
    }
    return _write(out_dir, info, lambda tmp: save_file(state, tmp / WEIGHTS))


def save_calibrated(
    editor: Any,
    method: str,
    hp: Mapping[str, Any],
    out_dir: str | Path,
    name: str,
    data: Mapping[str, Any] | None = None,
    training: Mapping[str, Any] | None = None,
    calibration: Mapping[str, Any] | None = None,
    recipe: Mapping[str, Any] | None = None,
) -> Path:
    """Export a calibrated editor: `method` with `hp` (the calibrated values written in)
    rebuilds it, and its `state_dict()` (tensors, tuples, dicts, numbers) restores its cache."""
    info = {
        "editor": name,
        "kind": "calibrated",
        "method": method,
        "hparams": dict(hp),
        "model": lalm_info(editor.lalm),
        "data": dict(data or {}),
        "training": dict(training or {}),
        "calibration": dict(calibration or {}),
        "recipe": dict(recipe) if recipe is not None else None,
    }
    state = editor.state_dict()
    return _write(out_dir, info, lambda tmp: torch.save(state, tmp / STATE))


def read_info(ckpt: str | Path) -> dict[str, Any]:
    """editor.yaml, checked: its kind, its method (one of the project's) and hparams (that
    method's record), and the state file its kind needs; before anything is loaded."""
    path = Path(ckpt)
    if not (path / INFO).is_file():
        raise FileNotFoundError(
            f"{path}: not an exported editor (no {INFO}); train one with train.py editor=..."
        )
    info = yaml.safe_load((path / INFO).read_text(encoding="utf-8"))
    source = str(path / INFO)
    if not isinstance(info, dict) or info.get("kind") not in KINDS:
        raise ValueError(f"{source}: key 'kind' must be one of {sorted(KINDS)} (an export of this project)")
    if not (path / KINDS[info["kind"]]).is_file():
        raise FileNotFoundError(f"{path}: the export has {INFO} but no {KINDS[info['kind']]}")
    hparams(info.get("method"), info.get("hparams"), source)  # UnsafeConfig / HParamsError now
    return info


def export_digest(ckpt: str | Path) -> str:
    """A digest of an export's files: a retrained or recalibrated editor is another run."""
    info = read_info(ckpt)
    h = hashlib.sha256()
    for name in (INFO, KINDS[info["kind"]]):
        h.update((Path(ckpt) / name).read_bytes())
    return h.hexdigest()[:12]


def _check(ckpt: str | Path, info: Mapping[str, Any], here: Mapping[str, Any], keys: tuple[str, ...]) -> None:
    trained = info["model"]
    for key in keys:
        if here[key] != trained[key]:
            raise EditorModelMismatch(
                f"{ckpt}: this {info['editor']} editor was trained on model {trained['name']!r} "
                f"({trained['path']}, weights {trained['fingerprint']}), but the loaded model is "
                f"{here['name']!r} ({here['path']}, weights {here['fingerprint']}): "
                f"{WHAT_DIFFERS[key]}. Load the model it was trained on (model=...); "
                f"from Python, load_editor(..., check_model=False) skips this check."
            )


def load_editor(ckpt: str | Path, lalm: LALM, pool: TrainPool, check_model: bool = True) -> Any:
    """Rebuild an exported editor on `lalm`; raises EditorModelMismatch for another model.

    Only the project's own editor classes are built (editors/registry.py: UnsafeConfig for any
    other method in the file), and weights and state load through safetensors and
    `torch.load(weights_only=True)`: a shared folder can do nothing but load weights."""
    info = read_info(ckpt)
    path = Path(ckpt)
    editor = build(info["method"], info["hparams"], lalm, pool, str(path / INFO))
    if info["kind"] == "network":
        if check_model:  # fingerprint: the edited weights
            _check(ckpt, info, model_info(editor), ("edited_parameters", "edited_shapes", "fingerprint"))
        editor.load_state_dict(load_file(str(path / WEIGHTS), device=str(lalm.device)))
        return HypernetEditor(editor)
    if check_model:  # fingerprint: the whole model (the cached state depends on every layer below)
        _check(ckpt, info, lalm_info(lalm), ("fingerprint",))
    editor.load_state_dict(torch.load(path / STATE, map_location=lalm.device, weights_only=True))
    return editor
