"""Tests of the gated PixelCNN prior: causality, exact normalization, sampling, training, I/O."""

from __future__ import annotations

import pytest
import torch
from helpers import all_codes, make_prior, synthetic_codes
from scipy.stats import chisquare

from vq2pc.core.checkpoint import CheckpointError
from vq2pc.models.priors.pixelcnn import PixelCNNPrior, PriorConfig, train_prior
from vq2pc.models.train import TrainConfig


@pytest.mark.parametrize("layers", [1, 4])
def test_causality_by_gradients(layers: int) -> None:
    """d logits[i] / d input[j] is exactly 0 for j >= i and nonzero for every j < i (no blind spot)."""
    h, w = 3, 4
    prior = make_prior(K=5, hw=(h, w), C=2, hidden=6, layers=layers)
    z = torch.randint(0, 5, (2, h, w), generator=torch.Generator().manual_seed(1))
    c = torch.tensor([0, 1])
    for i in range(h * w):
        e = prior.embed_codes(z).detach().requires_grad_(True)
        prior.logits_from_embedding(e, c)[:, :, i // w, i % w].sum().backward()
        influence = e.grad.abs().sum(dim=(0, 1)).flatten()  # [h*w]
        assert torch.all(influence[i:] == 0), f"position {i} sees positions >= {i}: {influence}"
        if layers == 4:  # receptive field covers the whole 3x4 past
            assert torch.all(influence[:i] > 0), f"position {i} misses part of its past: {influence}"
        elif i > 0:
            assert influence[:i].sum() > 0


def test_next_log_probs_matches_logits_and_ignores_future() -> None:
    prior = make_prior(K=4, hw=(3, 3), C=3, layers=2)
    z = torch.randint(0, 4, (5, 3, 3), generator=torch.Generator().manual_seed(0))
    c = torch.tensor([0, 1, 2, 1, 0])
    full = torch.log_softmax(prior.logits(z, c), dim=1).flatten(2)  # [B,K,9]
    for i in range(9):
        nlp = prior.next_log_probs(z, c, i)
        torch.testing.assert_close(nlp, full[:, :, i], atol=1e-5, rtol=0)
        z2 = z.clone().flatten(1)
        z2[:, i:] = (z2[:, i:] + 1) % 4
        torch.testing.assert_close(prior.next_log_probs(z2.view_as(z), c, i), nlp, atol=1e-5, rtol=0)
    torch.testing.assert_close(
        prior.next_log_probs_all_classes(z, 4)[torch.arange(5), c], prior.next_log_probs(z, c, 4)
    )


@pytest.mark.parametrize("hw", [(2, 2), (1, 1), (1, 4), (3, 1)])
def test_exact_normalization(hw: tuple[int, int]) -> None:
    """Σ_z p(z|c) = 1 for every class and Σ_z p(z) = 1, by brute force over all K^{hw} grids."""
    prior = make_prior(K=3, hw=hw, C=2, sharpen=3.0)
    prior.set_class_prior(torch.tensor([0, 1, 1, 1]))  # p(c) = (1/4, 3/4)
    torch.testing.assert_close(prior.class_log_prior.exp(), torch.tensor([0.25, 0.75]))
    z = all_codes(3, hw)
    with torch.no_grad():
        per_class = prior.log_prob_all_classes(z, batch_size=7)  # chunked
        torch.testing.assert_close(torch.logsumexp(per_class, 0), torch.zeros(2), atol=1e-5, rtol=0)
        torch.testing.assert_close(torch.logsumexp(prior.log_prob(z), 0), torch.tensor(0.0), atol=1e-5, rtol=0)
        for cls in range(2):
            direct = prior.log_prob_given_class(z, torch.full((z.shape[0],), cls))
            torch.testing.assert_close(direct, per_class[:, cls])


def test_sampling_matches_conditional() -> None:
    """Empirical frequencies of 20k ancestral samples fit p(z|c) (chi-square, 80 dof, fixed seed).

    The same test rejects the other class's distribution, so it has power.
    """
    prior = make_prior(K=3, hw=(2, 2), C=2, sharpen=3.0, seed=1)
    n = 20000
    samples = prior.sample(torch.ones(n, dtype=torch.long), generator=torch.Generator().manual_seed(0))
    assert samples.shape == (n, 2, 2)
    idx = (samples.flatten(1) * torch.tensor([27, 9, 3, 1])).sum(1)
    observed = torch.bincount(idx, minlength=81).double()
    z = all_codes(3, (2, 2))
    with torch.no_grad():
        p = prior.log_prob_all_classes(z).double().exp()
    assert chisquare(observed, n * p[:, 1] / p[:, 1].sum()).pvalue > 1e-3
    assert chisquare(observed, n * p[:, 0] / p[:, 0].sum()).pvalue < 1e-6


def test_sampling_is_reproducible() -> None:
    prior = make_prior()
    c = torch.tensor([0, 1, 1])
    a = prior.sample(c, generator=torch.Generator().manual_seed(5))
    b = prior.sample(c, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


@pytest.mark.slow
def test_training_reduces_nll_and_checkpoints_roundtrip(tmp_path) -> None:
    K = 4
    z, c = synthetic_codes(768, K, 0)
    vz, vc = synthetic_codes(256, K, 1)
    cfg = PriorConfig(K=K, latent_hw=(2, 2), num_classes=2, hidden=16, layers=2)
    tcfg = TrainConfig(epochs=12, patience=12, lr=1e-2, batch_size=64, progress=False)
    ck = tmp_path / "prior.pt"
    prior, result = train_prior(z, c, cfg, tcfg, vz, vc, checkpoint=ck)
    first = result.history[0]["val"]
    # uniform is log K = 1.386 nats/latent; the structure allows 0.25·log K = 0.35
    assert result.best_val_loss < 0.6 < first or result.best_val_loss < 0.6 * first
    torch.testing.assert_close(prior.class_log_prior.exp().sum(), torch.tensor(1.0))
    with torch.no_grad():
        ref = prior.log_prob(vz[:16])
        torch.testing.assert_close(PixelCNNPrior.load(ck).log_prob(vz[:16]), ref)  # trainer checkpoint
        prior.save(tmp_path / "saved.pt")
        torch.testing.assert_close(PixelCNNPrior.load(tmp_path / "saved.pt").log_prob(vz[:16]), ref)


def test_unlabeled_mode() -> None:
    z, _ = synthetic_codes(64, 3, 0)
    cfg = PriorConfig(K=3, latent_hw=(2, 2))
    prior, _ = train_prior(z, None, cfg, TrainConfig(epochs=1, progress=False), z, None)
    assert prior.class_log_prior.tolist() == [0.0]
    assert prior.log_prob(z).shape == (64,)


def test_bad_input(tmp_path) -> None:
    prior = make_prior(K=3, hw=(2, 2), C=2)
    ok = torch.zeros(2, 2, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="outside"):
        prior.log_prob(ok + 3)
    with pytest.raises(ValueError, match="shape"):
        prior.log_prob(torch.zeros(2, 3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        prior.log_prob(ok.float())
    with pytest.raises(ValueError, match="classes outside"):
        prior.logits(ok, torch.tensor([0, 2]))
    with pytest.raises(ValueError, match=r"c must have shape \[2\]"):
        prior.logits(ok, torch.tensor([0]))
    with pytest.raises(ValueError, match="position"):
        prior.next_log_probs(ok, torch.tensor([0, 1]), 4)
    with pytest.raises(ValueError, match="labels"):
        prior.set_class_prior(torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="val_codes"):
        train_prior(ok, None, PriorConfig(K=3, latent_hw=(2, 2)), TrainConfig(progress=False), ok + 7, None)
    with pytest.raises(ValueError, match="K must be"):
        PriorConfig(K=0, latent_hw=(2, 2))
    with pytest.raises(CheckpointError, match="not found"):
        PixelCNNPrior.load(tmp_path / "missing.pt")
