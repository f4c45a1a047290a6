"""Gumbel-softmax quantization, and the draw and temperature it shares with GM-VQ."""

from __future__ import annotations

import math

import pytest
import torch

from vq2pc.models.quantizers import make_quantizer
from vq2pc.models.quantizers.gumbel import gumbel_softmax_draw


def _z(B: int = 4, D: int = 3, h: int = 2, w: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(B, D, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", ["gumbel", "gmvq"])
def test_temperature_anneals_geometrically(name: str) -> None:
    q = make_quantizer(name, K=4, D=2, beta=1.0, tau_start=2.0, tau_end=0.1, anneal_steps=10)
    assert q.tau == pytest.approx(2.0)
    q.steps.fill_(5)
    assert q.tau == pytest.approx(2.0 * (0.05**0.5))
    q.steps.fill_(50)
    assert q.tau == pytest.approx(0.1)


@pytest.mark.parametrize("hard", [False, True])
def test_draw_codes_follow_softmax_and_hard_is_straight_through(hard: bool) -> None:
    logits = torch.tensor([[0.0, 1.0, -1.0]]).expand(6000, 3).clone().requires_grad_(True)
    y, codes = gumbel_softmax_draw(logits, 0.5, torch.Generator().manual_seed(1), hard)
    freq = torch.bincount(codes, minlength=3).double() / len(codes)
    expected = torch.softmax(torch.tensor([0.0, 1.0, -1.0], dtype=torch.float64), 0)
    assert (len(codes) * (freq - expected) ** 2 / expected).sum() < 13.8  # χ², 2 dof, 0.999
    assert torch.allclose(y.sum(1), torch.ones(6000))
    if hard:
        torch.testing.assert_close(y.detach(), torch.nn.functional.one_hot(codes, 3).float(), atol=1e-6, rtol=0)
    (y * torch.arange(3.0)).sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0  # the soft gradient in both modes


@pytest.mark.parametrize("name", ["gumbel", "gmvq"])
def test_low_temperature_training_codes_follow_the_posterior(name: str) -> None:
    q = make_quantizer(name, K=3, D=2, beta=1.0, tau_start=1e-3, tau_end=1e-3, seed=5).train()
    z = torch.full((4000, 2, 1, 1), 0.4)
    q.eval()
    flat = torch.full((1, 2), 0.4)
    logits = q.logits(flat)
    expected = torch.softmax(logits, 1)[0].detach().double()
    codes = q.train()(z).codes.reshape(-1)
    freq = torch.bincount(codes, minlength=3).double() / codes.numel()
    assert (codes.numel() * (freq - expected) ** 2 / expected).sum() < 13.8


def test_gumbel_eval_takes_the_argmax_and_its_loss_is_the_kl_to_uniform() -> None:
    q = make_quantizer("gumbel", K=5, D=3, beta=0.3).eval()
    z = _z()
    out = q(z)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 3)
    logits = q.to_logits(flat)
    assert torch.equal(out.codes.reshape(-1), logits.argmax(1)) and torch.equal(q.nearest(z), out.codes)
    torch.testing.assert_close(out.z_q, q.embed(out.codes))
    p = torch.softmax(logits, 1)
    kl = (p * (p.log() + math.log(5))).sum() / 4
    torch.testing.assert_close(out.loss, 0.3 * kl)


def test_gumbel_training_reaches_encoder_codebook_and_head() -> None:
    q = make_quantizer("gumbel", K=6, D=3, beta=1.0, seed=2).train()
    z = _z().requires_grad_(True)
    out = q(z)
    (out.z_q.pow(2).sum() + out.loss).backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in (z, q.embedding, q.to_logits.weight))


def test_gumbel_options_are_checked() -> None:
    with pytest.raises(ValueError, match="l2_normalize"):
        make_quantizer("gumbel", K=4, D=2, beta=1.0, l2_normalize=True)
    with pytest.raises(ValueError, match="tau_end"):
        make_quantizer("gumbel", K=4, D=2, beta=1.0, tau_start=0.5, tau_end=1.0)
