"""Distillation against brute force: the exhaustive circuit IS Σ_z p(z) p(x|z) over all 81 latents."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from vq2pc.circuit.distill import decode_leaf, distill
from vq2pc.latents.selection import Selection, select
from vq2pc.models.priors.pixelcnn import PixelCNNPrior, PriorConfig
from vq2pc.models.vqvae import VQVAE, VQVAEConfig

LEVELS = 17
K, HW = 3, (2, 2)


def make_vqvae(leaf: str) -> VQVAE:
    """A random (untrained) VQ-VAE on 1x4x4 images with a 2x2 grid of K=3 codes: 81 latents."""
    torch.manual_seed(0)
    cfg = VQVAEConfig(image_shape=(1, 4, 4), levels=LEVELS, leaf=leaf, latent_hw=HW, K=K, D=4, hidden=8, res_blocks=0)
    return VQVAE(cfg).eval()


@pytest.fixture(scope="module")
def prior() -> PixelCNNPrior:
    """A random class-conditional prior, sharpened away from uniform, with p(c) = (3/4, 1/4)."""
    torch.manual_seed(1)
    p = PixelCNNPrior(PriorConfig(K=K, latent_hw=HW, num_classes=2, hidden=8, layers=2)).eval()
    with torch.no_grad():
        p.head[-1].weight.mul_(3.0)
    p.set_class_prior(torch.tensor([0, 0, 0, 1]))
    return p


def all_latents() -> torch.Tensor:
    """Every latent grid, ``[81, 2, 2]``."""
    return torch.tensor(list(itertools.product(range(K), repeat=HW[0] * HW[1]))).view(-1, *HW)


def data(leaf: str, n: int = 6) -> torch.Tensor:
    """``[n, 16]`` model-space test points: reals in [0,1) (gaussian) or integer levels (categorical)."""
    g = torch.Generator().manual_seed(7)
    if leaf == "gaussian":
        return torch.rand(n, 16, generator=g)
    return torch.randint(0, LEVELS, (n, 16), generator=g).float()


@torch.no_grad()
def brute_force(vqvae: VQVAE, prior: PixelCNNPrior, x: torch.Tensor) -> torch.Tensor:
    """``[B]`` log Σ_z p(z) Π_i p(x_i|z) by an explicit sum over all 81 latents, one decode each."""
    terms = []
    for z in all_latents():
        z = z[None]
        log_px_z = vqvae.decode(z).log_prob(x).sum(-1).double()  # [B]
        terms.append(log_px_z + prior.log_prob(z).double())
    return torch.logsumexp(torch.stack(terms, 1), 1)


@pytest.mark.parametrize("leaf", ["gaussian", "categorical"])
def test_exhaustive_prior_weights_equal_brute_force(leaf: str, prior: PixelCNNPrior) -> None:
    vqvae = make_vqvae(leaf)
    sel = select(prior, "exhaustive", None)
    assert len(sel) == 81
    circuit = distill(vqvae, sel, weights="prior")
    assert len(circuit) == 81 and circuit.num_variables == 16
    x = data(leaf)
    expected = brute_force(vqvae, prior, x)
    got = circuit.log_prob(x).double()
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


def test_prior_over_all_latents_is_normalized(prior: PixelCNNPrior) -> None:
    """The brute force above is a density only if Σ_z p(z) = 1 (and p(z) is far from uniform)."""
    with torch.no_grad():
        log_pz = prior.log_prob(all_latents()).double()
    assert abs(float(torch.logsumexp(log_pz, 0))) < 1e-5
    assert float(log_pz.max() - log_pz.min()) > 1.0  # the weights test below is not trivially uniform


@pytest.mark.parametrize("weights", ["prior", "uniform"])
def test_weights_sum_to_one(weights: str, prior: PixelCNNPrior) -> None:
    sel = select(prior, "topk", 20)
    circuit = distill(make_vqvae("gaussian"), sel, weights=weights)
    assert abs(float(torch.logsumexp(circuit.log_weights.double(), 0))) < 1e-6
    if weights == "prior":  # p(z) renormalized over the 20 selected latents
        expected = torch.log_softmax(sel.log_prior.double(), 0)
        torch.testing.assert_close(circuit.log_weights.double(), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("leaf", ["gaussian", "categorical"])
def test_uniform_weights_are_eq2_mean_over_selection(leaf: str, prior: PixelCNNPrior) -> None:
    """Paper Eq. 2: p̂(x) = (1/N) Σ_n p(x | z_n) over the selected latents."""
    vqvae = make_vqvae(leaf)
    sel = select(prior, "sample", 10, generator=torch.Generator().manual_seed(3))
    circuit = distill(vqvae, sel, weights="uniform")
    x = data(leaf)
    with torch.no_grad():
        per_z = torch.stack([vqvae.decode(z[None]).log_prob(x).sum(-1).double() for z in sel.codes], 1)
    expected = torch.logsumexp(per_z, 1) - math.log(10)
    torch.testing.assert_close(circuit.log_prob(x).double(), expected, rtol=0, atol=1e-4)


def test_empty_selection_raises(prior: PixelCNNPrior) -> None:
    empty = Selection(torch.zeros((0, *HW), dtype=torch.long), torch.zeros(0), "sample")
    with pytest.raises(ValueError, match="empty"):
        distill(make_vqvae("gaussian"), empty)


@pytest.mark.parametrize("leaf", ["gaussian", "categorical"])
def test_decode_leaf_batching_is_exact(leaf: str) -> None:
    """Batching only splits and concatenates: batch_size 1 is bit-for-bit the concatenated per-latent ``decode``s'
    tensors (categorical ones are laid out in the circuit's table, not normalized again), batch_size 1000 bit-for-bit that of one ``decode`` of all 81. (Across the two, torch's CPU convolutions are not batch-invariant
    - they differ in the last float32 bits, ~1e-7 - so those agree to rounding, not bitwise.)"""
    vqvae = make_vqvae(leaf)
    codes = all_latents()
    one = decode_leaf(vqvae, codes, batch_size=1).tensors()
    big = decode_leaf(vqvae, codes, batch_size=1000).tensors()
    with torch.no_grad():
        singles = [vqvae.decode(z[None]).tensors() for z in codes]
        by_one = {k: torch.cat([t[k] for t in singles]) for k in singles[0]}  # categorical: not renormalized
        whole = vqvae.decode(codes).tensors()
    assert one.keys() == big.keys() == whole.keys()
    for name in one:
        assert one[name].shape[:2] == (81, 16)
        assert torch.equal(one[name], by_one[name]), name
        assert torch.equal(big[name], whole[name]), name
        torch.testing.assert_close(one[name], big[name], rtol=1e-5, atol=1e-5)


def test_discretized_distillation_is_the_exact_discrete_mixture(prior: PixelCNNPrior) -> None:
    """distill(..., discretized=L): P(v) = Σ_z p(z) Π_i (Φ((v_i+1)/L) − Φ(v_i/L)) under each decoded Gaussian."""
    vqvae = make_vqvae("gaussian")
    sel = select(prior, "exhaustive", None)
    circuit = distill(vqvae, sel, weights="prior", discretized=LEVELS)
    assert circuit.leaf.kind == "discretized-gaussian" and circuit.leaf.levels == LEVELS
    gauss = decode_leaf(vqvae, sel.codes)
    v = data("categorical")
    lo, hi = (v[:, None] / LEVELS - gauss.loc) / gauss.scale, ((v[:, None] + 1) / LEVELS - gauss.loc) / gauss.scale
    p = torch.where(v[:, None] == LEVELS - 1, 1.0, torch.special.ndtr(hi.double())) - torch.where(
        v[:, None] == 0, 0.0, torch.special.ndtr(lo.double())
    )  # [B, 81, 16]
    ref = torch.logsumexp(sel.log_weights("prior").double() + p.log().sum(-1), 1)
    assert torch.allclose(circuit.log_prob(v).double(), ref, rtol=1e-5)
    with pytest.raises(ValueError, match="only Gaussian leaves"):
        distill(make_vqvae("categorical"), sel, discretized=LEVELS)
