"""The project's editing methods: the one table of the classes an editor config, a training
module or an exported editor may name.

A file names a method (`method: editors.rome.ROME`) and gives its hyperparameters as plain data
(`hparams: {...}`). `build` refuses any method not in this table (UnsafeConfig) and any
hyperparameter the method's record does not have (common/hparams.py: HParamsError), naming
the file and the key. Nothing a file says is imported or called otherwise, so opening a shared
editor folder can do nothing but build one of these editors and load weights into it.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from common import TrainPool
from common.hparams import parse
from editors.alphaedit import AlphaEdit
from editors.finetune import FineTune
from editors.i_ike import IIKE
from editors.ie_ike import IEIKE
from editors.ke import KE
from editors.mend import MEND
from editors.rome import ROME
from editors.steering import Steering
from editors.unke import UnKE
from editors.wise import WISE
from lalms.base import LALM

# Every class the configs in configs/editor/ name (several configs may share one class).
CLASSES: tuple[type, ...] = (MEND, KE, FineTune, IIKE, IEIKE, WISE, UnKE, ROME, AlphaEdit, Steering)
ALLOWED: Mapping[str, type] = MappingProxyType({f"{c.__module__}.{c.__qualname__}": c for c in CLASSES})


class UnsafeConfig(ValueError):
    """A file names something to build that is not one of the project's editors."""


def method(name: Any, source: str, key: str = "method") -> type:
    """The class `name` names, or UnsafeConfig."""
    if not isinstance(name, str) or name not in ALLOWED:
        raise UnsafeConfig(
            f"{source}: key {key!r} names {name!r}, which is not one of the project's editors "
            f"({', '.join(sorted(ALLOWED))})"
        )
    return ALLOWED[name]


def hparams(name: Any, raw: Any, source: str, key: str = "hparams") -> Any:
    """The typed hyperparameters of method `name` from plain data (HParamsError naming the key)."""
    return parse(method(name, source).HParams, raw, source, key)


def build(name: Any, raw: Any, lalm: LALM, pool: TrainPool, source: str, key: str = "hparams") -> Any:
    """`Method(lalm, hp, pool)` for the method `name` and its hyperparameters `raw`."""
    return method(name, source)(lalm, hparams(name, raw, source, key), pool)
