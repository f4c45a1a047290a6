"""Per-leaf log-likelihood kernels of :class:`vq2pc.circuit.MixtureCircuit`.

A kernel turns a leaf with parameters for ``N`` components over ``S``
variables into the matrix of component log-likelihoods

    ``ℓ[b, n] = Σ_i m[b, i] · log p(x[b, i] | θ_n)``        ``[B, N]``

for a batch ``x [B, S]`` and an optional mask ``m [B, S]`` (True = observed),
at matrix-multiply speed and for any slice ``n0:n1`` of the components.

* **Gaussian**: ``log N(x; μ, σ) = a·x'² + b·x' + c`` with ``x' = x - t`` for a
  per-pixel shift ``t``, ``a = -1/(2σ²)``, ``b = μ'/σ²``, ``c = -μ'²/(2σ²) - log σ
  - ½ log 2π`` and ``μ' = μ - t``. Unmasked: ``[x'², x'] @ [a; b] + Σ_i c`` (a
  ``[B, 2S] × [2S, N]`` product); masked: ``[m·x'², m·x', m] @ [a; b; c]``
  (``[B, 3S] × [3S, N]``).
  *Cancellation.* When σ is tiny (the 1e-3 floor) the three terms are huge and
  cancel: ``x ≈ μ = 0.5`` gives ``|a·x²| ≈ 1.25e5`` per pixel for a result of ≈ 6,
  which float32 cannot resolve (errors of tens of nats over 784 pixels). Two
  measures keep the result at float32 round-off of the *result*:
  (1) a per-pixel shift ``t_i`` within ``SAFE_RATIO`` stds of every component
  mean (see ``_shift``), so the terms are of size ``(x - t)²/σ²`` instead of
  ``x²/σ²``; (2) pixels where no such shift exists ("wide" pixels, where
  cancellation could still be large) go into a second, float64 product. The
  float32 terms are then bounded by ``SAFE_RATIO²/2`` per pixel whenever the
  data is near a component (the only case with cancellation); far from every
  component the result is itself as large as its terms. All coefficients are
  computed in float64 before they are cast.
* **Bernoulli**: ``x·log σ(l) + (1-x)·log σ(-l)``: ``[m·x, m·(1-x)] @
  [log σ(l); log σ(-l)]``, one ``[B, 2S] × [2S, N]`` product; every term is ≤ 0,
  so there is no cancellation.
* **Categorical** (``L`` levels): a one-hot product would be ``[B, S·L] × [S·L,
  N]`` (200k wide for MNIST). Instead the log-probability table is stored once
  as ``[S·L, N]`` (component-minor) and ``ℓ[b] = Σ_i table[i·L + x[b, i]]`` is an
  ``embedding_bag`` sum of ``S`` rows (exact; unobserved entries are dropped
  from the bags, so masking also saves work). Row sums cannot be sliced over
  ``N`` without a copy, so this kernel always covers all components and the
  circuit chunks over ``B`` only.
* **Discretized** (``P(v) = F((v+1)/L) − F(v/L)``, :mod:`vq2pc.core.discretized`): the categorical
  gather-sum, but the table is built from the two parameters for ``PIXEL_BLOCK`` pixels and the
  requested components at a time (``[P·L, n1-n0]``, one reused buffer) and overwritten after its
  gather, so no ``[S·L, N]`` table ever exists (13 GB at N = 16384 on MNIST). Each call builds its components' tables once
  (cost ``S·L·n``, against ``B·S·n`` for the gather), so the circuit gives this kernel as many rows per
  call as its memory budget allows (:meth:`Kernel.column_bytes`).
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from vq2pc.circuit.streaming import Scratch
from vq2pc.core.head_leaf import HeadCategorical
from vq2pc.core.leaves import Bernoulli, Categorical, Discretized, Gaussian, Leaf

__all__ = [
    "Kernel",
    "GaussianKernel",
    "BernoulliKernel",
    "GatherKernel",
    "CategoricalKernel",
    "make_kernel",
    "SAFE_RATIO",
    "categorical_table",
    "categorical_view",
    "normalized_categorical",
]

SAFE_RATIO = 5.0
"""Pixels where no shift ``t`` has every ``|μ - t| ≤ SAFE_RATIO·σ`` are evaluated in float64."""

_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


class Kernel:
    """Computes ``ℓ [B, Nc]`` for a slice of components (see module docstring)."""

    slices_components: ClassVar[bool] = True
    """False when the kernel always returns all ``N`` columns (then ``n0:n1`` must be ``0:N``)."""

    def cell_bytes(self) -> int:
        """Peak temporary bytes per output cell ``(b, n)``."""
        return 16

    def row_bytes(self) -> int:
        """Peak temporary bytes per batch row (features)."""
        raise NotImplementedError

    def column_bytes(self) -> int:
        """Peak temporary bytes per component of one call, whatever its rows (0: none; else the circuit
        prefers few calls with many rows, since each call pays them again)."""
        return 0

    def fill_value(self) -> Tensor:
        """``[S]`` values put into unobserved entries of ``x`` (any value in the support)."""
        raise NotImplementedError

    def loglik(
        self,
        x: Tensor,
        mask: Tensor | None,
        n0: int,
        n1: int,
        bias: Tensor | None = None,
        scratch: Scratch | None = None,
    ) -> Tensor:
        """``[B, n1-n0]`` log p(x_observed | component n) (+ ``bias [n1-n0]``, fused into the product).

        ``x [B, S]`` must be valid on observed entries. The result is a view of
        ``scratch``'s ``"scores"`` buffer (valid until the next call with the same scratch)."""
        return self._loglik(x, mask, n0, n1, bias, scratch or Scratch())

    def _loglik(
        self, x: Tensor, mask: Tensor | None, n0: int, n1: int, bias: Tensor | None, scratch: Scratch
    ) -> Tensor:
        """:meth:`loglik` into a given scratch: each kernel's own."""
        raise NotImplementedError


