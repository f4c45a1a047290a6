"""Discretized location-scale distributions: an exact ``L``-level distribution from two numbers.

A pixel level ``v ∈ {0..L-1}`` is the bin ``[v/L, (v+1)/L)`` of the data space ``[0, 1]`` (the bins of
uniform dequantization, ``x = (v + u)/L``), with the first bin open to ``−∞`` and the last to ``+∞``
(as PixelCNN++ does), so that for a continuous ``F`` with location ``μ`` and scale ``s``

    ``P(v) = F((v+1)/L) − F(v/L)``,    ``F(−∞) = 0``, ``F(+∞) = 1``

sums to 1 over the ``L`` levels exactly. ``F`` is a standard normal CDF (``"gaussian"``) or the logistic
sigmoid (``"logistic"``) of ``z = (edge − μ)/s``; both are symmetric, ``F(−z) = 1 − F(z)``.

Stable evaluation (every quantity in log space): ``t(z) = log F(−|z|)`` is the log of the mass beyond
an edge on its own side (``log_ndtr`` / ``logsigmoid``, accurate in far tails). A bin on one side of
``μ`` has mass ``e^{t_near} − e^{t_far}``, so ``log P = t_near + log(1 − e^{−|t_a − t_b|})``; the bin that
holds ``μ`` has mass ``1 − e^{t_a} − e^{t_b}``. Where the subtraction would cancel (a bin narrow
against the scale: ``|t_a − t_b|`` below ``ε^{1/3}``, ``ε`` the dtype's round-off), the midpoint rule
``log f(z_mid) + log(bin width / s)`` takes over; its relative error there is below ``ε^{2/3}``.
Gradients are finite everywhere (open edges enter as constants, not as infinite ``z``).

Functions work elementwise (:func:`level_log_prob`, any broadcastable shapes) or on a block of a
circuit's table (:func:`table_block`: ``[P·L, n]`` for ``P`` pixels and ``n`` components).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

__all__ = [
    "CDFS",
    "component_sums",
    "level_log_prob",
    "log_density",
    "log_tail",
    "quantile",
    "survival_sum",
    "table_block",
]

CDFS = ("gaussian", "logistic")
"""The location-scale families ``F`` of a discretized leaf."""

_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def _check_cdf(cdf: str) -> None:
    if cdf not in CDFS:
        raise ValueError(f"unknown cdf {cdf!r}; expected one of {list(CDFS)}")


Z_MAX = 1e6
"""``|z|`` is capped here in the tail function (a log-mass below ``−5·10¹¹``, zero in any float): beyond it
torch's ``log_ndtr`` has infinite gradients."""


_SWITCH = 8.0
"""float32 Gaussian tails: ``erfc`` below this ``|z|``, the asymptotic series above (both to float32 round-off)."""


def log_tail(z: Tensor, cdf: str) -> Tensor:
    """``log F(−min(|z|, Z_MAX))``: the log mass beyond ``z`` on the far side of the centre (``≤ log ½``)."""
    a = z.abs().clamp_max(Z_MAX)
    if cdf == "logistic":
        return F.logsigmoid(-a)
    return _log_normal_tail32(a) if a.dtype == torch.float32 else torch.special.log_ndtr(-a)


def _log_normal_tail32(a: Tensor) -> Tensor:
    """``log Φ(−a)`` for float32 ``a ≥ 0``, about twice as fast as torch's ``log_ndtr`` (its ``erfcx`` dominates
    the table's cost): ``log(erfc(a/√2)/2)`` below ``_SWITCH`` (``erfc ≥ 1e-15``, no underflow), above it
    ``−a²/2 − log a − ½ log 2π + log(1 − a⁻² + 3a⁻⁴ − 15a⁻⁶ + 105a⁻⁸)`` (next term 945/a¹⁰ < 1e-6).
    Relative error within 2e-7 of float64 ``log_ndtr``; both branches see clamped inputs (finite gradients)."""
    near = torch.special.erfc(a.clamp_max(_SWITCH) * (1.0 / math.sqrt(2.0))).mul_(0.5).log_()
    b = a.clamp_min(_SWITCH)
    r = b.reciprocal().square()
    far = torch.log1p(r * (-1.0 + r * (3.0 + r * (-15.0 + r * 105.0)))) - b.log() - 0.5 * b.square() - _HALF_LOG_2PI
    return torch.where(a < _SWITCH, near, far)


