"""Which +FT rows a model gets: ``ft_strategies`` at ``ft_N``, and the capped twins at ``ft_std_max_N`` of ``ft_std_max_strategies``."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from vq2pc.pipeline.config import ModelSpec
from vq2pc.pipeline.finetune import ft_sources
from vq2pc.pipeline.rows import ResultRow

_FAMILY = {"sample": "DMRS", "beam": "DMBS", "gumbel": "DMGS"}


def _rows() -> list[ResultRow]:
    return [ResultRow(f"{f} m", f, n, 3.0, selection=s, requested_N=n) for s, f in _FAMILY.items() for n in (256, 4096)]


def _made(leaf: str = "gaussian", **spec) -> list[tuple[str, int, float | None]]:
    model = ModelSpec(name="m", N=[256, 4096], ft_strategies=["sample", "beam"], **spec)
    out = ft_sources(SimpleNamespace(spec=model, leaf=leaf), _rows())
    return [(job.row.selection, job.row.requested_N, job.std_max) for job in out]


def test_uncapped_rows_are_the_ft_strategies_at_every_n() -> None:
    assert _made() == [("sample", 256, None), ("sample", 4096, None), ("beam", 256, None), ("beam", 4096, None)]


def test_ft_n_keeps_only_those_n_of_the_strategies_it_names() -> None:
    assert _made(ft_N={"beam": [4096]}) == [("sample", 256, None), ("sample", 4096, None), ("beam", 4096, None)]
    assert _made(ft_N={"sample": [256], "beam": [256]}) == [("sample", 256, None), ("beam", 256, None)]


def test_capped_twins_come_only_from_rows_ft_n_keeps() -> None:
    made = _made(ft_N={"sample": [256]}, ft_std_max=[0.1], ft_std_max_N=[4096])
    assert made == [("sample", 256, None), ("beam", 256, None), ("beam", 4096, None), ("beam", 4096, 0.1)]


@pytest.mark.parametrize(
    ("spec", "capped"),
    [
        ({}, [("sample", 256), ("sample", 4096), ("beam", 256), ("beam", 4096)]),
        ({"ft_std_max_N": [4096]}, [("sample", 4096), ("beam", 4096)]),
        ({"ft_std_max_strategies": ["sample"]}, [("sample", 256), ("sample", 4096)]),
        ({"ft_std_max_N": [4096], "ft_std_max_strategies": ["sample"]}, [("sample", 4096)]),
    ],
)
def test_capped_twins_follow_the_n_and_strategy_filters(spec: dict, capped: list[tuple[str, int]]) -> None:
    made = _made(ft_std_max=[0.1, 0.2], **spec)
    assert made[:4] == _made()
    assert made[4:] == [(s, n, cap) for cap in (0.1, 0.2) for s, n in capped]


def test_categorical_leaves_get_no_capped_rows() -> None:
    assert _made("categorical", ft_std_max=[0.1], ft_std_max_strategies=["sample"]) == _made("categorical")