def _product(bias: Tensor | None, feats: Tensor, w: Tensor, scratch: Scratch, name: str = "scores") -> Tensor:
    """``bias + feats @ w.T`` into the ``name`` buffer: ``feats [B, D]``, ``w [Nc, D]``, ``bias [Nc]``."""
    out = scratch.take(name, (feats.shape[0], w.shape[0]), feats.dtype, feats.device)
    if bias is None:
        return torch.mm(feats, w.T, out=out)
    return torch.addmm(bias, feats, w.T, out=out)


class GaussianKernel(Kernel):
    """Shifted quadratic-form kernel with a float64 part for wide pixels."""

    def __init__(self, leaf: Gaussian, log_weights: Tensor) -> None:
        mu, sd = leaf.loc.double(), leaf.scale.double()
        w = log_weights.double().exp()
        self.dtype = leaf.loc.dtype
        shift, wide = _shift(mu, sd, w)
        mu_c = mu - shift
        a = -0.5 / (sd * sd)
        b = mu_c / (sd * sd)
        c = a * mu_c * mu_c - torch.log(sd) - _HALF_LOG_2PI
        self.shift = shift.to(self.dtype)
        self.narrow_idx = (~wide).nonzero().squeeze(1)
        self.wide_idx = wide.nonzero().squeeze(1)
        # Σ_i c over each part, [N]: added when nothing is masked (float64 for the wide part).
        self.const32 = c[:, ~wide].sum(1).to(self.dtype)
        self.const64 = c[:, wide].sum(1)
        self.s_narrow, self.s_wide = int(self.narrow_idx.numel()), int(self.wide_idx.numel())
        # Coefficient matrices [N, 3·S_part] = [a | b | c], component-major so that row slices are contiguous.
        self.w32 = torch.cat([t[:, ~wide] for t in (a, b, c)], 1).to(self.dtype).contiguous()
        self.w64 = torch.cat([t[:, wide] for t in (a, b, c)], 1).contiguous()

    def row_bytes(self) -> int:
        return 4 * 4 * self.s_narrow + 8 * 4 * self.s_wide

    def cell_bytes(self) -> int:
        return 16 + (16 if self.s_wide else 0)

    def fill_value(self) -> Tensor:
        return self.shift

    @staticmethod
    def _features(xc: Tensor, m: Tensor | None, out: Tensor) -> Tensor:
        """``[x², x]`` or ``[m·x², m·x, m]`` along the last axis, written into ``out``."""
        s = xc.shape[1]
        if m is None:
            torch.mul(xc, xc, out=out[:, :s])
            out[:, s:].copy_(xc)
        else:
            torch.mul(xc, m, out=out[:, s : 2 * s])
            torch.mul(out[:, s : 2 * s], xc, out=out[:, :s])
            out[:, 2 * s :].copy_(m)
        return out

    def _part(
        self,
        xc: Tensor,
        m: Tensor | None,
        w: Tensor,
        n0: int,
        n1: int,
        bias: Tensor,
        scratch: Scratch,
        name: str = "scores",
    ) -> Tensor:
        """One product (float32 or float64, the dtype of ``xc``) into that dtype's scratch buffers (the result
        in ``name``: the wide part's must not be the narrow part's when both are float64)."""
        width = (2 if m is None else 3) * xc.shape[1]
        feats = self._features(xc, m, scratch.take("feats", (xc.shape[0], width), xc.dtype, xc.device))
        return _product(bias, feats, w[n0:n1, :width], scratch, name)

    def _loglik(
        self, x: Tensor, mask: Tensor | None, n0: int, n1: int, bias: Tensor | None, scratch: Scratch
    ) -> Tensor:
        xc = x - self.shift
        m = None if mask is None else mask.to(x.dtype)
        b32 = self.const32[n0:n1] if mask is None else torch.zeros_like(self.const32[n0:n1])
        if bias is not None:
            b32 = b32 + bias
        if self.s_wide == 0:
            return self._part(xc, m, self.w32, n0, n1, b32, scratch)
        xw, mw = _columns(xc.double(), None if m is None else m.double(), self.wide_idx, self.s_narrow == 0)
        b64 = self.const64[n0:n1] if mask is None else torch.zeros_like(self.const64[n0:n1])
        wide = self._part(xw, mw, self.w64, n0, n1, b64, scratch, "scores_wide")
        narrow = self._part(*_columns(xc, m, self.narrow_idx, False), self.w32, n0, n1, b32, scratch)
        return narrow.copy_(wide.add_(narrow))  # the parts may cancel: add in float64


