"""Inpainting metrics against brute-force enumeration on a tiny categorical mixture; the plot."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import vq2pc.circuit as circuit
from vq2pc.core.leaves import Categorical, Gaussian
from vq2pc.evaluate import inpainting_metrics, plot_inpainting

MixtureCircuit = circuit.MixtureCircuit

S, L, N = 3, 3, 4


def _tiny_categorical(seed: int = 0) -> tuple[MixtureCircuit, torch.Tensor, torch.Tensor]:
    """A float64 categorical mixture and its own (log-softmaxed) tables ``[N,S,L]`` and log weights ``[N]``."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.log_softmax(torch.randn(N, S, L, generator=g, dtype=torch.float64) * 1.5, -1)
    logw = torch.log_softmax(torch.randn(N, generator=g, dtype=torch.float64), 0)
    return MixtureCircuit(Categorical(logits.clone()), logw.clone()), logits, logw


def _brute_joint(logits: torch.Tensor, logw: torch.Tensor) -> dict[tuple[int, ...], float]:
    """p(x) for every x in {0..L-1}^S, straight from the tables (no circuit query)."""
    out = {}
    for x in itertools.product(range(L), repeat=S):
        per = logits[:, torch.arange(S), torch.tensor(x)].sum(1)  # [N]
        out[x] = float(torch.logsumexp(per + logw, 0).exp())
    return out


def test_conditional_bpd_and_mse_equal_brute_force() -> None:
    c, logits, logw = _tiny_categorical()
    joint = _brute_joint(logits, logw)
    assert sum(joint.values()) == pytest.approx(1.0, abs=1e-9)
    xs = torch.tensor(list(joint), dtype=torch.float64)  # all 27 images
    masks = {
        "first": torch.tensor([[True, False, False]]).expand(len(xs), S).clone(),
        "last": torch.tensor([[True, True, False]]).expand(len(xs), S).clone(),
    }
    got = inpainting_metrics(c, xs, masks, "categorical", L)
    for name, mask in masks.items():
        bits, sq = [], []
        for x, m in zip(xs.long().tolist(), mask.tolist()):
            match = [y for y in joint if all(y[i] == x[i] for i in range(S) if m[i])]
            p_obs = sum(joint[y] for y in match)
            hidden = [i for i in range(S) if not m[i]]
            bits.append(-math.log2(joint[tuple(x)] / p_obs) / len(hidden))
            mean = {i: sum(joint[y] * y[i] for y in match) / p_obs for i in hidden}
            sq.append(sum(((mean[i] - x[i]) / (L - 1)) ** 2 for i in hidden) / len(hidden))
        assert got[name]["cond_bpd"] == pytest.approx(sum(bits) / len(bits), rel=1e-9)
        assert got[name]["mse"] == pytest.approx(sum(sq) / len(sq), rel=1e-9)
        assert got[name]["images"] == len(xs)


def test_gaussian_conditional_bpd_adds_log2_levels() -> None:
    """One Gaussian component: p(x_u|x_o) = p(x_u), so the conditional BPD is analytic."""
    mean, std = torch.full((1, 4), 0.5), torch.full((1, 4), 0.25)
    c = MixtureCircuit(Gaussian(mean, std), torch.zeros(1))
    x = torch.tensor([[0.1, 0.2, 0.7, 0.9]])
    mask = torch.tensor([[True, True, False, False]])
    got = inpainting_metrics(c, x, {"right": mask}, "gaussian", 256)["right"]
    nll = -torch.distributions.Normal(0.5, 0.25).log_prob(x[0, 2:]).sum().item()
    assert got["cond_bpd"] == pytest.approx(nll / (2 * math.log(2)) + 8.0, rel=1e-6)
    assert got["mse"] == pytest.approx(((0.5 - 0.7) ** 2 + (0.5 - 0.9) ** 2) / 2, rel=1e-5)


def test_bad_masks_raise() -> None:
    c, _, _ = _tiny_categorical()
    x = torch.zeros(2, S)
    with pytest.raises(ValueError, match="shape"):
        inpainting_metrics(c, x, {"bad": torch.ones(2, S + 1, dtype=torch.bool)}, "categorical", L)
    with pytest.raises(ValueError, match="hides no pixel"):
        inpainting_metrics(c, x, {"none": torch.ones(2, S, dtype=torch.bool)}, "categorical", L)


def test_plot_inpainting_writes_png(tmp_path) -> None:
    g = torch.Generator().manual_seed(1)
    shape = (1, 6, 6)
    c = MixtureCircuit(Gaussian(torch.rand(5, 36, generator=g), torch.full((5, 36), 0.1)), torch.zeros(5) - math.log(5))
    x = torch.rand(3, 36, generator=g)
    left = torch.ones(3, 1, 6, 6, dtype=torch.bool)
    left[..., :3] = False
    masks = {"left hidden": left.reshape(3, 36), "random": torch.rand(3, 36, generator=g) > 0.5}
    out = plot_inpainting({"DM": c, "DM again": c}, x, masks, shape, tmp_path / "inpaint.png", generator=g)
    assert out.is_file() and out.stat().st_size > 1000


def test_plot_inpainting_categorical_levels(tmp_path) -> None:
    """App. G: the same plot with categorical leaves and integer-level data."""
    from vq2pc.data.masks import make_mask

    g = torch.Generator().manual_seed(2)
    c = MixtureCircuit(Categorical(torch.randn(4, 25, 17, generator=g)), torch.zeros(4))
    x = torch.randint(0, 17, (2, 25), generator=g).float()
    masks = {k: make_mask(k, (1, 5, 5), 2) for k in ("top", "center")}
    metrics = inpainting_metrics(c, x, masks, "categorical", 17)
    assert set(metrics) == {"top", "center"} and all(0 <= m["mse"] <= 1 for m in metrics.values())
    out = plot_inpainting({"DM cat": c}, x, masks, (1, 5, 5), tmp_path / "cat.png", "categorical", 17, generator=g)
    assert out.stat().st_size > 1000
