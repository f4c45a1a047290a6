"""Tests of ClassMixture: normalization, brute-force Bayes, the class marginal, sampling statistics, files."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from helpers import make_prior
from scipy.stats import chi2

from vq2pc.circuit.class_weights import class_joint, class_weights
from vq2pc.circuit.classes import ClassMixture
from vq2pc.circuit.distill import distill
from vq2pc.circuit.exact import ExactModel
from vq2pc.circuit.mixture import MixtureCircuit
from vq2pc.core.checkpoint import CheckpointError
from vq2pc.core.leaves import Categorical
from vq2pc.latents.selection import select
from vq2pc.models.vqvae import VQVAE, VQVAEConfig

S, L, N, C = 3, 3, 5, 3


def tiny(seed: int = 0) -> ClassMixture:
    """Categorical leaves, S = 3 variables with 3 levels (27 images), N = 5, C = 3, float64."""
    g = torch.Generator().manual_seed(seed)
    leaf = Categorical(torch.randn(N, S, L, generator=g, dtype=torch.float64) * 2)
    log_w = torch.randn(N, C, generator=g, dtype=torch.float64) * 2
    log_w[0, 1] = -math.inf  # a zero weight
    return ClassMixture(MixtureCircuit(leaf, torch.zeros(N, dtype=torch.float64)), log_w)


def every_image() -> torch.Tensor:
    return torch.tensor(list(itertools.product(range(L), repeat=S)), dtype=torch.float64)


def brute_joint(cm: ClassMixture, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``[B, C]`` log Σ_n w_{n,c} Π_{i observed} p(x_i | n), by broadcasting in float64."""
    logp = torch.log_softmax(cm.model.leaf.logits.double(), -1)  # [N, S, L]
    per = logp[:, torch.arange(S)[None, :], x.long()]  # [N, B, S]
    if mask is not None:
        per = per * mask[None].double()
    ell = per.sum(-1).T  # [B, N]
    return torch.logsumexp(ell[:, :, None] + cm.log_weights.double()[None], 1)


def test_joint_sums_to_one_and_marginal_is_the_circuit() -> None:
    cm = tiny()
    x = every_image()
    joint = cm.log_joint(x)
    assert torch.logsumexp(joint.flatten(), 0).item() == pytest.approx(0.0, abs=1e-12)
    plain = MixtureCircuit(cm.model.leaf, torch.logsumexp(cm.log_weights, 1))
    assert torch.allclose(cm.log_prob(x), plain.log_prob(x), atol=1e-12)
    mask = torch.rand(len(x), S, generator=torch.Generator().manual_seed(1)) < 0.5
    assert torch.allclose(cm.log_prob(x, mask=mask), plain.log_prob(x, mask), atol=1e-12)
    for c in range(C):  # p(x | c) sums to 1 over x for every class
        assert torch.logsumexp(cm.log_prob(x, c), 0).item() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("masked", [False, True])
def test_class_posterior_is_brute_force_bayes(masked: bool) -> None:
    cm = tiny(2)
    x = every_image()
    mask = (torch.rand(len(x), S, generator=torch.Generator().manual_seed(3)) < 0.5) if masked else None
    want = brute_joint(cm, x, mask)
    assert torch.allclose(cm.log_joint(x, mask), want, atol=1e-10)
    post = want - torch.logsumexp(want, 1, keepdim=True)
    assert torch.allclose(cm.class_posterior(x, mask).double(), post, atol=1e-6)
    cls = torch.arange(len(x)) % C
    got = cm.log_prob(x, cls, mask).double()
    assert torch.allclose(got, want[torch.arange(len(x)), cls] - cm.log_class_prior[cls], atol=1e-6)


def test_unlikely_classes_are_exact_far_below_float64_range() -> None:
    """Components thousands of nats apart and classes e^-900 unlikely: the float64 product underflows,
    the explicit recomputation gives the exact values."""
    g = torch.Generator().manual_seed(4)
    L_ = torch.randn(6, 40, generator=g, dtype=torch.float64) * 800
    r = torch.randn(40, 4, generator=g, dtype=torch.float64) * 300
    r[:, 3] = -1000 + torch.randn(40, generator=g, dtype=torch.float64)  # class 3: ~e^-1000 at every component
    r = torch.log_softmax(r, 1)
    got = class_joint(L_, r, r.exp())
    want = torch.logsumexp(L_[:, :, None] + r[None], 1)
    assert torch.isfinite(want).all() and (want - want.amax(1, keepdim=True) < -700).any()
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-9)


