"""The Gaussian-leaf parts of fitting a :class:`~vq2pc.circuit.tree.GaussianTreeCircuit` (used by
:mod:`vq2pc.circuit.tree_fit`, which keeps the tree's root and edge tables the same way for both leaves).

The leaves' sufficient statistics per (variable ``i``, state ``k``) are ``[S, 3, K]``: ``Σ q``, ``Σ q x``,
``Σ q x²``. From complete data (codes and integer levels) they are exact expectations under the uniform
dequantization ``x = (v + u) / L``: ``E[x] = (v + ½) / L``, ``E[x²] = E[x]² + 1 / (12 L²)`` — no noise
drawn. In EM the posterior ``q`` of the owner's state is the gradient of ``log p(x)`` with respect to the
per-variable Gaussian terms, on one dequantization draw of the training images per iteration. The M-step adds
pseudo-observations distributed like the pixel's marginal (the categorical leaves' Dirichlet prior
:class:`~vq2pc.circuit.tree_fit.Smoothing` read as ``Σ_l α_{i,l}`` observations at the bin centres),
then takes moments, with ``σ ≥ std_min``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vq2pc.circuit.tree_gaussian import GaussianTreeCircuit
from vq2pc.circuit.tree_io import TreeParams
from vq2pc.core.random import step_seed
from vq2pc.data.datasets import to_model_space

__all__ = ["complete_stats", "gaussian_leaves", "expected_stats", "dequantized"]


def _moments(v: Tensor, levels: int) -> Tensor:
    """``[..., 3]``: ``(1, E[x], E[x²])`` of ``x = (v + u) / L``, ``u ~ U[0, 1)``, for levels ``v``."""
    mean = (v.double() + 0.5) / levels
    return torch.stack((torch.ones_like(mean), mean, mean * mean + 1.0 / (12 * levels * levels)), -1)


def complete_stats(circuit: GaussianTreeCircuit, codes: Tensor, v: Tensor, chunk: int = 2048) -> Tensor:
    """Leaf statistics ``[S, 3, K]`` (float64) of complete data: ``codes [n, M]`` (long) and levels
    ``v [n, S]`` (long), exact in expectation over the dequantization."""
    s, K = v.shape[1], circuit.K
    owner = circuit.owner.cpu()
    stats = torch.zeros(s * K, 3, dtype=torch.float64)
    for i in range(0, v.shape[0], chunk):
        idx = (torch.arange(s) * K + codes[i : i + chunk, owner]).reshape(-1)
        stats.index_add_(0, idx, _moments(v[i : i + chunk], circuit.levels).reshape(-1, 3))
    return stats.view(s, K, 3).permute(0, 2, 1).contiguous()


def gaussian_leaves(stats: Tensor, prior: Tensor, levels: int, std_min: float) -> Tensor:
    """``(μ, log σ)`` ``[S, 2, K]`` (float32) from statistics ``[S, 3, K]`` plus pseudo-counts ``prior [S, L]``
    placed at the level bins (their exact dequantized moments), ``σ`` floored at ``std_min``."""
    pseudo = prior.double() @ _moments(torch.arange(levels), levels).to(prior.device)  # [S, 3]
    total = stats.double() + pseudo[:, :, None]
    mean = total[:, 1] / total[:, 0]
    var = (total[:, 2] / total[:, 0] - mean * mean).clamp_min(std_min * std_min)
    return torch.stack((mean, 0.5 * var.log()), 1).float()


def expected_stats(circuit: GaussianTreeCircuit, x: Tensor, params: TreeParams) -> tuple[TreeParams, Tensor]:
    """E-step on one batch ``x [B, S]`` (dequantized): gradients of ``Σ log p(x)`` with respect to
    ``params`` (``root``, ``edges`` with ``requires_grad``) as the counts, the leaf statistics ``[S, 3, K]``
    (float64) in ``leaves``, and ``Σ log p(x)`` (a 0-d tensor). ``q``, the gradient with respect to the Gaussian
    terms, is each pixel's posterior over its state times (with a floor) the Gaussian's share of the leaf."""
    g = circuit.gaussian_log_terms(x, params.leaves.detach()).requires_grad_()
    loglik = circuit.upward(circuit.patch_sums(circuit.floored(g, x), None), params)[0].sum()
    g_root, g_edges, q = torch.autograd.grad(loglik, (params.root, params.edges, g))  # q [B, S, K]
    stats = torch.stack((q.sum(0), torch.einsum("bsk,bs->sk", q, x), torch.einsum("bsk,bs->sk", q, x * x)), 1)
    return TreeParams(g_root, g_edges, stats.double()), loglik.detach()


def dequantized(v: Tensor, levels: int, seed: int, draw: int) -> Tensor:
    """``(v + u) / L`` for levels ``v`` (any shape; :func:`~vq2pc.data.datasets.to_model_space`), ``u`` from
    draw ``draw`` of ``seed`` (reproducible)."""
    return to_model_space(v, "gaussian", levels, torch.Generator().manual_seed(step_seed(seed, draw)))
