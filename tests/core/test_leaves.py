"""Leaf maths shared by fine-tuning and the continuous mixture."""

from __future__ import annotations

import torch

from vq2pc.core.leaves import Bernoulli, Categorical, Gaussian, component_log_likelihoods


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
