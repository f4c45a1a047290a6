"""MixtureCircuit with discretized leaves: exact on every query, streamed over component chunks."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from vq2pc.circuit import MixtureCircuit
from vq2pc.circuit.kernels_discretized import DiscretizedKernel
from vq2pc.core.leaves import DiscretizedGaussian, DiscretizedLogistic, Gaussian

CLASSES = (DiscretizedGaussian, DiscretizedLogistic)


def _circuit(
    cls: type,
    n: int = 5,
    s: int = 3,
    levels: int = 4,
    seed: int = 0,
    budget: float = 1024,
) -> MixtureCircuit:
    g = torch.Generator().manual_seed(seed)
    mean = torch.rand(n, s, generator=g, dtype=torch.float64) * 1.2 - 0.1
    scale = torch.rand(n, s, generator=g, dtype=torch.float64) * 0.5 + 1e-3
    return MixtureCircuit(
        cls(mean, scale, levels),
        torch.randn(n, generator=g, dtype=torch.float64),
        memory_budget_mib=budget,
        meta={"levels": levels},
    )


def _images(s: int, levels: int) -> torch.Tensor:
    """Every image ``[L^S, S]`` in lexicographic order (the last variable fastest)."""
    return torch.cartesian_prod(*[torch.arange(levels, dtype=torch.float64)] * s).reshape(-1, s)


def _joint(c: MixtureCircuit, x: torch.Tensor) -> torch.Tensor:
    """``[B, N]`` log w_n + log p(x | n) by the leaf's elementwise log_prob (the reference)."""
    return c.log_weights + c.leaf.log_prob(x[:, None, :]).sum(-1)


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("s,levels", [(3, 4), (2, 8)])
def test_sums_to_one_over_every_image_and_matches_the_leaves(cls: type, s: int, levels: int) -> None:
    c = _circuit(cls, s=s, levels=levels)
    x = _images(s, levels)
    lp = c.log_prob(x)
    assert abs(float(torch.logsumexp(lp, 0))) < 1e-12
    assert torch.allclose(lp, torch.logsumexp(_joint(c, x), 1), rtol=0, atol=1e-12)
    assert torch.allclose(c.log_likelihoods(x), _joint(c, x) - c.log_weights, rtol=0, atol=1e-12)


@pytest.mark.parametrize("cls", CLASSES)
def test_streamed_equals_in_memory(cls: type) -> None:
    g = torch.Generator().manual_seed(3)
    big, small = (
        _circuit(cls, n=40, s=20, levels=16),
        _circuit(cls, n=40, s=20, levels=16, budget=0.05),
    )
    rows, cols = small._blocks(50)
    assert len(cols) > 1 and len(rows) >= 1  # components really are chunked
    x = torch.randint(0, 16, (50, 20), generator=g).double()
    mask = torch.rand(50, 20, generator=g) < 0.6
    for m in (None, mask):
        assert torch.allclose(small.log_prob(x, m), big.log_prob(x, m), rtol=0, atol=1e-10)
        assert torch.allclose(small.posterior(x, m), big.posterior(x, m), rtol=0, atol=1e-10)
    assert torch.equal(small.map(x, mask), big.map(x, mask))


@pytest.mark.parametrize("cls", CLASSES)
def test_marginals_conditionals_and_map_equal_brute_force(cls: type) -> None:
    s, levels = 3, 4
    c = _circuit(cls, s=s, levels=levels, seed=5)
    x = _images(s, levels)
    joint = _joint(c, x).reshape(levels, levels, levels, -1)  # [v0, v1, v2, N]
    mask = torch.tensor([True, False, True])  # x1 hidden
    marg = c.log_prob(x, mask).reshape(levels, levels, levels)[:, 0, :]
    ref = torch.logsumexp(torch.logsumexp(joint, 3), 1)
    assert torch.allclose(marg, ref, rtol=0, atol=1e-12)
    p1 = torch.softmax(torch.logsumexp(joint, 3), 1)  # p(x1 | x0, x2): [v0, v1, v2]
    v = torch.arange(levels, dtype=torch.float64)
    cm = c.conditional_mean(x, mask).reshape(levels, levels, levels, s)[:, 0, :, 1]
    assert torch.allclose(cm, (p1 * v[None, :, None]).sum(1), rtol=0, atol=1e-10)
    # MAP over (component, x1) given (x0, x2): the x1 of the best joint entry
    best = joint.permute(0, 2, 1, 3).reshape(levels, levels, -1).argmax(-1) // len(c)  # [v0, v2] -> x1
    got = c.map(x, mask).reshape(levels, levels, levels, s)[:, 0, :, 1]
    assert torch.equal(got, best.double())


