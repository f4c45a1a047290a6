"""Differentiable functions of a leaf's parameters used in training: the smooth std cap of fine-tuning and
the component log-likelihood matrix ``[B, M]`` with gradients (fine-tuning, the continuous mixture)."""

from __future__ import annotations

import torch
from torch import Tensor

from vq2pc.core import discretized as disc
from vq2pc.core.leaves import LOG_2PI, Categorical, Discretized, Gaussian, Leaf

__all__ = ["cap_std", "component_log_likelihoods"]


def cap_std(leaf: Leaf, std_max: float | None) -> Leaf:
    """``leaf`` with every Gaussian std ``σ`` replaced by ``σ·c / (σ + c)`` for ``c = std_max``: a smooth cap
    that stays below ``c``, leaves ``σ ≪ c`` nearly unchanged (``c/2`` at ``σ = c``) and keeps a gradient
    everywhere. Differentiable; the leaf itself when ``std_max`` is None."""
    if std_max is None:
        return leaf
    if not isinstance(leaf, Gaussian):
        raise ValueError(f"std_max applies to Gaussian leaves only, not {leaf.kind} ones")
    return Gaussian(leaf.loc, leaf.scale * std_max / (leaf.scale + std_max))


def component_log_likelihoods(leaf: Leaf, x: Tensor) -> Tensor:
    """``log p(x_b | θ_m)`` summed over the S variables: leaf batch ``[M, S]``, ``x [B, S]`` -> ``[B, M]``.

    Differentiable in the leaf parameters. Gaussian leaves use the quadratic form as one matrix
    product in float64 (stds near 1e-3 make the float32 terms cancel badly). Categorical leaves index
    their ``[M, S·L]`` log-probabilities, so the backward pass scatters into ``[M, S·L]``; a broadcast
    gather would scatter into ``[B, M, S, L]`` (13 GB at B = M = 128 on MNIST). Discretized leaves go
    through :func:`vq2pc.core.discretized.component_sums`. Others broadcast."""
    if isinstance(leaf, Categorical):
        M, S, L = leaf.logits.shape
        flat = (x.long() + torch.arange(S, device=x.device) * L).reshape(-1)  # [B·S] positions in S·L
        return leaf.logits.reshape(M, S * L)[:, flat].reshape(M, x.shape[0], S).sum(-1).t()
    if isinstance(leaf, Gaussian):
        prec = leaf.scale.double().pow(-2)  # [M, S]
        mu = leaf.loc.double()
        xd = x.double()
        const = (-0.5 * mu.pow(2) * prec - leaf.scale.double().log()).sum(1) - 0.5 * LOG_2PI * x.shape[1]
        quad = torch.cat([xd.pow(2), xd], 1) @ torch.cat([-0.5 * prec, mu * prec], 1).t()  # [B, M]
        return (quad + const).to(leaf.loc.dtype)
    if isinstance(leaf, Discretized):  # blocks of components, recomputed in the backward pass
        return disc.component_sums(x, leaf.loc, leaf.scale, leaf.levels, leaf.cdf)
    return leaf.log_prob(x.unsqueeze(1)).sum(-1)
