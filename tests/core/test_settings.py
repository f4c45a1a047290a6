"""Settings classes: strict values, one line per problem naming its path, construction and ``replace``
checked alike, YAML-like data in and plain data out."""

from __future__ import annotations

import dataclasses
from typing import Annotated, Literal

import pytest
from pydantic import Field, model_validator

from vq2pc.core.settings import AsTuple, ConfigError, Count, Device, Positive, dump, parse, settings


@settings
class Inner:
    size: Count = 2
    kind: Literal["a", "b"] = "a"


@settings
class Outer:
    rate: Positive = Field(0.5, description="a rate")
    grid: Annotated[tuple[Count, Count], AsTuple] = (2, 2)
    flag: bool = True
    device: Device = "cpu"
    inner: Inner = dataclasses.field(default_factory=Inner)
    items: list[Inner] = dataclasses.field(default_factory=list)

    @model_validator(mode="after")
    def _agree(self) -> Outer:
        if self.flag and self.rate > 1:
            raise ValueError("rate > 1 needs flag: false")
        return self


def _problems(data: dict) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse(Outer, data, "cfg")
    assert str(info.value) == "\n".join(info.value.problems)
    return info.value.problems


def test_each_problem_is_one_line_naming_its_path() -> None:
    data = {"rate": 0, "grid": [2], "inner": {"size": "3", "kind": "c"}, "items": [{}, {"sise": 1}], "flag": 1}
    assert _problems(data) == [
        "cfg.rate must be > 0, got 0",
        "cfg.grid must have 2 items, got [2]",
        "cfg.flag must be true or false, got 1",
        "cfg.inner.size must be an integer, got '3'",
        "cfg.inner.kind must be 'a' or 'b', got 'c'",
        "cfg.items[1]: unknown key 'sise'; known: ['kind', 'size']",
    ]
    assert _problems({"device": "gpu0"}) == ["cfg.device: 'gpu0' is not a torch device; use cpu, cuda, cuda:N or mps"]
    assert _problems({"rate": 2.0}) == ["cfg: rate > 1 needs flag: false"]  # the class's validator, after the fields
    assert _problems({"rate": float("inf"), "grid": [1, 0]}) == [
        "cfg.rate must be a finite number, got inf",
        "cfg.grid[1] must be >= 1, got 0",
    ]


def test_construction_and_replace_are_checked_like_loading() -> None:
    with pytest.raises(ConfigError, match=r"^rate must be > 0, got -1\.0\nflag must be true or false, got 'no'$"):
        Outer(rate=-1.0, flag="no")
    with pytest.raises(ConfigError, match=r"^inner must be a mapping, got 3$"):
        Outer(inner=3)
    with pytest.raises(ConfigError, match=r"^rate > 1 needs flag: false$"):
        dataclasses.replace(Outer(flag=False, rate=3.0), flag=True)


def test_lists_read_as_tuples_and_integers_as_numbers_and_back() -> None:
    cfg = parse(Outer, {"rate": 1, "grid": [3, 4], "items": [{"size": 5}]})
    assert cfg == Outer(rate=1.0, grid=(3, 4), items=[Inner(size=5)]) and isinstance(cfg.rate, float)
    assert Outer(grid=[3, 4]).grid == (3, 4)
    plain = dump(cfg)
    assert plain["grid"] == [3, 4] and list(plain) == [f.name for f in dataclasses.fields(Outer)]
    assert parse(Outer, plain) == cfg
