"""Baselines: EiNet (libcirkit) and the continuous mixture, on tiny exact cases and a few digits steps."""

from __future__ import annotations

import itertools
import math
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
from scipy import stats

from vq2pc.baselines.cm import (
    CMConfig,
    ContinuousMixture,
    compile_cm,
    sobol_normal,
    train_cm,
)
from vq2pc.core.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from vq2pc.data import load_dataset, to_model_space
from vq2pc.models.train import TrainConfig

FAST = TrainConfig(epochs=2, patience=5, lr=1e-2, batch_size=50, progress=False)


def _all_images(levels: int, s: int) -> torch.Tensor:
    return torch.tensor(list(itertools.product(range(levels), repeat=s)), dtype=torch.float32)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", limit=150)


# --- EiNet -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def einet_mod():
    return pytest.importorskip("vq2pc.baselines.einet", reason="EiNet needs libcirkit (pip install libcirkit==0.3.1)")


@pytest.fixture(scope="module")
def cirkit():
    return pytest.importorskip("cirkit", reason="EiNet needs libcirkit (pip install libcirkit==0.3.1)")


def _cat_einet(einet_mod, levels: int = 3, seed: int = 0):
    cfg = einet_mod.EiNetConfig(
        (1, 2, 2), leaf="categorical", levels=levels, pieces=(2,), num_input_units=3, num_sum_units=3, seed=seed
    )
    return einet_mod.EiNet(cfg)


def test_einet_categorical_normalizes_and_depends_on_input(cirkit, einet_mod):
    model = _cat_einet(einet_mod)
    lp = model.log_prob(_all_images(3, 4)).detach()
    assert lp.shape == (81,)
    assert torch.logsumexp(lp, 0).item() == pytest.approx(0.0, abs=1e-5)
    assert lp.std() > 0.05  # not one constant
    assert model.num_params == sum(p.numel() for p in model.parameters()) > 0


def test_einet_gaussian_integrates_to_one(cirkit, einet_mod):
    cfg = einet_mod.EiNetConfig(
        (1, 1, 2), leaf="gaussian", levels=256, pieces=(2,), num_input_units=3, num_sum_units=3, min_std=0.05
    )
    model = einet_mod.EiNet(cfg)
    grid = torch.linspace(-5.0, 6.0, 1101)
    xx = torch.cartesian_prod(grid, grid)
    density = model.log_prob(xx).detach().double().exp().reshape(1101, 1101)
    total = torch.trapezoid(torch.trapezoid(density, grid.double(), dim=1), grid.double())
    assert total.item() == pytest.approx(1.0, abs=1e-3)
    assert model.log_prob(xx[:3], torch.zeros(2, dtype=torch.bool)).detach().abs().max() < 1e-5


@pytest.mark.slow
def test_einet_mnist_size_is_not_clamped_and_learns(cirkit, einet_mod):
    """The reported libcirkit failure: a default compile gives -708.40 for every 28x28 input."""
    cfg = einet_mod.EiNetConfig((1, 28, 28), leaf="gaussian", pieces=(4,), num_input_units=2, num_sum_units=2)
    model = einet_mod.EiNet(cfg)
    xs = torch.stack([torch.zeros(784), torch.full((784,), 0.3), torch.ones(784), torch.rand(784)])
    lp = model.log_prob(xs)
    assert len(set(lp.detach().tolist())) == 4
    assert (lp.detach() < -708.5).any()  # below libcirkit's clamp, still exact
    lp.sum().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and max(float(g.abs().max()) for g in grads) > 0