@pytest.mark.parametrize("cls", CLASSES)
def test_samples_follow_the_distribution(cls: type) -> None:
    s, levels = 2, 4
    c = _circuit(cls, s=s, levels=levels, seed=7)
    draws = c.sample(20000, generator=torch.Generator().manual_seed(0))
    codes = (draws[:, 0] * levels + draws[:, 1]).long()
    freq = torch.bincount(codes, minlength=levels**s).double() / len(draws)
    assert float((freq - c.log_prob(_images(s, levels)).exp()).abs().max()) < 0.015
    obs = torch.tensor([[2.0, 0.0]]).expand(20000, 2)
    cond = c.sample(
        x=obs,
        mask=torch.tensor([True, False]),
        generator=torch.Generator().manual_seed(1),
    )
    assert bool((cond[:, 0] == 2).all())
    freq1 = torch.bincount(cond[:, 1].long(), minlength=levels).double() / 20000
    ref = torch.softmax(
        c.log_prob(torch.stack([torch.full((levels,), 2.0), torch.arange(levels).double()], 1)),
        0,
    )
    assert float((freq1 - ref).abs().max()) < 0.015


@pytest.mark.parametrize("cls", CLASSES)
def test_save_load_round_trip_is_exact(tmp_path: Path, cls: type) -> None:
    c = _circuit(cls, n=6, s=12, levels=16)
    d = MixtureCircuit.load(c.save(tmp_path / "c.safetensors"))
    assert type(d.leaf) is cls and d.leaf.levels == 16 and d.meta == c.meta and d.num_params == c.num_params
    x = torch.randint(0, 16, (5, 12), generator=torch.Generator().manual_seed(1)).double()
    assert torch.equal(d.log_prob(x), c.log_prob(x))
    with pytest.raises(ValueError, match="integer levels in \\[0, 15\\]"):
        d.log_prob(x + 0.5)


def test_gaussian_circuit_twin_bpd_is_not_above_the_dequantized_bpd() -> None:
    """On a tiny Gaussian circuit: the twin's discrete BPD ≤ the dequantized BPD averaged over many draws."""
    g = torch.Generator().manual_seed(11)
    n, s, levels = 4, 6, 8
    gauss = MixtureCircuit(
        Gaussian(
            torch.rand(n, s, generator=g, dtype=torch.float64),
            torch.rand(n, s, generator=g, dtype=torch.float64) * 0.2 + 0.02,
        ),
        torch.zeros(n, dtype=torch.float64),
    )
    twin = MixtureCircuit(gauss.leaf.discretized(levels), gauss.log_weights)
    v = torch.randint(0, levels, (20, s), generator=g).double()
    discrete = -twin.log_prob(v) / (s * math.log(2))
    draws = 4000
    x = (v.repeat(draws, 1) + torch.rand(draws * 20, s, generator=g, dtype=torch.float64)) / levels
    deq = (-gauss.log_prob(x) / (s * math.log(2)) + math.log2(levels)).reshape(draws, 20).mean(0)
    assert bool((discrete <= deq + 1e-3).all()) and float((deq - discrete).mean()) > 0


def test_marginal_over_unobserved_pixel_blocks_is_the_smaller_circuit() -> None:
    c = _circuit(DiscretizedGaussian, n=3, s=40, levels=8)
    assert isinstance(c._kernel, DiscretizedKernel)
    x = torch.randint(0, 8, (4, 40), generator=torch.Generator().manual_seed(2)).double()
    mask = torch.zeros(40, dtype=torch.bool)
    mask[:3] = True  # the other pixel blocks are skipped, not built
    head = MixtureCircuit(DiscretizedGaussian(c.leaf.loc[:, :3], c.leaf.scale[:, :3], 8), c.log_weights)
    assert torch.allclose(c.log_prob(x, mask), head.log_prob(x[:, :3]), rtol=0, atol=1e-12)


def test_em_refines_the_weights_of_a_discretized_circuit_only() -> None:
    from vq2pc.circuit.refine import EMConfig, em_refine

    c = _circuit(DiscretizedLogistic, n=4, s=3, levels=4, seed=9)
    x = torch.randint(0, 4, (200, 3), generator=torch.Generator().manual_seed(0)).double()
    refined, history = em_refine(c, x, EMConfig(iterations=5, leaves=False, prior_strength=1.0))
    assert history[-1] >= history[0] and float(refined.log_prob(x).mean()) >= float(c.log_prob(x).mean()) - 1e-12
    assert torch.equal(refined.leaf.loc, c.leaf.loc)
    with pytest.raises(ValueError, match="no closed-form update of discretized-logistic leaves"):
        em_refine(c, x, EMConfig(iterations=1, leaves=True))
