"""Tests of vq2pc.models.quantizers: nearest codeword, straight-through, loss gradients, k-means, dead codes, EMA."""

from __future__ import annotations

import pytest
import torch

from vq2pc.models.quantizers import QuantizerOutput, make_quantizer
from vq2pc.models.quantizers.vq import perplexity


def _z(B: int = 3, D: int = 5, h: int = 4, w: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(B, D, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", ["vq", "ema"])
def test_nearest_codeword_matches_brute_force(name: str) -> None:
    torch.manual_seed(0)
    q = make_quantizer(name, K=32, D=5, beta=0.25)
    q.embedding.data.normal_()
    z = _z()
    codebook = q.codebook.detach().clone()  # the EMA codebook moves after a training forward
    flat = z.permute(0, 2, 3, 1).reshape(-1, 5)
    brute = torch.cdist(flat, codebook).argmin(1).reshape(3, 4, 2)
    assert torch.equal(q.nearest(z), brute)
    out = q(z)
    assert isinstance(out, QuantizerOutput)
    assert out.codes.dtype == torch.long and torch.equal(out.codes, brute)
    assert torch.allclose(out.z_q, codebook[brute].permute(0, 3, 1, 2))
    assert torch.equal(q.embed(brute)[1, :, 2, 1], q.codebook[brute[1, 2, 1]].detach())


def test_straight_through_gradient() -> None:
    q = make_quantizer("vq", K=8, D=5, beta=0.25)
    z = _z().requires_grad_(True)
    g = torch.randn(3, 5, 4, 2)
    (q(z).z_q * g).sum().backward()
    assert torch.allclose(z.grad, g)


def test_codebook_and_commitment_gradients_go_to_their_own_side() -> None:
    """Codebook term: gradient only to e; commitment term: only to z_e (Eq. 6 stop-gradients)."""
    grads = {}
    for beta in (0.0, 0.7):
        torch.manual_seed(0)  # the same codebook for both betas
        q = make_quantizer("vq", K=8, D=5, beta=beta)
        q.embedding.data.normal_()
        z = _z().requires_grad_(True)
        out = q(z)
        out.loss.backward()
        grads[beta] = (z.grad.clone(), q.embedding.grad.clone(), out.codes)
    z = _z()
    codes = grads[0.0][2]
    e = q.embed(codes).detach()
    B = z.shape[0]
    assert torch.count_nonzero(grads[0.0][0]) == 0  # beta = 0: nothing reaches the encoder
    assert torch.allclose(grads[0.7][1], grads[0.0][1])  # the commitment term adds nothing to the codebook
    assert torch.allclose(grads[0.7][0], 0.7 * 2 * (z - e) / B, atol=1e-6)
    expected = torch.zeros(8, 5).index_add_(0, codes.reshape(-1), (2 * (e - z) / B).permute(0, 2, 3, 1).reshape(-1, 5))
    assert torch.allclose(grads[0.0][1], expected, atol=1e-6)
    assert float(out.loss.detach()) == pytest.approx(float((1 + 0.7) * ((z - e) ** 2).sum() / B), rel=1e-5)


def test_perplexity_bounds() -> None:
    assert float(perplexity(torch.zeros(10, dtype=torch.long), 8)) == pytest.approx(1.0)
    assert float(perplexity(torch.arange(8).repeat(3), 8)) == pytest.approx(8.0)
    assert float(perplexity(torch.tensor([0, 0, 1, 1]), 8)) == pytest.approx(2.0)


def _clusters(n_per: int = 50, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Four tight clusters in D = 2, as z_e [4·n_per, 2, 1, 1], and their centres [4, 2]."""
    centres = torch.tensor([[5.0, 5.0], [-5.0, 5.0], [5.0, -5.0], [-5.0, -5.0]])
    g = torch.Generator().manual_seed(seed)
    pts = centres.repeat_interleave(n_per, 0) + 0.1 * torch.randn(4 * n_per, 2, generator=g)
    return pts.reshape(-1, 2, 1, 1), centres


def test_kmeans_init_from_first_training_batch() -> None:
    z, centres = _clusters()
    q = make_quantizer("vq", K=4, D=2, beta=0.25, kmeans_init=True, seed=1)
    q.eval()
    before = q.codebook.detach().clone()
    q(z)
    assert torch.equal(q.codebook.detach(), before)  # eval mode: no initialization
    q.train()
    out = q(z)
    dist = torch.cdist(centres, q.codebook.detach())
    assert float(dist.min(1).values.max()) < 0.1  # every true centre has a codeword next to it
    assert float(out.perplexity) == pytest.approx(4.0, rel=1e-3) and bool(q.initialized)
    after = q.codebook.detach().clone()
    q(z)
    assert torch.equal(q.codebook.detach(), after)  # only the first batch initializes


def test_dead_code_replacement() -> None:
    z, _ = _clusters()
    q = make_quantizer("vq", K=5, D=2, beta=0.25, dead_code_threshold=1.0, usage_decay=0.5)
    q.embedding.data = torch.tensor([[5.0, 5.0], [-5.0, 5.0], [5.0, -5.0], [-5.0, -5.0], [100.0, 100.0]])
    flat = z.reshape(-1, 2)
    for _ in range(2):  # usage of code 4: 2.0 -> 1.0 -> 0.5 (dead after the second batch)
        q(z)
    assert torch.equal(q.codebook[4].detach(), torch.tensor([100.0, 100.0]))
    q(z)
    new = q.codebook[4].detach()
    assert bool((flat == new).all(1).any())  # moved onto an encoder output of the batch
    assert torch.equal(q.codebook[:4].detach(), torch.tensor([[5.0, 5.0], [-5.0, 5.0], [5.0, -5.0], [-5.0, -5.0]]))


def test_ema_codebook_tracks_cluster_means() -> None:
    z, _ = _clusters()
    q = make_quantizer("ema", K=4, D=2, beta=0.25, decay=0.5)
    q.embedding.data = torch.tensor([[4.0, 4.0], [-4.0, 4.0], [4.0, -4.0], [-4.0, -4.0]])
    means = z.reshape(4, -1, 2).mean(1)
    for _ in range(30):
        z_in = z.clone().requires_grad_(True)
        out = q(z_in)
    assert torch.allclose(q.codebook, means, atol=1e-3)
    out.loss.backward()
    assert q.embedding.grad is None and z_in.grad is not None
    assert float(out.loss.detach()) == pytest.approx(
        float(0.25 * ((z - q.embed(out.codes)) ** 2).sum() / z.shape[0]), rel=1e-3
    )


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match=r"bad quantizer options.*foo"):
        make_quantizer("ema", 4, 2, 0.25, foo=1)
    with pytest.raises(ValueError, match="unknown quantizer"):
        make_quantizer("gumbel-xyz", 4, 2, 0.25)
    with pytest.raises(ValueError, match="K and D"):
        make_quantizer("vq", 0, 2, 0.25)
    q = make_quantizer("vq", 4, 2, 0.25)
    with pytest.raises(ValueError, match="z_e must have shape"):
        q(torch.zeros(2, 3, 1, 1))


@pytest.mark.parametrize("name", ["vq", "ema"])
def test_l2_normalized_codes_pick_the_highest_cosine_and_are_unit_vectors(name: str) -> None:
    q = make_quantizer(name, K=16, D=5, beta=0.25, l2_normalize=True).eval()
    q.embedding.data = (
        torch.randn(16, 5, generator=torch.Generator().manual_seed(3)) * torch.linspace(0.1, 5, 16)[:, None]
    )
    z = 3.0 * _z()
    flat = z.permute(0, 2, 3, 1).reshape(-1, 5)
    cosine = torch.nn.functional.normalize(flat, dim=1) @ torch.nn.functional.normalize(q.embedding, dim=1).T
    out = q(z)
    assert torch.equal(out.codes.reshape(-1), cosine.argmax(1)) and torch.equal(q.nearest(z), out.codes)
    torch.testing.assert_close(out.z_q.norm(dim=1), torch.ones(3, 4, 2))
    torch.testing.assert_close(q.embed(out.codes), out.z_q)
