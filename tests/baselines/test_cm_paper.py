"""The continuous mixture's paper recipe: a convolutional decoder over a fixed Sobol grid, trained on each
image's top-1 grid point (fine-tuned distillation's posterior picks), compiled into a MixtureCircuit."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from helpers import tiny_cm_paper

from vq2pc.baselines.cm import CMConfig, ContinuousMixture, compile_cm, sobol_normal, train_cm
from vq2pc.baselines.cm_paper import GridLoss
from vq2pc.circuit.finetune import PosteriorPicks
from vq2pc.data import load_dataset, to_model_space
from vq2pc.models.train import TrainConfig

FAST = TrainConfig(epochs=3, patience=5, lr=1e-2, batch_size=32, progress=False)


@pytest.fixture(scope="module")
def digits():
    small = load_dataset("digits", limit=150)
    return type(small)(
        **{
            **small.__dict__,
            "train_x": small.train_x[:96],
            "train_y": small.train_y[:96],
            "val_x": small.val_x[:64],
            "val_y": small.val_y[:64],
        }
    )


def _cfg(digits, **kw) -> CMConfig:
    return tiny_cm_paper(digits.image_shape, digits.levels, **kw)


def _model(cfg: CMConfig, seed: int = 0) -> ContinuousMixture:
    torch.manual_seed(seed)
    return ContinuousMixture(cfg)


def _brute_force_lls(model: ContinuousMixture, x: torch.Tensor) -> torch.Tensor:
    """``[B, M]`` log p(x_b | z_m) summed pixel by pixel from the decoded leaf's own densities."""
    with torch.no_grad():
        leaf = model.decode(model.grid)
        return leaf.log_prob(x[:, None, :]).double().sum(-1)


def _x(digits, v: torch.Tensor) -> torch.Tensor:
    return to_model_space(v, "gaussian", digits.levels, torch.Generator().manual_seed(3)).flatten(1)


def test_compiled_paper_cm_is_the_log_mean_exp_over_its_grid(digits):
    model = _model(_cfg(digits)).eval()
    assert model.grid.shape == (64, 3) and torch.equal(model.grid, sobol_normal(64, 3, 0))
    assert model.num_params == sum(p.numel() for p in model.decoder.parameters())
    x = _x(digits, digits.val_x[:20])
    expect = torch.logsumexp(_brute_force_lls(model, x), 1) - math.log(64)
    circuit = compile_cm(model, num_points=64, seed=0)
    assert len(circuit) == 64 and circuit.meta["recipe"] == "paper"
    torch.testing.assert_close(circuit.log_prob(x).double(), expect, rtol=0, atol=1e-3)
    torch.testing.assert_close(model.log_prob(x).detach().double(), expect, rtol=0, atol=1e-3)
    assert expect.std() > 1.0  # the images are told apart
    with pytest.raises(ValueError, match="its own grid of 64 points"):
        compile_cm(model, num_points=128, seed=0)


def test_categorical_paper_cm_sums_to_one_over_every_image():
    cfg = CMConfig(
        (1, 1, 2), leaf="categorical", levels=3, latent_dim=2, recipe="paper", channels=3, feature_hw=(1, 1), points=32
    )
    circuit = compile_cm(_model(cfg), num_points=32, seed=0)
    every = torch.tensor(list(itertools.product(range(3), repeat=2)), dtype=torch.float32)
    lp = circuit.log_prob(every)
    assert torch.logsumexp(lp, 0).item() == pytest.approx(0.0, abs=1e-5) and lp.std() > 0.01


