"""Dataclasses from YAML mappings with every value checked against its field's type (one clear error per
mistake), and back to plain YAML/JSON values."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import fields
from typing import Any

__all__ = ["build_dataclass", "plain"]


def build_dataclass(cls: type, data: dict[str, Any], where: str) -> Any:
    """Instantiate dataclass ``cls`` from ``data``, checking every value against the field's type."""
    if not isinstance(data, dict):
        raise ValueError(f"config: {where} must be a mapping, got {type(data).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(f"config: unknown key(s) {unknown} in {where}; known: {sorted(known)}")
    hints = typing.get_type_hints(cls)
    kwargs = {name: _typed(value, hints[name], f"{where}.{name}") for name, value in data.items()}
    try:
        return cls(**kwargs)
    except ValueError as exc:  # a dataclass's own range checks (e.g. TrainConfig)
        raise ValueError(f"{where}: {exc}") from None


_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in args)
    if origin in (list, tuple):
        size = f"{len(args)} " if origin is tuple and Ellipsis not in args else ""
        return f"a list of {size}{_type_name(args[0]).removeprefix('an ').removeprefix('a ')}s"
    if origin is dict:
        return "a mapping"
    return _TYPE_NAMES.get(tp, getattr(tp, "__name__", str(tp)))


def _typed(value: Any, tp: Any, where: str) -> Any:
    """``value`` checked against type ``tp`` (ints accepted for floats, lists for tuples); else a ValueError."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return build_dataclass(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for option in (a for a in args if a is not type(None)):
            try:
                return _typed(value, option, where)
            except ValueError:
                continue
    elif origin is list and isinstance(value, list):
        return [_typed(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    elif origin is tuple and isinstance(value, (list, tuple)) and (Ellipsis in args or len(value) == len(args)):
        return tuple(_typed(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
    elif origin is dict and isinstance(value, dict):
        return value
    elif tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    elif tp in (bool, str) and isinstance(value, tp):
        return value
    elif tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    elif tp not in _TYPE_NAMES and origin is None:  # a type this checker does not know: the dataclass judges
        return value
    raise ValueError(f"{where} must be {_type_name(tp)}, got {value!r}")


def plain(v: Any) -> Any:
    """``v`` with tuples as lists, recursively (as it reads back from YAML/JSON)."""
    if isinstance(v, tuple):
        return list(v)
    if isinstance(v, dict):
        return {k: plain(x) for k, x in v.items()}
    if isinstance(v, list):
        return [plain(x) for x in v]
    return v
