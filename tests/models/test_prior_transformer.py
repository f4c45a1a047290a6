"""Tests of the Transformer prior: causality, cache = full pass, exact normalization, search, training, I/O."""

from __future__ import annotations

import pytest
import torch
from helpers import all_codes, make_transformer, synthetic_codes

from vq2pc.core.checkpoint import CheckpointError
from vq2pc.latents.beam import beam_search, stochastic_beam_search
from vq2pc.latents.enumerate import codes_to_index, enumerate_log_prior
from vq2pc.latents.selection import select
from vq2pc.models.priors import load_prior, prior_config, train_prior
from vq2pc.models.priors.pixelcnn import PixelCNNPrior
from vq2pc.models.priors.transformer import TransformerPrior, TransformerPriorConfig
from vq2pc.models.train import TrainConfig


@pytest.mark.parametrize("layers", [1, 3])
def test_causality_by_gradients(layers: int) -> None:
    """d logits[i] / d embedding[j] is exactly 0 for j >= i and nonzero for every j < i."""
    h, w = 2, 3
    prior = make_transformer(K=5, hw=(h, w), C=2, d=8, layers=layers)
    z = torch.randint(0, 5, (2, h, w), generator=torch.Generator().manual_seed(1))
    c = torch.tensor([0, 1])
    for i in range(h * w):
        e = prior.embed_codes(z).detach().requires_grad_(True)
        prior.logits_from_embedding(e, c)[:, i].sum().backward()
        influence = e.grad.abs().sum(dim=(0, 2))  # [P]
        assert torch.all(influence[i:] == 0), f"position {i} sees positions >= {i}: {influence}"
        assert torch.all(influence[:i] > 0), f"position {i} misses part of its past: {influence}"


def test_cached_decoding_equals_full_pass() -> None:
    """start/step/reorder give the full pass's log-probabilities, also from a prefix and after reordering."""
    prior = make_transformer(K=4, hw=(3, 2), C=3, d=16, heads=4)
    z = torch.randint(0, 4, (5, 3, 2), generator=torch.Generator().manual_seed(0))
    flat = z.flatten(1)
    classes = torch.arange(3).expand(5, 3)
    with torch.no_grad():
        full = torch.log_softmax(prior.logits(z.repeat_interleave(3, 0), classes.reshape(-1)), 1)
        full = full.flatten(2).view(5, 3, 4, 6)  # [B, C, K, P]
        state, logp = prior.start(classes)
        for i in range(6):
            torch.testing.assert_close(logp, full[..., i], atol=1e-5, rtol=0)
            state, logp = prior.step(state, flat[:, i])
        assert logp is None
        order = torch.tensor([4, 0, 0, 2])  # permute and duplicate sequences mid-way
        state, logp = prior.start(classes, flat[:, :2])
        torch.testing.assert_close(logp, full[..., 2], atol=1e-5, rtol=0)
        state = prior.reorder(state, order)
        state, logp = prior.step(state, flat[order, 2])
        torch.testing.assert_close(logp, full[order, ..., 3], atol=1e-5, rtol=0)
        torch.testing.assert_close(prior.next_log_probs_all_classes(z, 4), full[..., 4], atol=1e-5, rtol=0)


@pytest.mark.parametrize("hw", [(2, 2), (1, 1), (3, 1)])
def test_exact_normalization(hw: tuple[int, int]) -> None:
    """Σ_z p(z|c) = 1 for every class and Σ_z p(z) = 1, by brute force over all K^{hw} grids."""
    prior = make_transformer(K=3, hw=hw, C=2, sharpen=3.0)
    prior.set_class_prior(torch.tensor([0, 1, 1, 1]))
    z = all_codes(3, hw)
    with torch.no_grad():
        per_class = prior.log_prob_all_classes(z, batch_size=7)
        torch.testing.assert_close(torch.logsumexp(per_class, 0), torch.zeros(2), atol=1e-5, rtol=0)
        torch.testing.assert_close(torch.logsumexp(prior.log_prob(z), 0), torch.tensor(0.0), atol=1e-5, rtol=0)
        for cls in range(2):
            torch.testing.assert_close(prior.log_prob_given_class(z, torch.full((z.shape[0],), cls)), per_class[:, cls])
    torch.testing.assert_close(
        enumerate_log_prior(prior, batch_size=5, progress=False), prior.log_prob(z), atol=1e-5, rtol=0
    )


