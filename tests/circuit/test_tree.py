"""TreeCircuit: exact queries against brute-force enumeration over every image and every latent grid."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch
from helpers import tree_latent_grids

from vq2pc.circuit.tree import TreeCircuit
from vq2pc.core.checkpoint import CheckpointError

PARENT = torch.tensor([1, -1, 1, 2])  # a 4-node tree of depth 2 rooted at node 1


def _circuit(owner: torch.Tensor, K: int = 3, L: int = 3, seed: int = 0, parent: torch.Tensor = PARENT) -> TreeCircuit:
    torch.manual_seed(seed)
    c = TreeCircuit(parent, owner, K, L).double()
    with torch.no_grad():
        for p in c.parameters():
            p.normal_(0, 1.5)
    return c


def _all_images(S: int, L: int) -> torch.Tensor:
    return torch.tensor(list(itertools.product(range(L), repeat=S)), dtype=torch.float64)


def _brute_joint(c: TreeCircuit, x: torch.Tensor) -> torch.Tensor:
    """log p(x, z) ``[B, K^M]`` for every latent grid z, by enumeration."""
    zs, lp = tree_latent_grids(c)  # [G, M], [G]
    leaves = c.log_params().leaves.detach()
    leaf = leaves[torch.arange(c.num_variables), x.long()[:, None, :], zs[:, c.owner][None]]  # [B, G, S]
    return lp + leaf.sum(-1)


def test_a_wider_deeper_tree_equals_enumeration() -> None:
    parent = torch.tensor([1, -1, 1, 2, 0, 4])  # levels [1], [0, 2], [4, 3], [5]: parents in both slots
    c = _circuit(torch.tensor([0, 1, 2, 3, 4, 5, 5]), K=2, L=2, seed=2, parent=parent)
    x = _all_images(7, 2)
    assert torch.allclose(c.log_prob(x), torch.logsumexp(_brute_joint(c, x), 1), atol=1e-10)
    assert abs(float(torch.logsumexp(c.log_prob(x), 0))) < 1e-12


def test_normalized_over_every_image() -> None:
    c = _circuit(torch.arange(4))  # 2x2 grid, 1-pixel patches, K = L = 3
    total = torch.logsumexp(c.log_prob(_all_images(4, 3)), 0)
    assert abs(float(total)) < 1e-12


def test_log_prob_and_marginal_equal_enumeration_over_latents_and_images() -> None:
    owner = torch.tensor([0, 0, 1, 2, 2, 3])  # patches of 2, 1, 2 and 1 variables
    c = _circuit(owner, K=2, L=3, seed=1)
    x = _all_images(6, 3)[::7]
    assert torch.allclose(c.log_prob(x), torch.logsumexp(_brute_joint(c, x), 1), atol=1e-10)
    mask = torch.tensor([True, False, True, True, False, False])
    completions = x[:, None, :].repeat(1, 27, 1)  # every value of the 3 hidden variables
    completions[:, :, ~mask] = _all_images(3, 3)[None]
    brute = torch.logsumexp(c.log_prob(completions.reshape(-1, 6)).view(-1, 27), 1)
    x_hidden_garbage = x.clone()
    x_hidden_garbage[:, ~mask] = float("nan")
    assert torch.allclose(c.log_prob(x_hidden_garbage, mask), brute, atol=1e-10)


def test_posterior_and_conditional_mean_equal_enumeration() -> None:
    owner = torch.tensor([0, 1, 1, 2, 3, 3])
    c = _circuit(owner, K=2, L=3, seed=2)
    mask = torch.tensor([True, True, False, True, False, True])
    x = _all_images(6, 3)[::40]
    joint = _brute_joint(c, x.where(mask, torch.zeros_like(x)))  # [B, G]; hidden variables summed out below
    zs = torch.tensor(list(itertools.product(range(2), repeat=4)))
    hidden_terms = torch.zeros(joint.shape)  # Σ over hidden values of their leaves is 1: remove their terms
    lp = [t.detach() for t in c.log_params()]
    for i in (~mask).nonzero().flatten().tolist():
        hidden_terms += lp[2][i, 0, zs[:, c.owner[i]]]
    post_z = (joint - hidden_terms).softmax(1)  # p(z | x_obs) [B, G]
    for j in range(4):
        brute = torch.stack([post_z[:, zs[:, j] == k].sum(1) for k in range(2)], 1)
        assert torch.allclose(c.posterior(x, mask)[:, j], brute, atol=1e-10)
    means = (lp[2].exp() * torch.arange(3.0)[None, :, None]).sum(1)  # [S, K]
    brute_mean = post_z @ means[torch.arange(6), zs[:, c.owner]]  # [B, S]
    assert torch.allclose(c.conditional_mean(x, mask), brute_mean.where(~mask, x), atol=1e-10)


def test_samples_follow_the_model_unconditionally_and_given_observed_pixels() -> None:
    c = _circuit(torch.tensor([0, 1, 2, 3]), K=2, L=2, seed=3)
    g = torch.Generator().manual_seed(0)
    s = c.sample(20000, generator=g)
    codes = (s * torch.tensor([8.0, 4, 2, 1])).sum(1).long()
    freq = torch.bincount(codes, minlength=16).double() / len(s)
    assert (freq - c.log_prob(_all_images(4, 2)).exp()).abs().sum() < 0.04  # total variation · 2
    x = torch.tensor([[1.0, 0, 0, 0]]).repeat(20000, 1)
    mask = torch.tensor([True, False, True, False])
    cond = c.sample(x=x, mask=mask, generator=g)
    assert (cond[:, mask] == x[:, mask]).all()
    freq = torch.bincount((cond[:, 1] * 2 + cond[:, 3]).long(), minlength=4).double() / len(x)
    full = _all_images(4, 2)[(_all_images(4, 2)[:, mask] == x[0, mask]).all(1)]  # the 4 completions
    assert (freq - (c.log_prob(full) - c.log_prob(x[:1], mask)).exp()).abs().sum() < 0.04


def test_save_load_round_trip(tmp_path: Path) -> None:
    c = _circuit(torch.tensor([0, 0, 1, 2, 3]), K=3, L=4).float()
    c.meta = {"image_shape": [1, 1, 5]}
    path = c.save(tmp_path / "tree.safetensors")
    back = TreeCircuit.load(path)
    x = torch.randint(0, 4, (9, 5)).float()
    assert torch.allclose(back.log_prob(x), c.log_prob(x), atol=1e-6)
    assert back.meta == c.meta and back.tree.parent.tolist() == PARENT.tolist()
    (tmp_path / "bad.safetensors").write_bytes(b"not a circuit")
    with pytest.raises(CheckpointError, match="not a readable"):
        TreeCircuit.load(tmp_path / "bad.safetensors")


def test_bad_input_gets_one_clear_error() -> None:
    c = _circuit(torch.arange(4), K=2, L=3)
    with pytest.raises(ValueError, match="integer levels"):
        c.log_prob(torch.tensor([[0.0, 1, 2, 3]]))
    with pytest.raises(ValueError, match="shape"):
        c.log_prob(torch.zeros(2, 5))
    with pytest.raises(ValueError, match="tree"):
        TreeCircuit(torch.tensor([1, 0, -1]), torch.arange(3), 2, 3)
    with pytest.raises(ValueError, match="owner"):
        TreeCircuit(PARENT, torch.tensor([0, 4]), 2, 3)
    assert c.num_params == (2 - 1) + 3 * 2 * 1 + 4 * 2 * (3 - 1)
    assert math.isfinite(float(c.log_prob(torch.zeros(1, 4))))
