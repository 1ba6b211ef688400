"""The project's editing methods: the one table of the classes an editor config, a training
module or an exported editor may build.

A file can name what to build (`_target_: editors.mend.MEND`), but only one of these classes:
`build` refuses any other target, and any target nested in the arguments, with an error naming
the file and the key. Nothing a file says is imported or called otherwise, so opening a shared
editor folder can do nothing but build one of these editors and load weights into it.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from editors.alphaedit import AlphaEdit
from editors.finetune import FineTune
from editors.ie_ike import DemonstrationIKE
from editors.ike import InstructionIKE
from editors.ke import KE
from editors.mend import MEND
from editors.rome import ROME
from editors.steering import OTSteering
from editors.unke import UnKE
from editors.wise import WISE

# Every class the configs in configs/editor/ build (several configs may share one class).
CLASSES: tuple[type, ...] = (
    MEND, KE, FineTune, InstructionIKE, DemonstrationIKE, WISE, UnKE, ROME, AlphaEdit, OTSteering,
)  # fmt: skip
ALLOWED: Mapping[str, type] = MappingProxyType({f"{c.__module__}.{c.__qualname__}": c for c in CLASSES})
# Hydra's instructions: a file may not use them to call anything else.
_HYDRA_KEYS = ("_target_", "_partial_", "_args_", "_recursive_", "_convert_")


class UnsafeConfig(ValueError):
    """A file names something to build that is not one of the project's editors."""


def _check_plain(value: Any, source: str, key: str) -> None:
    if isinstance(value, Mapping):
        for k, v in value.items():
            if k in _HYDRA_KEYS:
                raise UnsafeConfig(f"{source}: key '{key}.{k}': a nested {k} is not allowed; only plain data")
            _check_plain(v, source, f"{key}.{k}")
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            _check_plain(v, source, f"{key}[{i}]")


def resolve(config: Mapping[str, Any], source: str, key: str) -> tuple[type, dict[str, Any]]:
    """(the class `config._target_` names, its keyword arguments), or UnsafeConfig."""
    if not isinstance(config, Mapping) or "_target_" not in config:
        raise UnsafeConfig(f"{source}: key '{key}' must be a mapping with a _target_")
    target = config["_target_"]
    if target not in ALLOWED:
        raise UnsafeConfig(
            f"{source}: key '{key}._target_' names {target!r}, which is not one of the project's editors "
            f"({', '.join(sorted(ALLOWED))})"
        )
    kwargs = {k: v for k, v in config.items() if k != "_target_"}
    _check_plain(kwargs, source, key)
    return ALLOWED[target], kwargs


def build(config: Mapping[str, Any], source: str, key: str, **extra: Any) -> Any:
    """The editor (or network) `config` describes, built with `extra` (e.g. lalm=...)."""
    cls, kwargs = resolve(config, source, key)
    return cls(**kwargs, **extra)