def _shift(mu: Tensor, sd: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
    """Per-pixel shift ``t [S]`` and wide-pixel flags ``[S]`` for means/stds ``[N, S]`` and weights ``w [N]``.

    Every mean lies within ``R = SAFE_RATIO`` of its std from ``t`` iff ``t`` lies in
    ``[max_n(μ_n − R σ_n), min_n(μ_n + R σ_n)]``; a pixel where that interval is empty is wide.
    ``t`` is the precision-weighted mean ``Σ w μ/σ² / Σ w/σ²`` clamped into the interval: the
    sharp components, whose terms cancel most, sit closest to it. Measured against the shift
    "weighted mean of the means, wide if some mean is more than 8 stds from it": on a distilled
    MNIST circuit (DMRS N=4096) wide pixels fell from 325 of 784 to 0 and log p of 5000 test
    images took 0.42 s instead of 1.40 s (max error 8e-4 nats on log p of 1200–2800); on 12 random
    circuits with stds in [1e-3, 1] the worst relative error fell from 1.0e-4 to 4.9e-5.
    """
    prec = w[:, None] / (sd * sd)
    centre = (prec * mu).sum(0) / prec.sum(0).clamp_min(torch.finfo(prec.dtype).tiny)
    lo, hi = (mu - SAFE_RATIO * sd).amax(0), (mu + SAFE_RATIO * sd).amin(0)
    wide = lo > hi
    return torch.where(wide, centre, torch.minimum(torch.maximum(centre, lo), hi)), wide


def _columns(x: Tensor, m: Tensor | None, idx: Tensor, take_all: bool) -> tuple[Tensor, Tensor | None]:
    """``x[:, idx]`` and ``m[:, idx]`` (no copy when ``idx`` is every column)."""
    if take_all:
        return x, m
    return x[:, idx], None if m is None else m[:, idx]


class BernoulliKernel(Kernel):
    """``[m·x, m·(1-x)] @ [log σ(l); log σ(-l)]``: sums of non-positive terms."""

    def __init__(self, leaf: Bernoulli) -> None:
        logits = leaf.logits.double()
        self.dtype = leaf.logits.dtype
        self.w = torch.cat([F.logsigmoid(logits), F.logsigmoid(-logits)], 1).to(self.dtype).contiguous()
        self.s = int(logits.shape[1])

    def row_bytes(self) -> int:
        return 4 * 4 * self.s

    def fill_value(self) -> Tensor:
        return torch.zeros(self.s, dtype=self.dtype, device=self.w.device)

    def _loglik(
        self, x: Tensor, mask: Tensor | None, n0: int, n1: int, bias: Tensor | None, scratch: Scratch
    ) -> Tensor:
        feats = scratch.take("feats", (x.shape[0], 2 * self.s), x.dtype, x.device)
        torch.sub(1.0, x, out=feats[:, self.s :])
        feats[:, : self.s].copy_(x)
        if mask is not None:
            feats.view(-1, 2, self.s).mul_(mask.to(x.dtype)[:, None])
        return _product(bias, feats, self.w[n0:n1], scratch)


class GatherKernel(Kernel):
    """``embedding_bag`` sums over ``[P·L, n]`` blocks of a log-probability table, ``PIXEL_BLOCK`` pixels at a
    time (the categorical and discretized kernels; see module docstring)."""

    # Tiles of the gather-sum: PIXEL_BLOCK pixels' table slices (PIXEL_BLOCK·L·N floats: 16 MiB at
    # L=256, N=1024, within the L3 cache) against row blocks whose [rows, N] partial sum is TILE_BYTES
    # (under glibc's 32 MiB mmap threshold, so the per-call output is recycled, not page-faulted in).
    # Measured on 2 CPU cores (S=784, L=256, N=1024, B=10000; median / min of 4, interleaved):
    # 16 × 16 MiB 0.62 / 0.43 s; 32 × 16 MiB 0.55 / 0.43 s; 8 × 8 MiB 0.69 / 0.57 s; any × 32 MiB
    # 0.88–2.0 s; one embedding_bag over all S pixels 1.1–1.3 s.
    PIXEL_BLOCK = 16
    TILE_BYTES = 16 << 20
    s: int
    levels: int

    def params(self) -> Tensor:
        """A tensor of the kernel's parameters: its dtype and device are the tables'."""
        raise NotImplementedError

    def row_bytes(self) -> int:
        return 8 * 3 * self.s

    def cell_bytes(self) -> int:
        return 12

    def fill_value(self) -> Tensor:
        return torch.zeros(self.s, dtype=self.params().dtype, device=self.params().device)

    def _tiling(self, x: Tensor, columns: int) -> tuple[Tensor, Tensor, int]:
        """``x``'s levels ``[B, S]`` (long), each block pixel's first table row ``[PIXEL_BLOCK]`` and the rows per
        tile for ``columns`` output columns."""
        offsets = torch.arange(self.PIXEL_BLOCK, device=x.device) * self.levels
        return x.long(), offsets, max(1, self.TILE_BYTES // (max(1, columns) * self.params().element_size()))


class CategoricalKernel(GatherKernel):
    """``embedding_bag`` sums over a ``[S·L, N]`` table (see module docstring)."""

    slices_components = False

    def __init__(self, table: Tensor, num_levels: int) -> None:
        self.table = table  # [S·L, N], contiguous
        self.levels = num_levels
        self.s = table.shape[0] // num_levels

    def params(self) -> Tensor:
        return self.table

    def _loglik(
        self, x: Tensor, mask: Tensor | None, n0: int, n1: int, bias: Tensor | None, scratch: Scratch
    ) -> Tensor:
        n = self.table.shape[1]
        if (n0, n1) != (0, n):
            raise ValueError("the categorical kernel evaluates all components at once")
        out = scratch.take("scores", (x.shape[0], n), self.table.dtype, x.device)
        idx, offsets, row_block = self._tiling(x, n)
        for r0 in range(0, x.shape[0], row_block):
            rows = slice(r0, r0 + row_block)
            acc = out[rows].zero_() if bias is None else out[rows].copy_(bias.expand_as(out[rows]))
            for p0 in range(0, self.s, self.PIXEL_BLOCK):
                p1 = min(self.s, p0 + self.PIXEL_BLOCK)
                table = self.table[p0 * self.levels : p1 * self.levels]
                acc += _bag_sum(
                    idx[rows, p0:p1] + offsets[: p1 - p0], table, None if mask is None else mask[rows, p0:p1]
                )
        return out


def _bag_sum(rows_idx: Tensor, table: Tensor, keep: Tensor | None) -> Tensor:
    """``[R, N]``: row ``r`` is ``Σ_j table[rows_idx[r, j]]`` over the ``j`` with ``keep[r, j]`` (all if None).

    Unobserved entries are left out of the bags rather than weighted by 0: on MNIST test
    images with half the pixels observed, 0.43 s instead of 0.51 s (N=1024, B=10000, 2 cores).
    An empty bag sums to 0 (``log 1``)."""
    if keep is None:
        return F.embedding_bag(rows_idx, table, mode="sum")
    starts = torch.zeros(keep.shape[0], dtype=torch.long, device=keep.device)
    torch.cumsum(keep.sum(1)[:-1], 0, out=starts[1:])
    return F.embedding_bag(rows_idx[keep], table, starts, mode="sum")


def categorical_table(logits: Tensor) -> Tensor:
    """The categorical table layout, defined here only: ``logits [N, S, L]`` -> ``[S·L, N]``,
    row ``i·L + l``, column ``n`` = ``log p(x_i = l | component n)`` (a view where strides allow)."""
    if logits.dim() != 3:
        raise ValueError(f"categorical logits must be [N, S, L], got {tuple(logits.shape)}")
    n, s, L = logits.shape
    return logits.permute(1, 2, 0).reshape(s * L, n)


def categorical_view(table: Tensor, num_levels: int) -> Categorical:
    """A :class:`Categorical` whose ``logits [N, S, L]`` is a view of ``table [S·L, N]``.

    Bypasses ``Categorical.__init__`` (which would copy through ``log_softmax``): the
    table already holds normalized log-probabilities and the circuit keeps one copy.
    """
    s_l, n = table.shape
    leaf = Categorical.__new__(Categorical)
    leaf.logits = table.T.reshape(n, s_l // num_levels, num_levels)
    return leaf


def normalized_categorical(logits: Tensor) -> Categorical:
    """A :class:`Categorical` over ALREADY normalized ``logits [N, S, L]`` (a stored circuit's), not
    renormalized, so a save/load round trip is bit-exact; its logits are a view of its table."""
    return categorical_view(categorical_table(logits), logits.shape[2])


def make_kernel(leaf: Leaf, log_weights: Tensor) -> tuple[Leaf, Kernel]:
    """The kernel for ``leaf`` (and the leaf the circuit keeps; categorical shares memory with its kernel)."""
    if isinstance(leaf, Gaussian):
        return leaf, GaussianKernel(leaf, log_weights)
    if isinstance(leaf, Bernoulli):
        return leaf, BernoulliKernel(leaf)
    if isinstance(leaf, Categorical):
        table = categorical_table(leaf.logits).contiguous()
        return categorical_view(table, leaf.num_levels), CategoricalKernel(table, leaf.num_levels)
    if isinstance(leaf, Discretized):
        from vq2pc.circuit.kernels_discretized import DiscretizedKernel  # it builds on this module's kernels

        return leaf, DiscretizedKernel(leaf)
    if isinstance(leaf, HeadCategorical):
        from vq2pc.circuit.kernels_head import HeadKernel  # it builds on this module's kernels

        return leaf, HeadKernel(leaf)
    raise ValueError(
        f"unsupported leaf type {type(leaf).__name__}; expected Gaussian, Categorical, Bernoulli or a discretized leaf"
    )