def test_einet_marginals_and_conditionals_match_brute_force(cirkit, einet_mod):
    model = _cat_einet(einet_mod)
    table = model.log_prob(_all_images(3, 4)).detach().reshape(3, 3, 3, 3)
    mask = torch.tensor([True, False, True, False])  # observe pixels 0 and 2
    x = torch.tensor([[0.0, 2.0, 1.0, 0.0], [2.0, 0.0, 2.0, 1.0]])
    joint = torch.stack([table[int(r[0]), :, int(r[2]), :] for r in x])  # [B, x1, x3]
    marg = torch.logsumexp(joint.flatten(1), 1)
    assert torch.allclose(model.log_prob(x, mask).detach(), marg, atol=1e-5)
    cond = (joint - marg[:, None, None]).exp()
    probs = model.conditional_probs(x, mask)
    assert torch.allclose(probs[:, 1], cond.sum(2), atol=1e-5)
    assert torch.allclose(probs[:, 3], cond.sum(1), atol=1e-5)
    levels = torch.arange(3.0)
    mean = model.conditional_mean(x, mask)
    assert torch.allclose(mean[:, [1, 3]], torch.stack([cond.sum(2) @ levels, cond.sum(1) @ levels], 1), atol=1e-5)
    assert torch.equal(mean[:, [0, 2]], x[:, [0, 2]])
    filled = model.inpaint(x, mask)
    assert torch.equal(filled[:, 1], cond.sum(2).argmax(1).float())


