"""Tests of vq2pc.models.nets and vq2pc.models.vqvae: grids, heads, gradients, training, checkpoints, resume."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

import vq2pc.models.train
from vq2pc.core.checkpoint import CheckpointError, save_checkpoint
from vq2pc.core.leaves import Bernoulli, Categorical, Gaussian
from vq2pc.data import DataSplits, load_dataset, to_model_space
from vq2pc.models.train import TrainConfig, evaluate_loss
from vq2pc.models.vqvae import VQVAE, VQVAEConfig, train_vqvae


@pytest.fixture(scope="module")
def digits() -> DataSplits:
    return load_dataset("digits", seed=0)


def _cfg(leaf: str = "gaussian", **kw) -> VQVAEConfig:
    base = dict(image_shape=(1, 8, 8), levels=17, leaf=leaf, latent_hw=(2, 2), K=8, D=4, hidden=16, res_blocks=1)
    return VQVAEConfig(**{**base, **kw})


def _x(model: VQVAE, v: torch.Tensor, seed: int = 0) -> torch.Tensor:
    return to_model_space(v, model.cfg.leaf, model.cfg.levels, torch.Generator().manual_seed(seed))


# --- shapes ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "image_shape,latent_hw",
    [
        ((1, 28, 28), (1, 1)),
        ((1, 28, 28), (2, 2)),
        ((1, 28, 28), (4, 4)),
        ((1, 28, 28), (7, 7)),
        ((1, 8, 8), (1, 1)),
        ((1, 8, 8), (2, 2)),
        ((1, 8, 8), (4, 4)),
        ((3, 6, 10), (2, 3)),
    ],
)
def test_shapes_for_every_latent_grid(image_shape: tuple[int, int, int], latent_hw: tuple[int, int]) -> None:
    cfg = VQVAEConfig(image_shape=image_shape, levels=256, latent_hw=latent_hw, K=5, D=3, hidden=8, res_blocks=1)
    model = VQVAE(cfg).eval()
    x = torch.rand(2, *image_shape)
    assert model.encode(x).shape == (2, 3, *latent_hw)
    codes = model.codes(x)
    assert codes.shape == (2, *latent_hw) and codes.dtype == torch.long
    leaf = model.decode(codes)
    S = image_shape[0] * image_shape[1] * image_shape[2]
    assert isinstance(leaf, Gaussian) and leaf.batch_shape == (2, S)


def test_unreachable_grid_names_reachable_ones() -> None:
    with pytest.raises(ValueError, match=r"3x3.*28x28, 14x14, 7x7, 4x4, 2x2, 1x1"):
        VQVAEConfig(image_shape=(1, 28, 28), levels=256, latent_hw=(3, 3))


# --- heads -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("leaf", ["gaussian", "categorical", "bernoulli"])
@torch.no_grad()
def test_heads_normalize_and_match_loss(leaf: str, digits: DataSplits) -> None:
    torch.manual_seed(0)
    model = VQVAE(_cfg(leaf)).eval()
    x = _x(model, digits.train_x[:6])
    total, stats = model.loss(x)
    assert torch.isfinite(total) and set(stats) == {"recon_nll", "vq_loss", "perplexity"}
    decoded = model.decode(model.codes(x))
    assert decoded.batch_shape == (6, 64)
    recon = -decoded.log_prob(x.reshape(6, -1)).sum(1).mean()
    assert stats["recon_nll"] == pytest.approx(float(recon.detach()), rel=1e-5)
    assert float(total.detach()) == pytest.approx(stats["recon_nll"] + stats["vq_loss"], rel=1e-5)
    assert 1.0 <= stats["perplexity"] <= 8.0
    if leaf == "categorical":
        assert isinstance(decoded, Categorical) and decoded.num_levels == 17
        levels = torch.arange(17.0).reshape(17, 1, 1)
        total_mass = decoded.log_prob(levels.expand(17, 6, 64)).exp().sum(0)
        assert torch.allclose(total_mass, torch.ones(6, 64), atol=1e-5)
    elif leaf == "bernoulli":
        assert isinstance(decoded, Bernoulli)
        mass = decoded.log_prob(torch.zeros(6, 64)).exp() + decoded.log_prob(torch.ones(6, 64)).exp()
        assert torch.allclose(mass, torch.ones(6, 64), atol=1e-6)
    else:
        assert isinstance(decoded, Gaussian)
        assert float(decoded.scale.min()) >= 1e-3 and float(decoded.scale.max()) <= 1.0
        assert float(decoded.loc.min()) > 0 and float(decoded.loc.max()) < 1


def test_categorical_head_pixel_order() -> None:
    """Variable s = c·H·W + i·W + j of the leaf is channel c, row i, column j of the decoder output."""
    from vq2pc.models.nets import head_leaf

    out = torch.randn(2, 3 * 5, 4, 6)  # C = 3, L = 5
    leaf = head_leaf(out, "categorical", 3, 5)
    assert leaf.batch_shape == (2, 72)
    s = 1 * 24 + 2 * 6 + 3
    assert torch.allclose(leaf.logits[1, s], torch.log_softmax(out[1, 5:10, 2, 3], 0))


# --- gradients -------------------------------------------------------------------------------------
def test_gradients_reach_encoder_decoder_and_codebook(digits: DataSplits) -> None:
    torch.manual_seed(0)
    model = VQVAE(_cfg())
    total, _ = model.loss(_x(model, digits.train_x[:16]))
    total.backward()
    first_conv = model.encoder.net[0][0].weight
    assert first_conv.grad is not None and float(first_conv.grad.abs().sum()) > 0  # straight-through
    assert float(model.quantizer.embedding.grad.abs().sum()) > 0
    assert all(p.grad is not None for p in model.decoder.parameters())


@pytest.mark.parametrize("quantizer", ["vq", "ema", "gumbel", "gmvq"])
def test_loss_under_bf16_autocast_keeps_codebook_and_leaves_float32(quantizer: str, digits: DataSplits) -> None:
    """``--amp bf16`` autocasts the training step: the quantizer (k-means init, EMA updates) and the
    leaves must still run in float32 (on CUDA the k-means init failed: bf16 centres into a float32 codebook)."""
    torch.manual_seed(0)
    model = VQVAE(_cfg(quantizer=quantizer, quantizer_opts={"kmeans_init": True} if quantizer in ("vq", "ema") else {}))
    model.train()
    x = _x(model, digits.train_x[:32])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total, _ = model.loss(x)
    total.backward()
    assert total.dtype == torch.float32 and torch.isfinite(total)
    assert all(b.dtype == torch.float32 for b in model.quantizer.buffers() if b.is_floating_point())
    assert all(p.dtype == torch.float32 for p in model.parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total_again, _ = model.loss(x)  # a second step: codebook initialised, EMA statistics updated
    assert torch.isfinite(total_again)


# --- bad input -------------------------------------------------------------------------------------
def test_bad_inputs_raise_clear_errors(digits: DataSplits) -> None:
    model = VQVAE(_cfg("categorical")).eval()
    with pytest.raises(ValueError, match="shape"):
        model.loss(torch.zeros(2, 1, 7, 8))
    with pytest.raises(ValueError, match="float"):
        model.loss(digits.train_x[:2])
    with pytest.raises(ValueError, match=r"\[0, 16\]"):
        model.loss(torch.full((2, 1, 8, 8), 17.0))
    with pytest.raises(ValueError, match="NaN"):
        model.encode(torch.full((2, 1, 8, 8), float("nan")))
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 7\]"):
        model.decode(torch.full((1, 2, 2), 8))
    with pytest.raises(ValueError, match="codes must have shape"):
        model.decode(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="leaf must be 'gaussian', 'categorical' or 'bernoulli', got 'poisson'"):
        _cfg("poisson")
    with pytest.raises(ValueError, match="does not match"):
        train_vqvae(digits, _cfg(levels=256), TrainConfig(epochs=1, progress=False))


# --- training and checkpoints ----------------------------------------------------------------------
@pytest.mark.slow
def test_training_decreases_validation_loss(digits: DataSplits) -> None:
    cfg, tcfg = _cfg(), TrainConfig(epochs=3, batch_size=64, progress=False, seed=0)
    torch.manual_seed(tcfg.seed)
    untrained = VQVAE(cfg)
    val = (to_model_space(digits.val_x, cfg.leaf, cfg.levels, torch.Generator().manual_seed(1)),)
    before = evaluate_loss(untrained, lambda m, b: m.objective(b[0]), val, 256, "cpu")
    model, result = train_vqvae(digits, cfg, tcfg)
    assert result.epochs_run == 3 and len(result.history) == 3
    assert result.best_val_loss < 0.5 * before  # nats per image
    assert result.history[-1]["val"] < result.history[0]["val"]
    after = evaluate_loss(model, lambda m, b: m.objective(b[0]), val, 256, "cpu")
    assert after == pytest.approx(result.best_val_loss, rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("quantizer", ["gumbel", "gmvq"])
def test_gumbel_family_vqvae_trains_uses_its_codebook_and_round_trips(
    quantizer: str, tmp_path: Path, digits: DataSplits
) -> None:
    cfg = _cfg(quantizer=quantizer, quantizer_opts={"kmeans_init": True, "anneal_steps": 60})
    tcfg = TrainConfig(epochs=4, batch_size=64, progress=False, seed=0)
    model, result = train_vqvae(digits, cfg, tcfg)
    assert result.history[-1]["val"] < result.history[0]["val"]
    model.eval()
    x = _x(model, digits.test_x[:300])
    codes = model.codes(x)
    in_use = int(torch.bincount(codes.reshape(-1), minlength=8).gt(0).sum())
    assert in_use >= {"gumbel": 2, "gmvq": 6}[quantizer]  # GM-VQ: the aggregate-posterior term keeps codes in use
    loaded = VQVAE.load(model.save(tmp_path / f"{quantizer}.pt"))
    assert torch.equal(loaded.codes(x), codes)


def test_save_load_round_trip(tmp_path: Path, digits: DataSplits) -> None:
    torch.manual_seed(0)
    model = VQVAE(_cfg("categorical", quantizer="ema", quantizer_opts={"decay": 0.9})).eval()
    path = model.save(tmp_path / "vqvae.pt")
    loaded = VQVAE.load(path)
    assert loaded.cfg == model.cfg and not loaded.training
    codes = torch.randint(0, 8, (5, 2, 2), generator=torch.Generator().manual_seed(0))
    assert torch.equal(loaded.decode(codes).logits, model.decode(codes).logits)
    x = _x(model, digits.test_x[:5])
    assert torch.equal(loaded.codes(x), model.codes(x))
    assert loaded.num_params == model.num_params > 0


def test_loading_foreign_or_corrupt_files_fails_clearly(tmp_path: Path) -> None:
    foreign = save_checkpoint(tmp_path / "prior.pt", "prior", {"config": {}, "state_dict": {}})
    with pytest.raises(CheckpointError, match=r"prior\.pt.*vqvae"):
        VQVAE.load(foreign)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"junk\.pt"):
        VQVAE.load(junk)
    with pytest.raises(CheckpointError, match="not found"):
        VQVAE.load(tmp_path / "missing.pt")
    mismatched = save_checkpoint(
        tmp_path / "bad.pt", "vqvae", {"config": {**_cfg().__dict__, "K": 9}, "state_dict": VQVAE(_cfg()).state_dict()}
    )
    with pytest.raises(CheckpointError, match=r"bad\.pt"):
        VQVAE.load(mismatched)


def test_resume_after_interruption_equals_straight_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, digits: DataSplits
) -> None:
    small = replace(digits, train_x=digits.train_x[:256], val_x=digits.val_x[:128])
    cfg = _cfg("gaussian", quantizer_opts={"kmeans_init": True, "dead_code_threshold": 0.5})
    tcfg = TrainConfig(epochs=2, batch_size=64, progress=False, seed=3)
    straight, straight_result = train_vqvae(small, cfg, tcfg, checkpoint=tmp_path / "straight.pt")

    real_save = vq2pc.models.train.save_checkpoint

    def save_then_die(*args, **kwargs):
        real_save(*args, **kwargs)
        raise KeyboardInterrupt("simulated kill after the first epoch's checkpoint")

    monkeypatch.setattr(vq2pc.models.train, "save_checkpoint", save_then_die)
    ck = tmp_path / "resumed.pt"
    with pytest.raises(KeyboardInterrupt):
        train_vqvae(small, cfg, tcfg, checkpoint=ck)
    after_one = VQVAE.load(ck)  # a trainer checkpoint loads directly (config from meta)
    monkeypatch.setattr(vq2pc.models.train, "save_checkpoint", real_save)
    resumed, resumed_result = train_vqvae(small, cfg, tcfg, checkpoint=ck)

    assert resumed_result.epochs_run == 2
    assert [h["val"] for h in resumed_result.history] == [h["val"] for h in straight_result.history]
    state_a, state_b = straight.state_dict(), resumed.state_dict()
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert any(not torch.equal(after_one.state_dict()[k], state_b[k]) for k in state_b)
    again, again_result = train_vqvae(small, cfg, tcfg, checkpoint=ck)  # finished: returns at once
    assert again_result.epochs_run == 2 and torch.equal(again.quantizer.codebook, resumed.quantizer.codebook)