def log_density(z: Tensor, cdf: str) -> Tensor:
    """``log f(z)`` of the standard density (no ``−log s``)."""
    if cdf == "gaussian":
        return -0.5 * z * z - _HALF_LOG_2PI
    return F.logsigmoid(z) + F.logsigmoid(-z)


def _bins(
    t_lo: Tensor,
    t_hi: Tensor,
    centre: Tensor,
    z_mid: Tensor,
    log_width: Tensor,
    cdf: str,
) -> Tensor:
    """``log P`` of bins from the tails at their edges (``t_lo``, ``t_hi``; ``−inf`` for an open edge), the
    flags of the bin that holds ``μ`` (``centre``), the midpoint ``z_mid`` and ``log`` of the width in ``z``."""
    thr = torch.finfo(t_lo.dtype).eps ** (1.0 / 3.0)
    gap = (t_lo - t_hi).abs()  # inf for an open edge
    near = torch.maximum(t_lo, t_hi)
    cancel = gap < thr
    side = near + torch.log(-torch.expm1(-torch.where(cancel, torch.ones_like(gap), gap)))
    both = t_lo.exp() + t_hi.exp()  # the centre bin: P = 1 - e^{t_lo} - e^{t_hi}
    cancel_c = both > 1.0 - thr
    mid = torch.log1p(-torch.where(cancel_c, torch.full_like(both, 0.5), both))
    approx = log_density(z_mid, cdf) + log_width
    return torch.where(centre, torch.where(cancel_c, approx, mid), torch.where(cancel, approx, side))


def level_log_prob(v: Tensor, loc: Tensor, scale: Tensor, levels: int, cdf: str) -> Tensor:
    """``log P(v)`` elementwise for integer levels ``v`` (floats), broadcast against ``loc``/``scale``.

    Differentiable in ``loc`` and ``scale``; the result has the broadcast shape and ``loc``'s dtype."""
    _check_cdf(cdf)
    v = v.to(loc.dtype)
    inv = scale.reciprocal()
    z_lo = (v / levels - loc) * inv
    z_hi = ((v + 1.0) / levels - loc) * inv
    first, last = v <= 0, v >= levels - 1
    neg_inf = torch.tensor(-math.inf, dtype=loc.dtype, device=loc.device)
    t_lo = torch.where(first, neg_inf, log_tail(torch.where(first, torch.zeros_like(z_lo), z_lo), cdf))
    t_hi = torch.where(last, neg_inf, log_tail(torch.where(last, torch.zeros_like(z_hi), z_hi), cdf))
    centre = (first | (z_lo <= 0)) & (last | (z_hi >= 0))
    z_mid = ((v + 0.5) / levels - loc) * inv
    return _bins(t_lo, t_hi, centre, z_mid, torch.log(inv / levels), cdf)


