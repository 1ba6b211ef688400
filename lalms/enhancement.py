"""AudioLens's enhancement (arXiv 2506.05140): a deeper layer's representation strengthened with
that of an earlier, attribute-rich one.

During the prefill (the forward over the whole prompt), at one position counted from the end of
the prompt (-1: the last, the one that predicts the answer's first token), the output hidden
states of each target LLM decoder layer become

    h_target + coefficient * h_source

where h_source is the source layer's output at that position. AudioLens's code takes h_source
from a separate clean run of the same prompt; since the source layer lies below every target,
nothing of the enhancement has reached it yet in the same forward, so keeping it there gives the
same value in one pass (tests/test_enhancement.py shows the equality). Generation steps after the
prefill (calls over one position, the prompt being in the KV cache) are left alone, as in
AudioLens's code: the prompt's enhanced keys and values are already in the cache.

An enhancement is a setting of the model: `Enhancement.apply(lalm)` puts its hooks on the
model (lalms/hooks.py; no weight is touched) and sets `lalm.enhancement`, which
`LALM.settings()` and so `fingerprint()`, `answers_fingerprint()` and every run identity include;
`undo()` removes both, and the model is bitwise what it was.

    enhanced = Enhancement(source_layer=1, target_layers=(3,), coefficient=0.5).apply(lalm)
    ...
    enhanced.undo()

From a config (evaluate.py / analyze.py `enhancement=`): a mapping with the fields, or the path
of a YAML file holding one (what `analyze.py enhance` writes as its choice): `from_config`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from lalms.base import LALM, hidden, with_hidden
from lalms.hooks import Hooks

FIELDS = ("source_layer", "target_layers", "coefficient", "position")
REQUIRED = ("source_layer", "target_layers", "coefficient")


def _integer(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{where}: an integer, got {value!r}")
    return value


@dataclass(frozen=True)
class Enhancement:
    """h_target += coefficient * h_source at `position`, during the prefill only.

    Layers index the LLM's decoder layers (`lalm.edit_sites.llm_layers`); negative ones count from
    the last (-1), as Python's. `position` counts from the end of the prompt: -1 is the last
    prompt position (left padding makes it the same position for every row of a batch)."""

    source_layer: int
    target_layers: tuple[int, ...]
    coefficient: float
    position: int = -1

    def __post_init__(self) -> None:
        _validate(self.source_layer, self.target_layers, self.coefficient, self.position, "enhancement")

    # ----------------------------------------------------------------- reading settings
    @classmethod
    def parse(cls, mapping: Mapping[str, Any], where: str = "enhancement") -> Enhancement:
        """The enhancement `mapping` describes (FIELDS; `position` defaults to -1). Errors name
        `where` (the config key or the file) and the field."""
        if not isinstance(mapping, Mapping):
            raise ValueError(f"{where}: a mapping of {', '.join(FIELDS)}, got {type(mapping).__name__}")
        unknown = sorted(str(k) for k in mapping if k not in FIELDS)
        if unknown:
            raise ValueError(f"{where}: unknown field(s) {', '.join(unknown)} (fields: {', '.join(FIELDS)})")
        missing = [k for k in REQUIRED if k not in mapping]
        if missing:
            raise ValueError(f"{where}: missing {', '.join(missing)} (fields: {', '.join(FIELDS)})")
        targets = mapping["target_layers"]
        if isinstance(targets, int) and not isinstance(targets, bool):
            targets = [targets]
        if isinstance(targets, str | bytes) or not hasattr(targets, "__iter__"):
            raise ValueError(f"{where}.target_layers: a list of layers, got {targets!r}")
        values = (
            mapping["source_layer"],
            tuple(targets),
            mapping["coefficient"],
            mapping.get("position", -1),
        )
        _validate(*values, where)
        return cls(*values)

    @classmethod
    def load(cls, path: str | Path) -> Enhancement:
        """The enhancement a YAML file holds (read as data: yaml.safe_load)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"enhancement={path}: no such file (a mapping, or the "
                                    "enhancement.yaml that `analyze.py enhance` writes)")  # fmt: skip
        try:
            content = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as err:
            raise ValueError(f"{path}: not YAML ({err})") from None
        return cls.parse(content, str(path))

    @classmethod
    def from_config(cls, value: Any, where: str = "enhancement") -> Enhancement | None:
        """The enhancement of a config value: null (none), a mapping of the fields, or the path of
        a YAML file holding one."""
        if value is None:
            return None
        if isinstance(value, cls):
            return value
        if isinstance(value, str | Path):
            return cls.load(value)
        if not isinstance(value, Mapping):  # an OmegaConf DictConfig is a Mapping
            raise ValueError(f"{where}: a mapping of {', '.join(FIELDS)} or a file's path, got {value!r}")
        return cls.parse({str(k): _plain(v) for k, v in value.items()}, where)

    def as_dict(self) -> dict[str, Any]:
        """The fields as plain data (what `from_config` reads back, and what settings record)."""
        return {"source_layer": self.source_layer, "target_layers": list(self.target_layers),
                "coefficient": float(self.coefficient), "position": self.position}  # fmt: skip

    def describe(self) -> str:
        targets = ",".join(str(t) for t in self.target_layers)
        return (f"h[{targets}] += {self.coefficient:g} * h[{self.source_layer}] at position "
                f"{self.position} (prefill)")  # fmt: skip

    # ----------------------------------------------------------------- on a model
    def resolved(self, num_layers: int) -> Enhancement:
        """The same enhancement with its layers counted from 0 on a model of `num_layers`."""

        def index(layer: int, field: str) -> int:
            if not -num_layers <= layer < num_layers:
                raise ValueError(f"enhancement.{field}: layer {layer} is not one of the model's "
                                 f"{num_layers} LLM layers")  # fmt: skip
            return layer % num_layers

        source = index(self.source_layer, "source_layer")
        targets = tuple(sorted(index(t, "target_layers") for t in self.target_layers))
        if len(set(targets)) != len(targets) or not all(source < t for t in targets):
            raise ValueError(f"enhancement: on a model of {num_layers} LLM layers, source_layer "
                             f"{self.source_layer} (= {source}) must lie below every target layer, and "
                             f"the targets be distinct (target_layers {list(self.target_layers)} = "
                             f"{list(targets)})")  # fmt: skip
        return replace(self, source_layer=source, target_layers=targets)

    def apply(self, lalm: LALM) -> Enhanced:
        """Put the enhancement on `lalm` (hooks only) until the handle's `undo()`."""
        return Enhanced(lalm, self)


