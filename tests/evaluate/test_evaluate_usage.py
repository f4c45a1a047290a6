"""Latent usage (Fig. 1): exact crossings on known distributions, chunking, multi-seed, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vq2pc.evaluate import latent_usage, usage_curve
from vq2pc.evaluate import usage as usage_mod


def _uniform_subset(m: int, support: int, seed: int = 0) -> torch.Tensor:
    """log p uniform over ``support`` random entries of a space of ``m`` (the rest -inf)."""
    logp = torch.full((m,), -math.inf)
    idx = torch.randperm(m, generator=torch.Generator().manual_seed(seed))[:support]
    logp[idx] = -math.log(support)
    return logp


def test_uniform_over_ten_percent(tmp_path) -> None:
    res = latent_usage(_uniform_subset(1000, 100), tmp_path / "usage.png")
    assert res["count_90"] == 90 and res["fraction_90"] == pytest.approx(0.09)
    assert res["count_99"] == 99 and res["fraction_99"] == pytest.approx(0.099)
    assert res["space_size"] == 1000 and res["seeds"] == 1
    assert res["per_seed"][0]["total_mass"] == pytest.approx(1.0, rel=1e-6)
    png = tmp_path / "usage.png"
    assert png.is_file() and png.stat().st_size > 1000 and res["figure"] == str(png)


def test_crossings_match_brute_force_across_chunks(monkeypatch) -> None:
    monkeypatch.setattr(usage_mod, "_CHUNK", 997)  # many chunks, crossings inside chunks
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(20_000, generator=g) * 3
    curve = usage_curve(logits)
    p = np.sort(torch.softmax(logits.double(), 0).numpy())[::-1]
    cdf = np.cumsum(p)
    for q, key in ((0.9, "90"), (0.99, "99")):
        assert curve[f"count_{key}"] == int(np.searchsorted(cdf, q)) + 1
    np.testing.assert_allclose(curve["cdf"], cdf[curve["counts"] - 1], rtol=1e-5)
    assert curve["cdf"][-1] == pytest.approx(1.0) and curve["counts"][-1] == 20_000


def test_unnormalized_input_is_renormalized() -> None:
    a = usage_curve(_uniform_subset(500, 50) + 7.0)
    assert a["count_90"] == 45 and a["total_mass"] == pytest.approx(math.exp(7.0), rel=1e-5)


def test_several_seeds_mean_and_std(tmp_path) -> None:
    seeds = [_uniform_subset(1000, 100), _uniform_subset(1000, 200, seed=1)]
    res = latent_usage(seeds, tmp_path / "u.png")
    assert res["fraction_90"] == pytest.approx((0.09 + 0.18) / 2)
    assert res["fraction_90_std"] == pytest.approx(0.045)
    assert res["seeds"] == 2 and len(res["per_seed"]) == 2


def test_bad_inputs_raise(tmp_path) -> None:
    with pytest.raises(ValueError, match="same latent space"):
        latent_usage([torch.zeros(10), torch.zeros(11)], tmp_path / "x.png")
    with pytest.raises(ValueError, match="NaN"):
        usage_curve(torch.tensor([0.0, float("nan")]))
    with pytest.raises(ValueError, match="1-d"):
        usage_curve(torch.zeros(3, 3))
    with pytest.raises(ValueError, match="no probability mass"):
        usage_curve(torch.full((4,), -math.inf))
