"""Discretized leaves: exact L-level distributions from a location and a scale (core/discretized.py)."""

from __future__ import annotations

import math

import pytest
import torch

from vq2pc.core import discretized as disc
from vq2pc.core.leaf_ops import component_log_likelihoods
from vq2pc.core.leaves import (
    Categorical,
    DiscretizedGaussian,
    DiscretizedLogistic,
    Gaussian,
    discretize,
    leaf_from_tensors,
)

CLASSES = (DiscretizedGaussian, DiscretizedLogistic)
MEANS = (-100.0, -1.0, 0.0, 0.3, 0.5, 0.5 + 1 / 512, 1.0, 2.0, 100.0)
SCALES = (1e-8, 1e-6, 1e-3, 0.05, 1.0, 1e3, 1e6, 1e9)


def _grid(levels: int, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """Every (mean, scale) pair of MEANS × SCALES as ``[M, 1]`` columns."""
    mu, sc = torch.meshgrid(
        torch.tensor(MEANS, dtype=dtype),
        torch.tensor(SCALES, dtype=dtype),
        indexing="ij",
    )
    return mu.reshape(-1, 1), sc.reshape(-1, 1)


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("levels", [2, 5, 256])
def test_levels_sum_to_one_and_the_table_agrees(cls: type, levels: int) -> None:
    mu, sc = _grid(levels)
    v = torch.arange(levels, dtype=torch.float64)
    lp = cls(mu, sc, levels).log_prob(v)  # [M, L]
    assert not torch.isnan(lp).any() and not torch.isposinf(lp).any()
    assert torch.logsumexp(lp, 1).abs().max() < 1e-12
    table = disc.table_block(mu.T, sc.T, levels, cls.cdf).reshape(levels, -1).T  # P = 1 pixel, n = M components
    assert torch.allclose(table, lp, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cls", CLASSES)
def test_log_probs_are_the_cdf_differences(cls: type) -> None:
    """Where the plain difference F(b) − F(a) is accurate, the stable form equals it."""
    g = torch.Generator().manual_seed(0)
    levels, mu, sc = (
        16,
        torch.rand(50, 1, generator=g, dtype=torch.float64),
        torch.rand(50, 1, generator=g, dtype=torch.float64) * 0.3 + 0.02,
    )
    cdf = torch.special.ndtr if cls.cdf == "gaussian" else torch.sigmoid
    edges = torch.cat(
        [
            torch.tensor([-math.inf]),
            torch.arange(1, levels) / levels,
            torch.tensor([math.inf]),
        ]
    ).double()
    direct = cdf((edges[1:] - mu) / sc) - cdf((edges[:-1] - mu) / sc)  # [50, L]
    lp = cls(mu, sc, levels).log_prob(torch.arange(levels, dtype=torch.float64))
    ok = direct > 1e-6
    assert torch.allclose(lp.exp()[ok], direct[ok], rtol=1e-9)


@pytest.mark.parametrize("cls", CLASSES)
def test_float32_matches_float64_and_gradients_are_finite(cls: type) -> None:
    g = torch.Generator().manual_seed(1)
    levels = 256
    mu, sc = (
        torch.rand(300, 1, generator=g) * 1.4 - 0.2,
        torch.logspace(-4, 1, 300)[:, None],
    )
    v = torch.arange(levels, dtype=torch.float32)
    lp32 = cls(mu, sc, levels).log_prob(v).double()
    lp64 = cls(mu.double(), sc.double(), levels).log_prob(v.double())
    assert float(((lp32 - lp64).abs() / lp64.abs().clamp_min(1)).max()) < 1e-4
    t32 = disc.table_block(mu.T, sc.T, levels, cls.cdf).reshape(levels, -1).T.double()
    assert float(((t32 - lp64).abs() / lp64.abs().clamp_min(1)).max()) < 1e-4
    mu64, sc64 = _grid(8)
    mu64.requires_grad_(True)
    sc64.requires_grad_(True)
    lp = cls(mu64, sc64, 8).log_prob(torch.arange(8, dtype=torch.float64))
    grads = torch.autograd.grad(lp[lp > -1e6].sum(), [mu64, sc64])
    assert all(bool(torch.isfinite(t).all()) for t in grads)


@pytest.mark.parametrize("cls", CLASSES)
def test_mean_mode_and_samples_follow_the_probabilities(cls: type) -> None:
    levels = 8
    mu = torch.tensor([-1.0, 0.0, 0.3, 0.5, 0.99, 2.0, 0.6], dtype=torch.float64)
    sc = torch.tensor([1e-3, 0.1, 1e4, 0.2, 0.05, 1.0, 0.01], dtype=torch.float64)
    leaf = cls(mu, sc, levels)
    v = torch.arange(levels, dtype=torch.float64)
    p = cls(mu[:, None], sc[:, None], levels).log_prob(v).exp()  # [7, L]
    assert torch.allclose(leaf.mean(), (p * v).sum(1), rtol=1e-10)
    assert torch.equal(leaf.mode(), p.argmax(1).double())  # ties (μ = 0.5 on an edge) go to the lower level
    many = cls(mu[:, None].expand(-1, 40000), sc[:, None].expand(-1, 40000), levels)
    draws = many.sample(torch.Generator().manual_seed(0))
    freq = (draws[..., None] == v).double().mean(1)  # [7, L]
    assert float((freq - p).abs().max()) < 0.01


def test_gaussian_twin_is_never_above_the_dequantized_bpd() -> None:
    """log P(v) = log ∫_bin p(x) dx ≥ E_u log p((v+u)/L) − log L for a mixture (Jensen), image by image."""
    g = torch.Generator().manual_seed(2)
    levels, n, s = 4, 3, 2
    gauss = Gaussian(
        torch.rand(n, s, generator=g, dtype=torch.float64),
        torch.rand(n, s, generator=g, dtype=torch.float64) * 0.3 + 0.05,
    )
    w = torch.log_softmax(torch.randn(n, generator=g, dtype=torch.float64), 0)
    images = torch.cartesian_prod(*[torch.arange(levels, dtype=torch.float64)] * s)  # [L^S, S]
    discrete = torch.logsumexp(w + component_log_likelihoods(gauss.discretized(levels), images), 1)
    k = 200  # midpoint quadrature of E_u over each image's bin
    u = (torch.arange(k, dtype=torch.float64) + 0.5) / k
    grid = torch.cartesian_prod(u, u)  # [k², S]
    x = ((images[:, None, :] + grid[None]) / levels).reshape(-1, s)
    dens = torch.logsumexp(w + component_log_likelihoods(gauss, x), 1).reshape(len(images), -1).mean(1)
    assert bool((discrete >= dens - s * math.log(levels) + 1e-9).all())
    assert abs(float(torch.logsumexp(discrete, 0))) < 1e-12


def test_round_trip_twin_and_errors() -> None:
    mean, scale = torch.rand(3, 4), torch.rand(3, 4) + 0.1
    for cls in CLASSES:
        leaf = cls(mean, scale, 16)
        back = leaf_from_tensors(leaf.kind, leaf.tensors(), 16)
        assert (
            type(back) is cls and back.levels == 16 and torch.equal(back.loc, mean) and torch.equal(back.scale, scale)
        )
        sub = leaf[1:]
        assert type(sub) is cls and sub.batch_shape == (2, 4) and sub.levels == 16
        assert leaf.data_kind == "categorical"
    twin = Gaussian(mean, scale).discretized(16)
    assert isinstance(twin, DiscretizedGaussian) and twin.loc is mean and discretize(twin, 16) is twin
    with pytest.raises(ValueError, match="only Gaussian leaves"):
        discretize(Categorical(torch.zeros(2, 3, 4)), 4)
    with pytest.raises(ValueError, match="levels must be an integer >= 2"):
        DiscretizedGaussian(mean, scale, 1)
    with pytest.raises(ValueError, match="same shape"):
        DiscretizedLogistic(mean, scale[:2], 4)
    with pytest.raises(ValueError, match="integer levels in \\[0, 15\\]"):
        DiscretizedGaussian(mean, scale, 16).validate_data(torch.tensor([16.0]))
    with pytest.raises(ValueError, match="unknown cdf"):
        disc.log_density(torch.zeros(1), "cauchy") if False else disc.level_log_prob(
            torch.zeros(1), mean, scale, 4, "cauchy"
        )
