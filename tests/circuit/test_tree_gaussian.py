"""GaussianTreeCircuit and its fitting: exact queries against enumeration over every latent grid, the
discretized twin's normalization over every image, EM statistics against brute-force posteriors."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch
from helpers import tree_latent_grids

from vq2pc.circuit import tree_fit_gaussian as gauss
from vq2pc.circuit.tree import TreeCircuit
from vq2pc.circuit.tree_fit import bpd, distill_tree, em_fit, image_bpd, m_step, smoothing
from vq2pc.circuit.tree_gaussian import GaussianTreeCircuit
from vq2pc.circuit.tree_io import TreeParams
from vq2pc.core.leaves import Gaussian

PARENT = torch.tensor([1, -1, 1, 2])  # 4 positions, depth 2, rooted at 1
OWNER = torch.tensor([0, 0, 1, 2, 2, 3])  # patches of 2, 1, 2 and 1 variables


def _circuit(K: int = 2, L: int = 4, seed: int = 0, floor: float = 0.0) -> GaussianTreeCircuit:
    torch.manual_seed(seed)
    c = GaussianTreeCircuit(PARENT, OWNER, K, L, std_min=1e-3, floor=floor).double()
    with torch.no_grad():
        c.root_logits.normal_(0, 1.5)
        c.edge_logits.normal_(0, 1.5)
        c.leaf_logits[:, 0].uniform_(0, 1)
        c.leaf_logits[:, 1].uniform_(-2.5, -0.5)
    return c


def _brute_joint(c: GaussianTreeCircuit, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """log p(x_obs, z) ``[B, K^M]`` for every latent grid z, by enumeration."""
    zs, lp = tree_latent_grids(c)  # [G, M], [G]
    leaves = c.log_params().leaves.detach()
    rows, states = torch.arange(c.num_variables), zs[:, c.owner]  # [S], [G, S]
    leaf = Gaussian(leaves[:, 0][rows, states], leaves[:, 1].exp()[rows, states]).log_prob(x[:, None, :])  # [B,G,S]
    if c.floor:  # every x here lies in [0, 1]: the uniform density is 1
        leaf = torch.logaddexp(leaf + math.log1p(-c.floor), torch.tensor(math.log(c.floor), dtype=leaf.dtype))
    if mask is not None:
        leaf = leaf * mask
    return lp + leaf.sum(-1)


@pytest.mark.parametrize("floor", [0.0, 0.05])
def test_log_prob_and_marginals_equal_enumeration_over_latent_grids(floor: float) -> None:
    c = _circuit(floor=floor)
    x = torch.rand(7, 6, dtype=torch.float64)
    assert torch.allclose(c.log_prob(x), torch.logsumexp(_brute_joint(c, x), 1), atol=1e-10)
    mask = torch.tensor([True, False, True, True, False, False])
    hidden_garbage = x.where(mask, torch.full_like(x, float("nan")))
    brute = torch.logsumexp(_brute_joint(c, x, mask.double()), 1)
    assert torch.allclose(c.log_prob(hidden_garbage, mask), brute, atol=1e-10)


@pytest.mark.parametrize("floor", [0.0, 0.05])
def test_discretized_twin_is_normalized_and_bins_each_gaussian(floor: float) -> None:
    c = _circuit(K=2, L=3, seed=1, floor=floor)
    twin = c.discretized()
    images = torch.tensor(list(itertools.product(range(3), repeat=6)), dtype=torch.float64)  # all 729
    assert isinstance(twin, TreeCircuit) and not isinstance(twin, GaussianTreeCircuit)
    assert abs(float(torch.logsumexp(twin.log_prob(images), 0))) < 1e-10
    # each (variable, state) leaf is the Gaussian's mass on the level's bin, the end bins open
    mean, log_std = c.log_params().leaves.detach().unbind(1)
    d = torch.distributions.Normal(mean, log_std.exp())
    edges = torch.tensor([-math.inf, 1 / 3, 2 / 3, math.inf], dtype=torch.float64)[:, None, None]
    mass = (1 - floor) * (d.cdf(edges[1:]) - d.cdf(edges[:-1])).permute(1, 0, 2) + floor / 3  # [S, L, K]
    assert torch.allclose(twin.log_params().leaves.exp(), mass, atol=1e-9)


@pytest.mark.parametrize("floor", [0.0, 0.05])
def test_expected_statistics_equal_brute_force_posteriors(floor: float) -> None:
    c = _circuit(seed=2, floor=floor)
    x = torch.rand(5, 6, dtype=torch.float64)
    params = TreeParams(*(t.detach().requires_grad_() for t in c.log_params()))
    grads, loglik = gauss.expected_stats(c, x, params)
    joint = _brute_joint(c, x)  # [B, G]
    post = (joint - torch.logsumexp(joint, 1, keepdim=True)).exp()
    zs = torch.tensor(list(itertools.product(range(c.K), repeat=4)))
    q = torch.einsum("bg,gsk->bsk", post, torch.nn.functional.one_hot(zs[:, c.owner], c.K).double())  # [B, S, K]
    g = c.gaussian_log_terms(x, c.log_params().leaves.detach())  # the Gaussian's share of each floored leaf
    q = q * (g + math.log1p(-floor) - c.floored(g, x)).exp()
    want = torch.stack((q.sum(0), torch.einsum("bsk,bs->sk", q, x), torch.einsum("bsk,bs->sk", q, x * x)), 1)
    assert torch.allclose(grads.leaves, want, atol=1e-10)
    assert torch.allclose(grads.root, torch.einsum("bg,gk->k", post, torch.nn.functional.one_hot(zs[:, 1], 2).double()))
    assert abs(float(loglik) - float(torch.logsumexp(joint, 1).sum())) < 1e-9


def test_complete_statistics_are_the_exact_dequantized_moments() -> None:
    L = 4
    v = torch.tensor([[0, 1, 2, 3, 0, 0], [2, 1, 3, 3, 0, 1], [0, 3, 0, 0, 1, 1]])
    codes = torch.tensor([[0, 1, 0, 1], [0, 0, 1, 1], [1, 1, 1, 0]])
    c = GaussianTreeCircuit(PARENT, OWNER, 2, L)
    stats = gauss.complete_stats(c, codes, v)
    # variable 0 (position 0) in state 0: images 0 and 1, levels 0 and 2 -> x uniform on [0, 1/4) and [2/4, 3/4)
    draws = (v[:2, 0].double()[:, None] + torch.linspace(0, 1, 200001, dtype=torch.float64)[None]) / L
    assert torch.allclose(
        stats[0, :, 0], torch.stack((torch.tensor(2.0), draws.mean(1).sum(), (draws**2).mean(1).sum())), atol=1e-8
    )
    leaves = gauss.gaussian_leaves(stats, torch.zeros(6, L), L, 1e-3)  # no pseudo-counts: moments
    assert torch.allclose(leaves[0, 0, 0].double(), draws.mean(), atol=1e-6)
    assert torch.allclose(leaves[0, 1, 0].double().exp(), draws.std(), atol=1e-5)


def _tree_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (levels, ``[n, 1, 4, 4]``) whose 2×2 patches follow 3 hidden types, and those types."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 3, (n, 1), generator=g).repeat(1, 4)  # one type for all positions
    base = torch.tensor([10.0, 120.0, 240.0])[codes].repeat_interleave(4, 1)  # [n, 16], patch-major order
    owner = torch.tensor([(r // 2) * 2 + c // 2 for r in range(4) for c in range(4)])
    order = torch.argsort(owner, stable=True)
    images = torch.empty(n, 16)
    images[:, order] = (base + torch.randn(n, 16, generator=g) * 6).clamp(0, 255)
    return images.round().to(torch.uint8).view(n, 1, 4, 4), codes


def test_distilled_and_em_fitted_tree_models_structured_images() -> None:
    images, codes = _tree_data(600, 0)
    prior = smoothing(images.reshape(600, -1), 256, 0.01, 0.1)
    c = distill_tree(codes[:500], images[:500], 3, 256, (1, 4, 4), (2, 2), prior, std_min=1e-3)
    assert isinstance(c, GaussianTreeCircuit) and c.num_params == 2 + 3 * 3 * 2 + 2 * 16 * 3
    shuffled = distill_tree(
        codes[:500][torch.randperm(500)], images[:500], 3, 256, (1, 4, 4), (2, 2), prior, std_min=1e-3
    )
    val = images[500:]
    assert bpd(c, val) < bpd(shuffled, val) - 1.0  # the types explain the pixels
    result = em_fit(shuffled, images[:500], val, prior, iterations=8, patience=8, seed=3)
    assert result.history[-1]["train_bpd"] < result.history[0]["train_bpd"] - 0.5  # EM finds the types
    assert bpd(shuffled, val) == pytest.approx(result.best_val_bpd)
    per_image = image_bpd(shuffled, val, draws=3)
    assert per_image.shape == (100,) and float(per_image.mean()) >= bpd(shuffled.discretized(), val) - 1e-6  # Jensen


def test_em_statistics_give_the_closed_form_m_step_at_a_fixed_draw() -> None:
    images, _ = _tree_data(200, 1)
    c = GaussianTreeCircuit(PARENT[:4], torch.tensor([0, 0, 1, 1, 0, 0, 1, 1, 2, 2, 3, 3, 2, 2, 3, 3]), 3, 256)
    prior = smoothing(images.reshape(200, -1), 256, 0.01, 0.1)
    x = gauss.dequantized(images.reshape(200, -1).long(), 256, 0, 0)
    before = float(c.log_prob(x).sum())
    params = TreeParams(*(t.detach().requires_grad_() for t in c.log_params()))
    grads, _ = gauss.expected_stats(c, x, params)
    c.set_log_params(m_step(grads, prior, c.std_min))
    assert float(c.log_prob(x).sum()) > before  # one EM step on fixed data raises its likelihood


@pytest.mark.parametrize("floor", [0.0, 0.2])
def test_save_load_round_trip_and_samples(tmp_path: Path, floor: float) -> None:
    c = _circuit(seed=3, floor=floor).float()
    path = c.save(tmp_path / "g.safetensors")
    back = TreeCircuit.load(path)
    assert isinstance(back, GaussianTreeCircuit) and (back.std_min, back.floor, back.levels) == (c.std_min, floor, 4)
    x = torch.rand(4, 6)
    assert torch.allclose(back.log_prob(x), c.log_prob(x))
    g = torch.Generator().manual_seed(0)
    draws = c.sample(20000, generator=g)
    none_seen = torch.zeros(1, 6, dtype=torch.bool)
    mean = c.conditional_mean(torch.zeros(1, 6), none_seen)[0]
    assert torch.allclose(draws.mean(0), mean, atol=0.02)
    mask = torch.tensor([True, False, False, True, False, False])
    given = c.sample(3, x=x[:3], mask=mask, generator=g)
    assert torch.equal(given[:, mask], x[:3, mask])


def test_bad_input_gets_one_clear_error() -> None:
    c = _circuit()
    with pytest.raises(ValueError, match="std_min in"):
        GaussianTreeCircuit(PARENT, OWNER, 2, 4, std_min=0.0)
    with pytest.raises(ValueError, match="NaN or inf"):
        c.log_prob(torch.full((1, 6), float("nan"), dtype=torch.float64))
