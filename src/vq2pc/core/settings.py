"""Typed settings: the one place that says what a valid setting is.

Every config class (``TrainConfig``, ``FineTuneConfig``, ``EiNetConfig``, ``RunConfig`` and its sections,
the model architectures ``VQVAEConfig``, ``PriorConfig``, ``TransformerPriorConfig``, ``CMConfig``, and
``EMConfig``) is a :func:`settings` class: a pydantic dataclass whose fields declare their type, range (``Count``,
``Positive``, ...), choices (``Literal``) and help text (``Field(description=...)``), with the rules that
tie fields together in one ``model_validator`` per class. From these declarations come

* construction: ``TrainConfig(epochs=0)`` raises a :class:`ConfigError`, one line per problem;
* YAML loading: :func:`parse` (unknown keys refused, each problem named by its path,
  ``config.models[0].K must be >= 1, got 0``);
* the command line: ``vq2pc.cli.options.setting`` reads a flag's default, type, choices and help from a field.

The classes stay dataclasses, so ``dataclasses.asdict`` / ``replace`` work (``replace`` validates again).
Values are strict: ``"16"`` is not an integer and ``1`` is not ``true``; an integer is accepted where a
number is expected (read as a float), and a YAML list where a tuple is.
"""

from __future__ import annotations

import functools
import json
import typing
from typing import Annotated, Any, TypeVar

import pydantic.dataclasses
import torch
from pydantic import AfterValidator, BeforeValidator, ConfigDict, Field, TypeAdapter, ValidationError

__all__ = [
    "ConfigError",
    "settings",
    "parse",
    "dump",
    "Count",
    "Natural",
    "Levels",
    "Positive",
    "NonNegative",
    "Device",
    "AsTuple",
]

T = TypeVar("T")

Count = Annotated[int, Field(ge=1)]
"""An integer >= 1 (a size, a number of steps)."""
Natural = Annotated[int, Field(ge=0)]
"""An integer >= 0 (a seed, a patience)."""
Levels = Annotated[int, Field(ge=2)]
"""A number of pixel levels (>= 2)."""
Positive = Annotated[float, Field(gt=0, allow_inf_nan=False)]
"""A finite number > 0 (a learning rate, a std, a time limit)."""
NonNegative = Annotated[float, Field(ge=0, allow_inf_nan=False)]
"""A finite number >= 0 (a pseudo-count, a tolerance)."""


def _torch_device(name: str) -> str:
    try:
        torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"{name!r} is not a torch device; use cpu, cuda, cuda:N or mps") from None
    return name


Device = Annotated[str, AfterValidator(_torch_device)]
"""A device name torch can parse (whether this machine has it is checked when a run starts)."""

AsTuple = BeforeValidator(lambda v: tuple(v) if isinstance(v, list) else v)
"""Marks a tuple field that takes a list too (``Annotated[tuple[int, int], AsTuple]``), as YAML and JSON give it."""

_CONFIG = ConfigDict(strict=True, extra="forbid")


class ConfigError(ValueError):
    """Invalid settings: ``problems`` holds one line per problem, each naming its setting."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def settings(cls: type[T]) -> type[T]:
    """``cls`` as a strict pydantic dataclass (unknown keys refused) whose construction raises
    :class:`ConfigError` instead of pydantic's report."""
    cls = pydantic.dataclasses.dataclass(cls, config=_CONFIG)  # type: ignore[assignment]
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        try:
            init(self, *args, **kwargs)
        except ValidationError as exc:
            raise ConfigError(_problems(exc, "", type(self))) from None

    cls.__init__ = __init__  # type: ignore[misc]
    return cls


def parse(cls: type[T], data: Any, where: str = "config") -> T:
    """``cls`` from plain data (a YAML mapping), every value checked; problems are named from ``where``.

    The data is validated as JSON: nested mappings become the nested settings classes and lists become
    tuples where a field is one, while each value keeps its strict type."""
    try:
        return _adapter(cls).validate_json(json.dumps(data, default=str))
    except ValidationError as exc:
        raise ConfigError(_problems(exc, where, cls)) from None


def dump(obj: Any) -> Any:
    """A settings object as plain YAML/JSON values (tuples as lists), fields in declaration order."""
    return _adapter(type(obj)).dump_python(obj, mode="json")


@functools.cache
def _adapter(cls: type) -> TypeAdapter:
    """One validator per settings class, built on first use."""
    return TypeAdapter(cls)


_NEEDS = {
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "float_parsing": "a number",
    "finite_number": "a finite number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "string_type": "a string",
    "list_type": "a list",
    "tuple_type": "a list",
    "dict_type": "a mapping",
    "dataclass_type": "a mapping",
    "dataclass_exact_type": "a mapping",
}
_BOUNDS = {"greater_than": ("gt", ">"), "greater_than_equal": ("ge", ">="), "less_than": ("lt", "<")}
_BOUNDS |= {"less_than_equal": ("le", "<=")}


def _problems(exc: ValidationError, where: str, cls: type) -> list[str]:
    """One line per error of ``exc`` (raised validating ``cls``), each naming its setting's path."""
    return [_line(err, where, cls) for err in exc.errors()]


def _line(err: Any, where: str, cls: type) -> str:
    kind, loc, ctx = err["type"], tuple(err["loc"]), err.get("ctx", {})
    path, got = _path(where, loc), f", got {err['input']!r}"
    if kind in _NEEDS:
        return f"{path} must be {_NEEDS[kind]}{got}"
    if kind in _BOUNDS:
        key, sign = _BOUNDS[kind]
        return f"{path} must be {sign} {ctx[key]:g}{got}"
    if kind == "literal_error":
        return f"{path} must be {ctx['expected']}{got}"
    if kind in ("extra_forbidden", "unexpected_keyword_argument"):
        known = sorted(getattr(_type_at(cls, loc[:-1]), "__pydantic_fields__", {}))
        return _joined(_path(where, loc[:-1]), f"unknown key {loc[-1]!r}; known: {known}")
    if kind == "missing" and loc and isinstance(loc[-1], int):  # a fixed-length tuple given too few items
        size, given = len(typing.get_args(_type_at(cls, loc[:-1]))), list(err["input"])
        return f"{_path(where, loc[:-1])} must have {size} items, got {given!r}"
    if kind == "too_long":
        return f"{path} must have at most {ctx['max_length']} items, got {ctx['actual_length']}"
    if kind == "too_short":
        return f"{path} must have at least {ctx['min_length']} item(s){got}"
    if kind == "missing":
        return f"{path} is required"
    return _joined(path, str(ctx["error"]) if kind == "value_error" else err["msg"])


def _joined(path: str, message: str) -> str:
    return f"{path}: {message}" if path else message


def _path(where: str, loc: tuple[Any, ...]) -> str:
    """``config`` + ``("models", 0, "K")`` -> ``config.models[0].K``."""
    out = where
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}" if out else str(part)
    return out


def _type_at(cls: Any, loc: tuple[Any, ...]) -> Any:
    """The declared type at ``loc`` inside settings class ``cls`` (None of an Optional dropped)."""
    tp = _required(cls)
    for part in loc:
        fields = getattr(tp, "__pydantic_fields__", None)
        tp = _required(fields[part].annotation if fields is not None else typing.get_args(tp)[-1])
    return tp


def _required(tp: Any) -> Any:
    """``X`` of ``X | None``; any other type as it is."""
    args = typing.get_args(tp)
    return next(a for a in args if a is not type(None)) if type(None) in args else tp
