"""Leaf maths shared by fine-tuning and the continuous mixture."""

from __future__ import annotations

import pytest
import torch

from vq2pc.core.leaf_ops import cap_std, component_log_likelihoods
from vq2pc.core.leaves import Bernoulli, Categorical, Gaussian


def test_component_log_likelihoods_equal_the_leaf_densities() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(5, 7, generator=g)
    gauss = Gaussian(torch.rand(3, 7, generator=g), torch.rand(3, 7, generator=g) * 0.1 + 1e-3)
    direct = gauss.log_prob(x.unsqueeze(1)).double().sum(-1)
    assert torch.allclose(component_log_likelihoods(gauss, x).double(), direct, rtol=1e-5)
    cat = Categorical(torch.log_softmax(torch.randn(3, 7, 4, generator=g), -1))
    xc = torch.randint(0, 4, (5, 7), generator=g).float()
    manual = torch.stack([cat.logits[m, torch.arange(7), xc[b].long()].sum() for b in range(5) for m in range(3)])
    assert torch.allclose(component_log_likelihoods(cat, xc).flatten(), manual)
    raw = torch.randn(3, 7, 4, generator=g, requires_grad=True)  # gradients equal the broadcast gather's
    (fast,) = torch.autograd.grad(component_log_likelihoods(Categorical(raw), xc).square().sum(), raw)
    (slow,) = torch.autograd.grad(Categorical(raw).log_prob(xc.unsqueeze(1)).sum(-1).square().sum(), raw)
    assert torch.allclose(fast, slow, atol=1e-5)
    bern = Bernoulli(torch.randn(3, 7, generator=g))
    xb = torch.randint(0, 2, (5, 7), generator=g).float()
    assert torch.allclose(component_log_likelihoods(bern, xb), bern.log_prob(xb.unsqueeze(1)).sum(-1))


def test_cap_std_stays_below_the_cap_keeps_small_stds_and_has_a_gradient() -> None:
    std = torch.logspace(-3, 0, 50).requires_grad_(True)
    mean = torch.rand(50)
    capped = cap_std(Gaussian(mean, std), 0.1)
    assert isinstance(capped, Gaussian) and torch.equal(capped.loc, mean)
    out, raw = capped.scale.detach(), std.detach()
    assert float(out.max()) < 0.1 and bool((out < raw).all())
    small = raw < 1e-2  # σ·c/(σ+c) = σ·(1 − σ/(σ+c)): relative change below σ/c
    assert torch.allclose(out[small], raw[small], rtol=0.1)
    assert out[0].item() == pytest.approx(1e-3 * 0.1 / 0.101)
    (grad,) = torch.autograd.grad(capped.scale.sum(), std)
    assert bool((grad > 0).all())
    leaf = Gaussian(mean, raw)
    assert cap_std(leaf, None) is leaf
    with pytest.raises(ValueError, match="Gaussian leaves only"):
        cap_std(Categorical(torch.zeros(2, 3, 4)), 0.1)