def test_class_conditional_samples_chi_square() -> None:
    cm = tiny(5)
    x = every_image()
    codes = (x.long() * torch.tensor([L * L, L, 1])).sum(1)
    g = torch.Generator().manual_seed(6)
    for c in (0, 2):
        draws = cm.sample(20000, c=c, generator=g)
        counts = torch.bincount((draws.long() * torch.tensor([L * L, L, 1])).sum(1), minlength=L**S).double()
        expected = cm.log_prob(x, c).exp()[codes.argsort()] * 20000
        stat = float(((counts - expected) ** 2 / expected).sum())
        assert stat < chi2.ppf(0.999, L**S - 1), (c, stat)


def test_conditional_mean_sample_and_map_given_a_class() -> None:
    cm = tiny(7)
    x = every_image()[:9]
    mask = torch.tensor([True, False, False])
    cls = torch.arange(9) % C
    # E[x_u | x_o, c] by brute force: the posterior over n given (x_o, c), then the component means
    logp = torch.log_softmax(cm.model.leaf.logits.double(), -1)
    ell = logp[:, 0, x[:, 0].long()].T  # [B, N]
    post = torch.softmax(ell + cm.log_weights.double()[:, cls].T, 1)
    means = (logp.exp() * torch.arange(L, dtype=torch.float64)).sum(-1)  # [N, S]
    want = torch.where(mask, x, post @ means)
    assert torch.allclose(cm.conditional_mean(x, mask, cls), want, atol=1e-10)
    draw = cm.sample(x=x, mask=mask, c=cls, generator=torch.Generator().manual_seed(0))
    assert torch.equal(draw[:, 0], x[:, 0])
    xm, cm_cls = cm.map(x, mask)  # joint argmax over (n, c, x_u)
    score = ell[:, :, None] + cm.log_weights.double()[None] + logp[:, 1:].amax(-1).sum(-1)[None, :, None]
    best = score.flatten(1).argmax(1)
    assert torch.equal(cm_cls, best % C)
    assert torch.equal(xm[:, 1:], logp[best // C, 1:].argmax(-1).double())


def test_save_load_round_trip_and_plain_load_is_the_marginal(tmp_path) -> None:
    cm = tiny(8)
    path = cm.save(tmp_path / "c.safetensors")
    back = ClassMixture.load(path)
    x = every_image()
    assert torch.allclose(back.log_weights, cm.log_weights, atol=1e-14, rtol=0)
    assert torch.allclose(back.class_posterior(x), cm.class_posterior(x), atol=0)
    assert torch.allclose(cm.to("cpu").class_posterior(x), cm.class_posterior(x))
    plain = MixtureCircuit.load(path)
    assert torch.allclose(plain.log_prob(x), cm.log_prob(x), atol=1e-12)
    cm.model.save(tmp_path / "plain.safetensors")
    with pytest.raises(CheckpointError, match="without class weights"):
        ClassMixture.load(tmp_path / "plain.safetensors")


def test_bad_class_and_mask_give_one_clear_error() -> None:
    cm = tiny()
    x = every_image()[:4]
    with pytest.raises(ValueError, match="class index 3 is out of range"):
        cm.log_prob(x, 3)
    with pytest.raises(ValueError, match="class has shape"):
        cm.sample(4, c=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="mask"):
        cm.class_posterior(x, torch.ones(4, S + 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="rows"):
        ClassMixture(cm.model, torch.zeros(N + 1, C))


def _vqvae(leaf: str = "gaussian") -> VQVAE:
    torch.manual_seed(0)
    model = VQVAE(
        VQVAEConfig(image_shape=(1, 4, 4), levels=17, leaf=leaf, latent_hw=(2, 2), K=3, D=4, hidden=8, res_blocks=0)
    ).eval()
    with torch.no_grad():
        model.quantizer.embedding.normal_(0.0, 2.0)
    return model


def test_exact_model_equals_materialized_prior_class_weights() -> None:
    prior = make_prior(K=3, hw=(2, 2), C=2, hidden=8, layers=2, seed=1, sharpen=3.0)
    vqvae = _vqvae()
    selection = select(prior, "exhaustive", None, classes=True)
    circuit = distill(vqvae, selection, weights="prior")
    materialized = ClassMixture(circuit, class_weights(prior, selection))
    exact = ClassMixture(ExactModel(vqvae, prior, chunk=20))
    x = torch.rand(7, 16, generator=torch.Generator().manual_seed(0))
    mask = torch.rand(7, 16, generator=torch.Generator().manual_seed(1)) < 0.5
    assert torch.allclose(exact.log_joint(x, mask), materialized.log_joint(x, mask), atol=1e-4)
    assert torch.allclose(exact.conditional_mean(x, mask, 1), materialized.conditional_mean(x, mask, 1), atol=1e-5)
    assert exact.sample(5, c=torch.tensor([0, 1, 0, 1, 1])).shape == (5, 16)


def test_class_weights_uniform_records_the_drawn_class_and_base_keeps_the_marginal() -> None:
    prior = make_prior(K=3, hw=(2, 2), C=2, hidden=8, layers=2, seed=1, sharpen=3.0)
    selection = select(prior, "sample", 12, generator=torch.Generator().manual_seed(0))
    assert selection.classes is not None and selection.classes.shape == (12,)
    log_w = class_weights(prior, selection, "uniform")
    drawn = selection.classes
    assert torch.isneginf(log_w[torch.arange(12), 1 - drawn]).all()  # only the drawn class
    counts = torch.bincount(drawn, minlength=2).double()
    want = prior.class_log_prior.double()[drawn] - counts[drawn].log()
    assert torch.allclose(log_w[torch.arange(12), drawn], want, atol=1e-6)
    beam = select(prior, "beam", 8, starts=1, generator=torch.Generator().manual_seed(0))
    assert beam.classes is not None and set(beam.classes.tolist()) <= {0, 1}
    base = torch.log_softmax(torch.randn(12, dtype=torch.float64), 0)
    kept = class_weights(prior, selection, base_log_weights=base)
    assert torch.allclose(torch.logsumexp(kept, 1), base, atol=1e-12)


def test_distill_with_classes_and_npz_export_carry_the_class_weights(tmp_path) -> None:
    from vq2pc.circuit.export import export_npz, from_npz

    prior = make_prior(K=3, hw=(2, 2), C=2, hidden=8, layers=2, seed=1, sharpen=3.0)
    selection = select(prior, "beam", 8, starts=1, generator=torch.Generator().manual_seed(0), classes=True)
    cm = distill(_vqvae("categorical"), selection, weights="prior", classes=True)
    assert isinstance(cm, ClassMixture) and cm.num_classes == 2
    assert torch.allclose(cm.log_weights.double(), class_weights(prior, selection), atol=1e-6)
    export_npz(cm, tmp_path / "c.npz")
    with np.load(tmp_path / "c.npz") as npz:
        assert npz["class_log_weights"].shape == (8, 2)
    back = from_npz(tmp_path / "c.npz", classes=True)
    x = cm.sample(6, c=1, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(back.class_posterior(x), cm.class_posterior(x), atol=1e-6)
    assert torch.allclose(from_npz(tmp_path / "c.npz").log_prob(x), cm.log_prob(x), atol=1e-5)


def test_enumerated_class_joint_equals_the_prior_per_class() -> None:
    from helpers import all_codes

    from vq2pc.circuit.class_weights import whole_space_joint

    prior = make_prior(K=3, hw=(2, 2), C=2, hidden=8, layers=2, seed=1, sharpen=3.0)
    with torch.no_grad():
        want = prior.log_prob_all_classes(all_codes(3, (2, 2))) + prior.class_log_prior
    assert torch.allclose(whole_space_joint(prior), want, atol=1e-5)
