"""TreeMixture: a sum over differently shaped trees, checked against enumeration over every image."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch

from vq2pc.circuit.tree import TreeCircuit
from vq2pc.circuit.tree_mixture import TreeMixture, fit_weights
from vq2pc.core.checkpoint import CheckpointError

S, L = 4, 3


def _tree(parent: list[int], owner: list[int], K: int, seed: int) -> TreeCircuit:
    torch.manual_seed(seed)
    c = TreeCircuit(torch.tensor(parent), torch.tensor(owner), K, L).double()
    with torch.no_grad():
        for p in c.parameters():
            p.normal_(0, 1.5)
    return c


def _mixture(weights: list[float] | None = None) -> TreeMixture:
    """Two trees of different shapes, grids and K over the same 4 variables."""
    a = _tree([1, -1, 1, 2], [0, 1, 2, 3], K=2, seed=0)  # 4 positions, a chain below the root
    b = _tree([-1, 0], [0, 0, 1, 1], K=3, seed=1)  # 2 positions of 2 variables
    log_w = None if weights is None else torch.tensor(weights, dtype=torch.float64).log()
    return TreeMixture([a, b], log_w).double()


def _all_images() -> torch.Tensor:
    return torch.tensor(list(itertools.product(range(L), repeat=S)), dtype=torch.float64)


def test_log_prob_is_the_weighted_sum_and_normalized() -> None:
    m, x = _mixture([0.3, 0.7]), _all_images()
    a, b = (c.log_prob(x).exp() for c in m.components)
    assert torch.allclose(m.log_prob(x).exp(), 0.3 * a + 0.7 * b, atol=1e-12)
    assert abs(float(torch.logsumexp(m.log_prob(x), 0))) < 1e-12


def test_marginal_posterior_and_conditional_mean_equal_enumeration() -> None:
    m, x = _mixture([0.4, 0.6]), _all_images()
    p = m.log_prob(x).exp()  # [81] every image
    mask = torch.tensor([True, False, True, False])
    rows = x[::10]
    same = (x[None, :, mask] == rows[:, None, mask]).all(-1).double()  # [B, 81] completions of each row
    marginal = same @ p
    assert torch.allclose(m.log_prob(rows, mask).exp(), marginal, atol=1e-12)
    mean = (same * p) @ x / marginal[:, None]
    assert torch.allclose(m.conditional_mean(rows, mask), torch.where(mask, rows, mean), atol=1e-10)
    comp = torch.stack([same @ c.log_prob(x).exp() for c in m.components], 1) * torch.tensor([0.4, 0.6])
    assert torch.allclose(m.component_posterior(rows, mask), comp / marginal[:, None], atol=1e-10)


def test_samples_follow_the_mixture_unconditionally_and_given_observed_pixels() -> None:
    m, x = _mixture([0.5, 0.5]), _all_images()
    g = torch.Generator().manual_seed(0)
    codes = (m.sample(30000, generator=g) * torch.tensor([27.0, 9, 3, 1])).sum(1).long()
    freq = torch.bincount(codes, minlength=81).double() / 30000
    assert (freq - m.log_prob(x).exp()).abs().sum() < 0.06  # total variation · 2 (81 cells)
    row, mask = torch.tensor([[2.0, 0, 1, 0]]).repeat(30000, 1), torch.tensor([True, False, True, False])
    cond = m.sample(x=row, mask=mask, generator=g)
    assert (cond[:, mask] == row[:, mask]).all()
    freq = torch.bincount((cond[:, 1] * 3 + cond[:, 3]).long(), minlength=9).double() / 30000
    full = x[(x[:, mask] == row[0, mask]).all(1)]  # the 9 completions, in (x1, x3) order
    assert (freq - (m.log_prob(full) - m.log_prob(row[:1], mask)).exp()).abs().sum() < 0.04


def test_fit_weights_reaches_the_maximum_likelihood_weights() -> None:
    m = _mixture([0.2, 0.8])
    x = m.sample(4000, generator=torch.Generator().manual_seed(1))
    logp = m.component_log_probs(x)
    log_w = fit_weights(logp, iterations=500, tol=0.0).double()
    resp = (log_w[:, None] + logp).softmax(0).mean(1)
    assert torch.allclose(resp, log_w.exp(), atol=1e-5)  # the fixed point of EM: the likelihood's maximum
    assert abs(float(log_w.exp()[0]) - 0.2) < 0.05
    uniform = torch.logsumexp(logp - math.log(2), 0).mean()
    assert float(torch.logsumexp(log_w[:, None] + logp, 0).mean()) > float(uniform)


def test_save_load_round_trip_and_bad_files(tmp_path: Path) -> None:
    m = _mixture([0.25, 0.75]).float()
    path = m.save(tmp_path / "mix.safetensors")
    back = TreeMixture.load(path)
    x = _all_images().float()
    assert torch.equal(back.log_prob(x), m.log_prob(x))
    assert back.num_params == m.num_params == sum(c.num_params for c in m.components) + 1
    tree_file = m.components[0].save(tmp_path / "tree.safetensors")
    with pytest.raises(CheckpointError, match="not a vq2pc tree mixture"):
        TreeMixture.load(tree_file)
    with pytest.raises(CheckpointError, match="not a vq2pc tree circuit"):
        TreeCircuit.load(path)
    (tmp_path / "bad.safetensors").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="corrupt or foreign"):
        TreeMixture.load(tmp_path / "bad.safetensors")


def test_components_must_share_the_variables() -> None:
    a = _tree([1, -1, 1, 2], [0, 1, 2, 3], K=2, seed=0)
    short = _tree([-1], [0, 0, 0], K=2, seed=0)
    with pytest.raises(ValueError, match="share the variables"):
        TreeMixture([a, short])
    with pytest.raises(ValueError, match="finite"):
        TreeMixture([a, a], torch.tensor([0.0, float("nan")]))