def test_full_width_beam_search_is_exhaustive_top_n() -> None:
    """Width K^{HW}: the cached beam search returns every latent in the order of p(z), with its p(z|c)."""
    prior = make_transformer(K=3, hw=(2, 2), C=2, sharpen=3.0, seed=2)
    prior.set_class_prior(torch.tensor([0, 1, 1]))
    z = all_codes(3, (2, 2))
    with torch.no_grad():
        per_class, log_p = prior.log_prob_all_classes(z), prior.log_prob(z)
    ref_val, ref_idx = log_p.sort(descending=True)
    r = beam_search(prior, torch.zeros((1, 2, 2), dtype=torch.long), torch.zeros((1, 2)), 0, 81, batch_size=7)
    assert torch.equal(codes_to_index(r.codes[0], 3), ref_idx)
    torch.testing.assert_close(r.keys[0], ref_val, atol=1e-5, rtol=0)
    torch.testing.assert_close(r.class_scores[0], per_class[ref_idx], atol=1e-5, rtol=0)
    top = select(prior, "topk", 10, max_space=10)  # a beam of width N (not exact in general)
    assert top.info["exact"] is False and len(top) == 10
    root = torch.zeros((1, 2, 2), dtype=torch.long), torch.zeros((1, 2))
    sbs = stochastic_beam_search(prior, *root, 0, 81, torch.Generator().manual_seed(0))  # N = K^{HW}: every latent once
    assert codes_to_index(sbs.codes[0], 3).sort().values.tolist() == list(range(81))
    torch.testing.assert_close(sbs.class_scores[0], per_class[codes_to_index(sbs.codes[0], 3)], atol=1e-5, rtol=0)


@pytest.mark.parametrize("strategy", ["sample", "gumbel", "beam"])
def test_selection_strategies_run_on_the_transformer(strategy: str) -> None:
    prior = make_transformer(K=3, hw=(2, 2), C=2, sharpen=2.0, seed=3)
    s = select(prior, strategy, 20, starts=2, generator=torch.Generator().manual_seed(0))
    assert codes_to_index(s.codes, 3).unique().numel() == len(s) == 20 - s.info.get("duplicates", 0)
    with torch.no_grad():
        torch.testing.assert_close(s.log_prior, prior.log_prob(s.codes), atol=1e-5, rtol=0)


@pytest.mark.slow
def test_training_reduces_nll_and_checkpoints_roundtrip(tmp_path) -> None:
    K = 4
    z, c = synthetic_codes(768, K, 0)
    vz, vc = synthetic_codes(256, K, 1)
    cfg = prior_config("transformer", K, (2, 2), 2, hidden=16, layers=2, heads=2)
    tcfg = TrainConfig(epochs=12, patience=12, lr=1e-2, batch_size=64, progress=False)
    ck = tmp_path / "prior.pt"
    prior, result = train_prior(z, c, cfg, tcfg, vz, vc, checkpoint=ck)
    assert isinstance(prior, TransformerPrior)
    first = result.history[0]["val"]
    # uniform is log K = 1.386 nats/latent; the structure allows 0.25·log K = 0.35
    assert result.best_val_loss < 0.6 < first or result.best_val_loss < 0.6 * first
    with torch.no_grad():
        ref = prior.log_prob(vz[:16])
        torch.testing.assert_close(load_prior(ck).log_prob(vz[:16]), ref)  # trainer checkpoint
        prior.save(tmp_path / "saved.pt")
        loaded = load_prior(tmp_path / "saved.pt")
        assert isinstance(loaded, TransformerPrior)
        torch.testing.assert_close(loaded.log_prob(vz[:16]), ref)
        torch.testing.assert_close(loaded.class_log_prior, prior.class_log_prior)


def test_bad_input(tmp_path) -> None:
    prior = make_transformer(K=3, hw=(2, 2), C=2)
    ok = torch.zeros(2, 2, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="outside"):
        prior.log_prob(ok + 3)
    with pytest.raises(ValueError, match="classes outside"):
        prior.start(torch.tensor([[0, 2]]))
    with pytest.raises(ValueError, match="prefix must have shape"):
        prior.start(torch.zeros((2, 1), dtype=torch.long), torch.zeros((2, 4), dtype=torch.long))
    with pytest.raises(ValueError, match="multiple of heads"):
        TransformerPriorConfig(K=3, latent_hw=(2, 2), d_model=10, heads=4)
    with pytest.raises(ValueError, match="unknown prior"):
        prior_config("lstm", 3, (2, 2), 1)
    with pytest.raises(CheckpointError, match="not found"):
        load_prior(tmp_path / "missing.pt")
    prior.save(tmp_path / "tf.pt")
    with pytest.raises(CheckpointError, match="not a vq2pc prior checkpoint"):
        PixelCNNPrior.load(tmp_path / "tf.pt")