def test_einet_gaussian_conditional_mean_matches_quadrature(cirkit, einet_mod):
    cfg = einet_mod.EiNetConfig(
        (1, 1, 2), leaf="gaussian", pieces=(2,), num_input_units=4, num_sum_units=4, min_std=0.05, seed=3
    )
    model = einet_mod.EiNet(cfg)
    grid = torch.linspace(-5.0, 6.0, 4001)
    x0 = torch.tensor([0.2, 0.7])
    mask = torch.tensor([True, False])
    for v in x0:
        pts = torch.stack([torch.full_like(grid, float(v)), grid], 1)
        dens = model.log_prob(pts).detach().double().exp()
        expect = torch.trapezoid(dens * grid, grid) / torch.trapezoid(dens, grid)
        got = model.conditional_mean(torch.tensor([[float(v), 123.0]]), mask)
        assert got[0, 0] == pytest.approx(float(v))
        assert got[0, 1].item() == pytest.approx(expect.item(), abs=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("shape, pieces", [((1, 2, 2), (2,)), ((1, 3, 3), (3,)), ((1, 2, 4), (2,))])
def test_einet_samples_follow_the_distribution(cirkit, einet_mod, shape, pieces):
    # (3, 3) has mixing layers of arity 2..4; (2, 4) multi-pixel patches (a Hadamard layer)
    cfg = einet_mod.EiNetConfig(
        shape, leaf="categorical", levels=2, pieces=pieces, num_input_units=3, num_sum_units=3, seed=1
    )
    model = einet_mod.EiNet(cfg)
    s, n = cfg.num_variables, 40000
    probs = model.log_prob(_all_images(2, s)).detach().double().exp()
    draws = model.sample(n, generator=torch.Generator().manual_seed(0))
    again = model.sample(n, generator=torch.Generator().manual_seed(0))
    assert torch.equal(draws, again)
    idx = (draws.long() * 2 ** torch.arange(s - 1, -1, -1)).sum(1)
    counts = torch.bincount(idx, minlength=2**s).double()
    assert probs.sum().item() == pytest.approx(1.0, abs=1e-6)
    assert stats.chisquare(counts.numpy(), (probs / probs.sum() * n).numpy()).pvalue > 1e-3


def test_einet_gaussian_samples_have_the_model_mean(cirkit, einet_mod):
    cfg = einet_mod.EiNetConfig(
        (1, 2, 4), leaf="gaussian", pieces=(2,), num_input_units=3, num_sum_units=3, min_std=0.05, max_std=0.3, seed=2
    )
    model = einet_mod.EiNet(cfg)
    draws = model.sample(40000, generator=torch.Generator().manual_seed(1))
    mean = model.conditional_mean(torch.zeros(1, 8), torch.zeros(1, 8, dtype=torch.bool))[0]
    stderr = draws.std(0) / 200.0
    assert torch.all((draws.mean(0) - mean).abs() < 4 * stderr)


@pytest.mark.slow
def test_einet_trains_resumes_and_round_trips(cirkit, einet_mod, digits, tmp_path):
    cfg = einet_mod.EiNetConfig(
        digits.image_shape, leaf="gaussian", levels=digits.levels, pieces=(4,), num_input_units=3, num_sum_units=3
    )
    x_val = to_model_space(digits.val_x, "gaussian", digits.levels, torch.Generator().manual_seed(5)).flatten(1)
    before = -einet_mod.EiNet(cfg).log_prob(x_val).mean().item()
    ck = tmp_path / "einet.pt"
    model, result = einet_mod.train_einet(digits, cfg, FAST, checkpoint=ck)
    after = -model.log_prob(x_val).mean().item()
    assert result.epochs_run == 2 and after < before - 3.0
    again, result2 = einet_mod.train_einet(digits, cfg, FAST, checkpoint=ck)  # finished: returns at once
    assert result2.epochs_run == 2
    loaded = einet_mod.EiNet.load(ck)
    assert torch.allclose(loaded.log_prob(x_val[:5]), model.log_prob(x_val[:5]))
    assert torch.allclose(again.log_prob(x_val[:5]), model.log_prob(x_val[:5]))
    # a checkpoint from before a setting existed (at its None default) resumes; another setting is refused
    saved = load_checkpoint(ck, "einet")
    del saved["meta"]["config"]["pic_net_dim"]
    save_checkpoint(ck, "einet", {k: v for k, v in saved.items() if k != "format"})
    assert einet_mod.train_einet(digits, cfg, FAST, checkpoint=ck)[1].epochs_run == 2
    with pytest.raises(CheckpointError, match=r"differs in \['max_std'\]"):
        einet_mod.train_einet(digits, replace(cfg, max_std=0.9), FAST, checkpoint=ck)


def test_einet_rejects_bad_input(cirkit, einet_mod):
    model = _cat_einet(einet_mod)
    with pytest.raises(ValueError, match="x has shape"):
        model.log_prob(torch.zeros(2, 5))
    with pytest.raises(ValueError, match="integer levels"):
        model.log_prob(torch.full((1, 4), 3.0))
    with pytest.raises(ValueError, match="NaN"):
        model.log_prob(torch.tensor([[0.0, float("nan"), 0.0, 0.0]]))
    with pytest.raises(ValueError, match="pieces"):
        einet_mod.EiNetConfig((1, 4, 4), pieces=(0,))


def test_einet_missing_library_names_the_install_command(einet_mod, monkeypatch):
    monkeypatch.setitem(sys.modules, "cirkit", None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install libcirkit==0\.3\.1"):
        einet_mod.require_cirkit()


# --- continuous mixture ---------------------------------------------------------------------------
def test_sobol_points_are_standard_normal():
    z = sobol_normal(4096, 16, seed=0)
    assert z.shape == (4096, 16) and torch.isfinite(z).all()
    assert z.mean().abs() < 0.01 and (z.var() - 1).abs() < 0.02
    assert (z < 1.0).float().mean().item() == pytest.approx(stats.norm.cdf(1.0), abs=0.005)
    assert torch.equal(z, sobol_normal(4096, 16, seed=0)) and not torch.equal(z, sobol_normal(4096, 16, seed=1))
    with pytest.raises(ValueError, match="power of 2"):
        sobol_normal(1000, 16)


def test_cm_matrix_likelihoods_equal_leaf_sums():
    for leaf in ("gaussian", "categorical"):
        torch.manual_seed(0)
        model = ContinuousMixture(CMConfig((1, 3, 3), leaf=leaf, levels=5, hidden=8, train_points=8))
        z = sobol_normal(8, 16, 0)
        x = torch.randint(0, 5, (4, 9)).float() / (5.0 if leaf == "gaussian" else 1.0)
        expect = model.decode(z).log_prob(x[:, None, :]).sum(-1)  # [B, M]
        assert torch.allclose(model.component_log_likelihoods(x, z), expect, atol=1e-4)


def test_compiled_cm_normalizes_and_matches_the_estimate():
    torch.manual_seed(0)
    model = ContinuousMixture(CMConfig((1, 1, 2), leaf="categorical", levels=3, hidden=8, train_points=64))
    circuit = compile_cm(model, num_points=256, seed=3)
    lp = circuit.log_prob(_all_images(3, 2))
    assert torch.logsumexp(lp, 0).item() == pytest.approx(0.0, abs=1e-5)
    assert lp.std() > 0.01
    assert torch.allclose(lp, model.log_prob(_all_images(3, 2), sobol_normal(256, 16, 3)), atol=1e-5)
    assert len(circuit) == 256 and circuit.num_params == 256 * 2 * 3 + 256
    assert circuit.meta["decoder_params"] == model.num_params


def test_cm_training_improves_validation_nll(digits, tmp_path):
    cfg = CMConfig(digits.image_shape, leaf="gaussian", levels=digits.levels, hidden=16, train_points=64)
    x_val = to_model_space(digits.val_x, "gaussian", digits.levels, torch.Generator().manual_seed(5)).flatten(1)
    z = sobol_normal(256, 16, 9)
    torch.manual_seed(FAST.seed)
    before = -ContinuousMixture(cfg).log_prob(x_val, z).mean().item()
    model, result = train_cm(digits, cfg, FAST, checkpoint=tmp_path / "cm.pt")
    with torch.no_grad():
        after = -model.log_prob(x_val, z).mean().item()
    assert result.epochs_run == 2 and after < before - 5.0
    assert (torch.tensor([1e-39]) * 1.0).item() != 0.0  # denormals flushed in training only (core.devices)
    assert model.num_params == sum(p.numel() for p in model.decoder.parameters())
    loaded = ContinuousMixture.load(tmp_path / "cm.pt")
    assert torch.allclose(loaded.log_prob(x_val[:5], z), model.log_prob(x_val[:5], z))
    circuit = compile_cm(model, num_points=512, seed=0)
    assert circuit.log_prob(x_val).mean().item() == pytest.approx(-after, abs=0.05 * abs(after) + 1.0)
    assert math.isfinite(float(np.mean(circuit.sample(4, generator=torch.Generator().manual_seed(0)).numpy())))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["cm", "einet"])
def test_interrupted_baseline_training_resumes_to_the_same_weights(kind, digits, tmp_path, request):
    """One epoch, stop, resume to two: the same weights as two epochs straight. The dequantization noise
    and the CM's integration points are seeded by the step, so the resumed run draws what the
    uninterrupted one drew."""
    small = type(digits)(**{**digits.__dict__, "train_x": digits.train_x[:120], "train_y": digits.train_y[:120]})
    if kind == "cm":
        cfg, train = (
            CMConfig(digits.image_shape, leaf="gaussian", levels=digits.levels, hidden=8, train_points=32),
            train_cm,
        )
    else:
        request.getfixturevalue("cirkit")
        einet_mod = request.getfixturevalue("einet_mod")
        cfg = einet_mod.EiNetConfig(
            digits.image_shape, leaf="gaussian", levels=digits.levels, pieces=(4,), num_input_units=2, num_sum_units=2
        )
        train = einet_mod.train_einet
    straight, _ = train(small, cfg, FAST, checkpoint=tmp_path / "straight.pt")
    train(small, cfg, FAST.__class__(**{**FAST.__dict__, "epochs": 1}), checkpoint=tmp_path / "resumed.pt")
    resumed, result = train(small, cfg, FAST, checkpoint=tmp_path / "resumed.pt")
    assert result.epochs_run == 2
    ref = straight.state_dict()
    for name, value in resumed.state_dict().items():
        torch.testing.assert_close(value, ref[name], rtol=0, atol=0, msg=name)
