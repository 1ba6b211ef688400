"""Typed, frozen settings records filled from config data (editors' hyperparameters, the
training modules' objective and schedule, the LLM judge's request and connection).

Every editor takes `Method(lalm, hp, pool)` where `hp` is a frozen dataclass without defaults:
the YAML in configs/editor/ (with configs/tuning/[_profiles/]<...>/ on top) is the one source of its
values. `parse` builds one from a plain mapping and refuses a missing, unknown or mistyped key
with a message naming where it came from and the key's full path. A training module's `hp`
(lit_modules/: `MetaTraining`, its `Objective` and `Schedule`, ...) is read the same way by
`parse_flat` from its config, which lists the fields of its groups side by side.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

T = TypeVar("T")


class HParamsError(ValueError):
    """A config does not fill an editor's hyperparameters: a key is missing, unknown or mistyped."""


def parse(cls: type[T], raw: Any, source: str, key: str = "hparams") -> T:
    """An instance of the dataclass `cls` from `raw` (nested mappings for nested dataclasses)."""
    if not isinstance(raw, Mapping):
        raise HParamsError(f"{source}: {key} must be a mapping of {cls.__name__}'s fields, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    missing = [n for n in names if n not in raw]
    if missing:
        raise HParamsError(f"{source}: {', '.join(f'{key}.{n}' for n in missing)} missing ({cls.__name__})")
    unknown = sorted(set(raw) - set(names))
    if unknown:
        listed = ", ".join(f"{key}.{n}" for n in unknown)
        raise HParamsError(f"{source}: unknown {listed} ({cls.__name__} has {', '.join(names)})")
    return cls(**{n: _value(hints[n], raw[n], source, f"{key}.{n}") for n in names})


def parse_flat(cls: type[T], raw: Any, source: str, key: str) -> T:
    """An instance of the dataclass `cls` from one flat mapping: a field that is itself a record
    (a group, e.g. `Objective`) takes its own fields from `raw`, side by side with the other
    groups' and the plain fields (a module config lists `lr` beside `cedit`: `editor.module.lr`).
    Every name belongs to one field; a missing, unknown or mistyped key is an HParamsError
    naming `source` and `key.<name>`, as `parse`'s are."""
    if not isinstance(raw, Mapping):
        raise HParamsError(f"{source}: {key} must be a mapping of {cls.__name__}'s fields, got {raw!r}")
    hints = typing.get_type_hints(cls)
    groups = {  # field of cls -> the flat names it takes
        f.name: [g.name for g in dataclasses.fields(hints[f.name])]
        if dataclasses.is_dataclass(hints[f.name])
        else [f.name]
        for f in dataclasses.fields(cls)
    }
    names = [n for flat in groups.values() for n in flat]
    if len(set(names)) < len(names):
        raise TypeError(f"{cls.__name__}: its groups share a field name ({names}); parse it with `parse`")
    missing = [n for n in names if n not in raw]
    if missing:  # named with the record each belongs to
        owner = {
            n: _name(hints[f])
            for f, flat in groups.items()
            if dataclasses.is_dataclass(hints[f])
            for n in flat
        }
        where = ", ".join(f"{key}.{n}" + (f" ({owner[n]})" if n in owner else "") for n in missing)
        raise HParamsError(f"{source}: {where} missing ({cls.__name__})")
    unknown = sorted(set(raw) - set(names))
    if unknown:
        listed = ", ".join(f"{key}.{n}" for n in unknown)
        raise HParamsError(f"{source}: unknown {listed} ({cls.__name__} has {', '.join(names)})")
    values = {}
    for name, flat in groups.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = parse(hint, {n: raw[n] for n in flat}, source, key)
        else:
            values[name] = _value(hint, raw[name], source, f"{key}.{name}")
    return cls(**values)


def _value(hint: Any, value: Any, source: str, key: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return _value(option, value, source, key)
            except HParamsError as err:
                errors.append(str(err))
        raise HParamsError(
            errors[0] if len(errors) == 1 else f"{source}: {key} must be {_name(hint)}, got {value!r}"
        )
    if dataclasses.is_dataclass(hint):
        return parse(hint, value, source, key)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise HParamsError(f"{source}: {key} must be a list, got {value!r}")
        item = args[0] if args else Any
        return tuple(_value(item, v, source, f"{key}[{i}]") for i, v in enumerate(value))
    if origin in (dict, Mapping) or hint is dict:
        if not isinstance(value, Mapping):
            raise HParamsError(f"{source}: {key} must be a mapping, got {value!r}")
        k_hint, v_hint = args if args else (Any, Any)
        return types.MappingProxyType(
            {
                _value(k_hint, k, source, key): _value(v_hint, v, source, f"{key}.{k}")
                for k, v in value.items()
            }
        )
    if hint is Any:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float) and isinstance(value, bool):
        raise HParamsError(f"{source}: {key} must be {hint.__name__}, got {value!r}")
    if not isinstance(value, hint):
        raise HParamsError(f"{source}: {key} must be {_name(hint)}, got {value!r}")
    return value


def _name(hint: Any) -> str:
    return getattr(hint, "__name__", str(hint))


def replace(hp: T, **changes: Any) -> T:
    """`hp` with some fields changed; `group__field=value` changes a field of a nested record."""
    nested: dict[str, dict[str, Any]] = {}
    flat: dict[str, Any] = {}
    for name, value in changes.items():
        group, _, field = name.partition("__")
        if field:
            nested.setdefault(group, {})[field] = value
        else:
            flat[name] = value
    for group, values in nested.items():
        flat[group] = dataclasses.replace(getattr(hp, group), **values)
    return dataclasses.replace(hp, **flat)


def to_dict(hp: Any) -> dict[str, Any]:
    """The plain data a record was parsed from (tuples as lists): what exports write."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, tuple | list):
            return [plain(x) for x in v]
        if isinstance(v, Mapping):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(hp)