def component_sums(v: Tensor, loc: Tensor, scale: Tensor, levels: int, cdf: str, block: int = 1 << 22) -> Tensor:
    """``[B, M]`` ``Σ_i log P(v[b, i] | loc[m, i], scale[m, i])`` for ``v [B, S]`` and ``loc, scale [M, S]``.

    Differentiable. Computed in blocks of components of about ``block`` elements ``(b, m, i)``; with
    gradients each block is recomputed in the backward pass (``torch.utils.checkpoint``), so memory holds
    one block's temporaries instead of a dozen ``[B, M, S]`` tensors (4 GB at B = 128, M = 512, S = 784)."""
    step = max(1, block // max(1, v.shape[0] * v.shape[1]))

    def part(lo: Tensor, sc: Tensor) -> Tensor:
        return level_log_prob(v[:, None, :], lo[None], sc[None], levels, cdf).sum(-1)

    grad = torch.is_grad_enabled() and (loc.requires_grad or scale.requires_grad)
    parts = [
        checkpoint(part, loc[m : m + step], scale[m : m + step], use_reentrant=False)
        if grad
        else part(loc[m : m + step], scale[m : m + step])
        for m in range(0, loc.shape[0], step)
    ]
    return torch.cat(parts, 1)


def table_block(loc: Tensor, scale: Tensor, levels: int, cdf: str) -> Tensor:
    """``[P·L, n]`` log-probability table of ``P`` pixels and ``n`` components, row ``i·L + v`` (no gradients).

    ``loc``, ``scale``: ``[P, n]``. The ``L − 1`` inner edges are shared by neighbouring bins, so the tail
    function runs once per edge; every bin takes the one-sided formula, then the bin holding ``μ`` and
    the (rare) cancelling bins are recomputed where they are. Temporaries: about six ``[P, L, n]``."""
    _check_cdf(cdf)
    p, n = loc.shape
    thr = torch.finfo(loc.dtype).eps ** (1.0 / 3.0)
    inv = scale.reciprocal()[:, None, :]  # [P, 1, n]
    mu = loc[:, None, :]
    edges = torch.arange(1, levels, dtype=loc.dtype, device=loc.device) / levels  # [L-1]
    t = torch.full((p, levels + 1, n), -math.inf, dtype=loc.dtype, device=loc.device)
    t[:, 1:-1] = log_tail((edges[None, :, None] - mu).mul_(inv), cdf)  # [P, L-1, n]; edge − μ first: no cancellation
    lo, hi = t[:, :-1], t[:, 1:]
    out = torch.sub(lo, hi).abs_()  # [P, L, n] the gap |t_lo - t_hi|
    cancel = out < thr
    out.neg_().expm1_().neg_().log_().add_(torch.maximum(lo, hi))
    centre = (torch.ceil(loc * levels) - 1).clamp_(0, levels - 1).long()[:, None, :]  # [P, 1, n]: μ's bin
    both = t.gather(1, centre).exp_().add_(t.gather(1, centre + 1).exp_())
    z_mid = ((centre + 0.5).to(loc.dtype) / levels - mu) * inv
    approx = log_density(z_mid, cdf) + torch.log(inv / levels)
    out.scatter_(
        1,
        centre,
        torch.where(both > 1.0 - thr, approx, torch.log1p(-both.clamp_max(1.0 - thr))),
    )
    cancel.scatter_(1, centre, False)
    if bool(cancel.any()):  # bins narrow against the scale: the midpoint rule
        pi, vi, ni = cancel.nonzero(as_tuple=True)
        z = ((vi.to(loc.dtype) + 0.5) / levels - loc[pi, ni]) * inv[pi, 0, ni]
        out[pi, vi, ni] = log_density(z, cdf) + torch.log(inv[pi, 0, ni] / levels)
    return out.reshape(p * levels, n)


def survival_sum(loc: Tensor, scale: Tensor, levels: int, cdf: str, block: int = 1 << 14) -> Tensor:
    """``E[v] = Σ_{k=1}^{L-1} P(v ≥ k) = Σ_k (1 − F(k/L))`` elementwise (same shape as ``loc``), in blocks
    of ``block`` elements so the ``[·, L−1]`` temporary stays small."""
    _check_cdf(cdf)
    edges = torch.arange(1, levels, dtype=loc.dtype, device=loc.device) / levels
    flat_loc, flat_scale = loc.reshape(-1, 1), scale.reshape(-1, 1)
    parts = []
    for i in range(0, flat_loc.shape[0], block):
        z = (flat_loc[i : i + block] - edges) / flat_scale[i : i + block]  # [b, L-1], = -(edge - μ)/s
        parts.append((torch.special.ndtr(z) if cdf == "gaussian" else torch.sigmoid(z)).sum(1))
    return torch.cat(parts).reshape(loc.shape) if parts else loc.new_zeros(loc.shape)


def quantile(u: Tensor, cdf: str) -> Tensor:
    """``F^{-1}(u)`` of the standard distribution for ``u ∈ (0, 1)``."""
    _check_cdf(cdf)
    return torch.special.ndtri(u) if cdf == "gaussian" else torch.logit(u)
