"""GM-VQ: posterior logits, ALBO terms, Gumbel straight-through sampling, annealing, training on digits."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vq2pc.models.quantizers import QuantizerOutput, make_quantizer
from vq2pc.models.quantizers.gmvq import gmvq_logits


def _z(B: int = 4, D: int = 3, h: int = 2, w: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(B, D, h, w, generator=torch.Generator().manual_seed(seed))


def test_logits_equal_weighted_distances_by_broadcast() -> None:
    g = torch.Generator().manual_seed(1)
    z, w, e = torch.randn(6, 3, generator=g), torch.rand(6, 3, generator=g) + 0.1, torch.randn(5, 3, generator=g)
    brute = -0.5 * (w[:, None, :] * (z[:, None, :] - e[None]) ** 2).sum(-1)
    torch.testing.assert_close(gmvq_logits(z, w, e), brute, rtol=1e-5, atol=1e-5)


def test_eval_gives_posterior_modes_and_their_codewords() -> None:
    q = make_quantizer("gmvq", K=7, D=3, beta=1.0).eval()
    q.embedding.data.normal_(generator=torch.Generator().manual_seed(2))
    z = _z()
    out = q(z)
    assert isinstance(out, QuantizerOutput) and out.codes.shape == (4, 2, 2)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 3)
    # softplus(r) starts at 1 for every dimension: the mode is the nearest codeword
    assert torch.equal(out.codes.reshape(-1), torch.cdist(flat, q.codebook.detach()).argmin(1))
    assert torch.equal(q.nearest(z), out.codes)
    torch.testing.assert_close(out.z_q, q.embed(out.codes))


def test_albo_regularizer_equals_its_definition() -> None:
    beta, alpha, sigma, K, D = 0.7, 1.3, 0.5, 5, 3
    q = make_quantizer("gmvq", K=K, D=D, beta=beta, alpha=alpha, sigma=sigma).eval()
    q.embedding.data.normal_(generator=torch.Generator().manual_seed(3))
    z = _z(B=2, D=D)
    flat = z.permute(0, 2, 3, 1).reshape(-1, D)
    post = torch.softmax(q.logits(flat), 1)  # [n, K]
    d2 = torch.cdist(flat, q.codebook) ** 2
    t = d2 / (D * sigma**2)
    alignment = (post * 0.5 * D * (t - torch.log(1 + t))).sum() / 2
    q_bar = post.mean(0)
    kl_bar = math.log(K) + (q_bar * q_bar.log()).sum()
    torch.testing.assert_close(q(z).loss, beta * alignment + alpha * 4 * kl_bar, rtol=1e-5, atol=1e-5)
    assert kl_bar >= 0


def test_training_sample_is_straight_through_and_reaches_every_part() -> None:
    q = make_quantizer("gmvq", K=6, D=3, beta=1.0, seed=4).train()
    z = _z().requires_grad_(True)
    out = q(z)
    (out.z_q.sum() + out.loss).backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    assert q.embedding.grad is not None and q.embedding.grad.abs().sum() > 0
    assert q.weight_head.weight.grad is not None and q.weight_head.weight.grad.abs().sum() > 0
    assert int(q.steps) == 1 and 1 <= float(out.perplexity) <= 6


def test_bad_options() -> None:
    with pytest.raises(ValueError, match="sigma"):
        make_quantizer("gmvq", K=4, D=2, beta=1.0, sigma=0.0)
    with pytest.raises(ValueError, match="tau_end"):
        make_quantizer("gmvq", K=4, D=2, beta=1.0, tau_start=0.1, tau_end=2.0)
    with pytest.raises(ValueError, match="z_e"):
        make_quantizer("gmvq", K=4, D=2, beta=1.0)(torch.zeros(2, 3, 1, 1))


def test_regularizer_spreads_usage() -> None:
    """A few steps on the α term alone raise the aggregate perplexity of a collapsed start."""
    q = make_quantizer("gmvq", K=8, D=2, beta=0.0, alpha=1.0, seed=6).train()
    q.embedding.data = 0.01 * torch.randn(8, 2, generator=torch.Generator().manual_seed(7))
    q.embedding.data[0] = torch.tensor([0.0, 0.0])
    z = 0.5 * _z(B=64, D=2, h=1, w=1, seed=8)
    opt = torch.optim.Adam(q.parameters(), lr=0.05)
    q(z)
    start = q.aggregate_perplexity
    for _ in range(30):
        opt.zero_grad()
        q(z).loss.backward()
        opt.step()
    assert q.aggregate_perplexity > start and q.aggregate_perplexity > 6.0
    assert F.softplus(q.weight_head.bias).min() > 0