def test_top1_picks_are_the_brute_force_argmax_and_the_loss_is_their_bound(digits):
    model = _model(_cfg(digits, points=128)).eval()
    x = _x(digits, digits.train_x[:40])
    lls = _brute_force_lls(model, x)
    loss = GridLoss(model, first_step=0, steps_per_epoch=3)
    U = loss.picks(x)
    assert torch.equal(U, torch.unique(lls.argmax(1)))
    top3 = PosteriorPicks(loss.decoded, 3)(x)
    assert torch.equal(top3, torch.unique(lls.topk(3, dim=1).indices))
    model.train()
    value = loss(model, (x.reshape(-1, 1, 8, 8),))
    bound = -(torch.logsumexp(lls[:, U], 1) - math.log(128)).mean() / x.shape[1]
    assert value.item() == pytest.approx(bound.item(), abs=1e-4)
    assert value.item() >= -(torch.logsumexp(lls, 1) - math.log(128)).mean().item() / x.shape[1] - 1e-6
    assert loss.step == 1 and model.training  # the re-decode kept the training mode


def test_training_raises_the_training_likelihood_and_batch_norms_stay_frozen(digits, tmp_path):
    cfg = _cfg(digits)
    x = _x(digits, digits.train_x)
    before = _model(cfg, FAST.seed).log_prob(x).mean().item()
    model, result = train_cm(digits, cfg, FAST, checkpoint=tmp_path / "cm.pt")
    after = model.log_prob(x).mean().item()
    assert result.epochs_run == 3 and after > before + 20.0, (before, after)
    model.train()
    assert all(not m.training for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    loaded = ContinuousMixture.load(tmp_path / "cm.pt")
    assert torch.equal(loaded.grid, model.grid)
    torch.testing.assert_close(loaded.log_prob(x[:5]), model.log_prob(x[:5]).detach())
    val = _x(digits, digits.val_x)
    assert result.best_val_loss == pytest.approx(-compile_cm(model, 64, 0).log_prob(val).mean().item() / 64, rel=0.05)


def test_same_seed_same_parameters_and_resume_is_exact(digits, tmp_path):
    cfg = _cfg(digits)  # 3 steps per epoch, refresh 2: re-decodes at steps 0, 2 of each epoch
    one, _ = train_cm(digits, cfg, FAST, checkpoint=tmp_path / "a.pt")
    two, _ = train_cm(digits, cfg, FAST, checkpoint=tmp_path / "b.pt")
    short = TrainConfig(**{**FAST.__dict__, "epochs": 1})
    train_cm(digits, cfg, short, checkpoint=tmp_path / "c.pt")
    resumed, result = train_cm(digits, cfg, FAST, checkpoint=tmp_path / "c.pt")
    other, _ = train_cm(digits, cfg, TrainConfig(**{**FAST.__dict__, "seed": 1}))
    assert result.epochs_run == 3
    ref = one.state_dict()
    for name, value in two.state_dict().items():
        torch.testing.assert_close(value, ref[name], rtol=0, atol=0, msg=name)
    for name, value in resumed.state_dict().items():
        torch.testing.assert_close(value, ref[name], rtol=0, atol=0, msg=name)
    assert not torch.equal(other.decoder.linear.weight, one.decoder.linear.weight)


def test_mlp_checkpoints_keep_their_old_config_record(digits):
    cfg = CMConfig(digits.image_shape, levels=digits.levels, hidden=8, train_points=32)
    assert cfg.record() == {
        k: v
        for k, v in cfg.__dict__.items()
        if k in ("image_shape", "leaf", "levels", "latent_dim", "hidden", "train_points", "min_std", "max_std")
    }
    assert "grid_seed" in _cfg(digits).record()


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"recipe": "conv"}, "recipe must be 'mlp' or 'paper', got 'conv'"),
        ({"points": 100}, "points: must be a power of 2"),
        ({"top_k": 65}, "top_k must be <= points"),
        ({"refresh": 0}, "refresh must be >= 1, got 0"),
        ({"feature_hw": (3, 3)}, "not reachable"),
        ({"feature_hw": (8, 8)}, "smaller than the image"),
        ({"min_std": 0.01}, "VQ-VAE's Gaussian head"),
    ],
)
def test_bad_paper_settings_fail_with_one_clear_error(digits, kw, match):
    with pytest.raises(ValueError, match=match):
        _cfg(digits, **kw)