def _validate(source: Any, targets: tuple, coefficient: Any, position: Any, where: str) -> None:
    """Errors naming `where` and the field for values that make no enhancement."""
    _integer(source, f"{where}.source_layer")
    if not targets:
        raise ValueError(f"{where}.target_layers: at least one layer")
    for layer in targets:
        _integer(layer, f"{where}.target_layers")
    if len(set(targets)) != len(targets):
        raise ValueError(f"{where}.target_layers: a layer listed twice in {list(targets)}")
    if (
        isinstance(coefficient, bool)
        or not isinstance(coefficient, int | float)
        or not math.isfinite(coefficient)
    ):
        raise ValueError(f"{where}.coefficient: a finite number, got {coefficient!r}")
    if _integer(position, f"{where}.position") >= 0:
        raise ValueError(f"{where}.position: counted from the end of the prompt (-1: the last), so "
                         f"negative; got {position}")  # fmt: skip
    layers = (source, *targets)
    comparable = all(x >= 0 for x in layers) or all(x < 0 for x in layers)  # else: once resolved
    if comparable and not all(source < t for t in targets):
        raise ValueError(f"{where}: source_layer {source} must lie below every target layer "
                         f"(target_layers {list(targets)})")  # fmt: skip


def _plain(value: Any) -> Any:
    """OmegaConf list nodes as lists (a DictConfig's values)."""
    if isinstance(value, str | bytes | int | float | bool) or value is None:
        return value
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if hasattr(value, "__iter__"):
        return [_plain(v) for v in value]
    return value


class Enhanced:
    """An enhancement in effect on a model: hooks on its source and target layers, and
    `lalm.enhancement` set, until `undo()` (also as a context manager)."""

    def __init__(self, lalm: LALM, enhancement: Enhancement) -> None:
        if lalm.enhancement is not None:
            raise RuntimeError(f"the model is already enhanced ({lalm.enhancement.describe()}): "
                               "undo that one first")  # fmt: skip
        es = lalm.edit_sites
        self.lalm = lalm
        self.enhancement = e = enhancement.resolved(es.num_llm_layers)
        layer = lambda i: lalm.model.get_submodule(f"{es.llm_layers}.{i}")  # noqa: E731
        self._source: torch.Tensor | None = None  # (batch, d): the source layer's output there
        self._hooks = Hooks().add(layer(e.source_layer), self._keep)
        for t in e.target_layers:
            self._hooks.add(layer(t), self._adder(last=t == e.target_layers[-1]))
        lalm.enhancement = e

    def _where(self, length: int) -> int | None:
        """The enhanced position of a call over `length` positions; None in a generation step."""
        if length == 1:  # a step after the prefill: the prompt is in the KV cache
            return None
        if length < -self.enhancement.position:
            raise ValueError(f"enhancement.position {self.enhancement.position}: the prompt has only "
                             f"{length} positions")  # fmt: skip
        return length + self.enhancement.position

    def _keep(self, module: nn.Module, args: tuple, out: Any) -> None:
        h = hidden(out)
        at = self._where(h.shape[1])
        self._source = None if at is None else h[:, at].detach().clone()

    def _adder(self, last: bool):
        coefficient = self.enhancement.coefficient

        def add(module: nn.Module, args: tuple, out: Any) -> Any:
            h = hidden(out)
            at = self._where(h.shape[1])
            if at is None:
                return None
            source = self._source
            if source is None or source.shape[0] != h.shape[0]:
                raise RuntimeError("enhancement: a target layer ran without its source layer in the same "
                                   "forward")  # fmt: skip
            if last:
                self._source = None  # nothing of this forward is kept past it
            enhanced = h.clone()
            enhanced[:, at] = h[:, at] + coefficient * source.to(h.dtype)
            return with_hidden(out, enhanced)

        return add

    def undo(self) -> None:
        """Remove the hooks and the setting: the model is exactly as it was before `apply`."""
        self._hooks.remove()
        self._source = None
        if self.lalm.enhancement == self.enhancement:
            self.lalm.enhancement = None

    def __enter__(self) -> Enhanced:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.undo()
