"""The per-pixel conditionals ``p̂(x_i | x_<i)`` of a discrete circuit, as the codec computes them.

For ``p̂(x) = Σ_n w_n Π_i p(x_i | θ_n)`` the conditional of pixel ``i`` given the pixels before it is
``Σ_n π_n^{(i)} p(x_i | θ_n)`` with the posterior ``π^{(i)} ∝ w_n Π_{j<i} p(x_j | θ_n)``. Per pixel and per
block of images, with ``P_i [L, N]`` the pixel's probability table:

- **Two coded symbols per pixel.** The levels are split into ``B`` bins of ``W = ⌈√L⌉`` levels
  (:func:`level_bins`; L = 256: 16 × 16). The coder first codes the bin ``x_i // W`` with
  ``probs [R, B] = π @ (bin sums of P_i)ᵀ``, then ``x_i % W`` with ``π @ P_i[bin levels]ᵀ``, one
  ``[rows, N] × [N, W]`` product per bin that occurs in the block (typically 2–3 on MNIST). The product of the
  two conditionals is ``p̂(x_i | x_<i)``; the flops are ``2·W`` per row and component instead of ``L``
  (8× fewer at L = 256). A single bin (Bernoulli: L = 2) is not coded.
- **One state per distinct prefix.** Images of a block with the same pixels so far have bit-identical
  posteriors and share one row of the state (on MNIST the first rows of pixels are background).
- Then ``π ← π ⊙ P_i[x_i]`` (a row gather) and a renormalization.

**Leaves.** The codec needs one thing from a leaf: the log-probability table of pixel ``i``,
``[L, N]`` (:class:`PixelTables`). Categorical circuits give row block ``i·L : (i+1)·L`` of the circuit's
own ``[S·L, N]`` table (a view, :func:`vq2pc.circuit.kernels.categorical_table`); Bernoulli circuits a
``[2, N]`` table from their logits. Any other leaf plugs in by having a method
``pixel_log_table(i) -> [L, N]`` and an ``int`` attribute ``num_levels`` (a discretized Gaussian or
logistic leaf: the log of its CDF differences at the ``L + 1`` bin edges); continuous leaves without
it are refused.

**Determinism.** Encoder and decoder must compute bit-identical probabilities. Every operation on
the per-image state is one whose result IEEE 754 fixes (gather, multiply, divide, max, comparisons,
casts), so it does not depend on vector width, loop tails or thread splits; the only transcendental
function, ``exp`` of the leaf table, is numpy's (single-threaded, and measured to give an element the
same value wherever it lies in the array); the bin sums of the table are one torch sum over the ``W``
levels of a fixed-shape array, per pixel, on one thread. The predictive products are float32 MKL ``sgemm``
with a multiple of ``CHUNK = 16`` rows (zero rows pad them), run with one MKL thread (the caller sets it;
parallelism is over blocks), each on inputs that only the block's own state and the pixel's table fix
(which rows, which bins, which active columns), so the result depends only on the block's own
contents: measured, the rows of a product with ``R ≥ 16`` rows do not depend on ``R``, on their position
or on 1 vs 2 threads, while a 1-, 2- or 7-row product takes other paths (hence the padding). All product terms
are normal float32 numbers (``CUTOFF``, ``GEMM_CLAMP``) and the state never nears float64's subnormal
range (``FLOOR``, ``LOG_CLAMP``), so flush-to-zero settings cannot change a result either. Same
machine and library builds: identical; across CPUs or MKL versions (whose ``sgemm`` kernels may sum in
another order) identity is best effort, not guaranteed.

**Accuracy.** The state is the exact posterior in linear space (float64, rescaled so that its leader
is 1 after every pixel, to within a rounding of the reciprocal; the leaf factors are float32 ``exp`` of the float32 table). The
prediction leaves out components below ``CUTOFF`` (``2⁻⁵⁰``) of the leader and raises leaf
probabilities below ``GEMM_CLAMP`` (``2⁻⁶⁹``) to it; each changes the coded probability of the
observed level by a factor within ``1 ± N·2⁻⁵⁰ / p̂(x_i | x_<i)`` — nothing measurable unless the
level is already too unlikely for the 24-bit coder. Measured on an MNIST mixture (N = 1024): 64 test
images cost 78,144 bits against ``Σ -log2 p̂(x) = 78,123`` (the difference is the streams' final words).
A state with float32 weights, floored at ``2⁻⁶⁴`` and leaf log-probabilities clamped at ``-40``, coded
the same images in 75 bits *less* than ``-log2 p̂``: the floor revived components that ``p̂`` had
ruled out — a different model, not the circuit's.
"""

from __future__ import annotations

import hashlib
import math
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from vq2pc.circuit.kernels import categorical_table
from vq2pc.circuit.mixture import MixtureCircuit
from vq2pc.core.leaves import Bernoulli, Categorical, Leaf

__all__ = [
    "CUTOFF",
    "FLOOR",
    "GEMM_CLAMP",
    "LOG_CLAMP",
    "BlockState",
    "PixelProducts",
    "CodecError",
    "PixelTables",
    "circuit_digest",
    "level_bins",
    "pixel_tables",
]

FLOOR = 2.0**-500
"""Smallest posterior weight kept in the float64 state (relative to the leader, which is 1): far below anything
that can matter (a component there would need to beat the leader by 500 bits), high enough that the state never
reaches float64's subnormal range (``FLOOR · exp(LOG_CLAMP) ≥ 2^-626``)."""
LOG_CLAMP = -87.0
"""Leaf log-probabilities are clamped below at this value (nats) for the update, so ``exp`` is a normal float32."""
CUTOFF = 2.0**-50
"""Components below this weight (relative to the leader) are left out of the predictive product."""
GEMM_CLAMP = 2.0**-69
"""Leaf probabilities in the predictive product are clamped below at this value, so every product term
``CUTOFF · GEMM_CLAMP ≥ 2^-119`` is a normal float32 (flush-to-zero settings cannot change a sum)."""
COMPACT_FRACTION = 0.5
"""A chunk's product runs over its active columns only when at most this fraction of the ``N`` is active."""
CHUNK = 16
"""Predictive products have a multiple of this many rows (``sgemm``; measured, a row's result does not depend on
the number of rows nor on its position from 16 rows on, while 1-, 2- or 7-row products take other paths)."""


class CodecError(ValueError):
    """A file or input the codec cannot use (the message names the problem)."""


class PixelTables(Protocol):
    """Per-pixel log-probability tables of a discrete circuit."""

    levels: int
    num_pixels: int
    num_components: int

    def log_table(self, i: int) -> np.ndarray:
        """``[L, N]`` float32 ``log p(x_i = l | component n)`` (a view where possible)."""
        ...

    def digest(self, h: hashlib._Hash) -> None:
        """Feed the table parameters into ``h`` (the circuit's identity)."""
        ...


class _TableRows:
    """Pixel ``i`` is row block ``i·L : (i+1)·L`` of a ``[S·L, N]`` log table (categorical layout)."""

    def __init__(self, table: Tensor, levels: int) -> None:
        self.table = table.detach().cpu().contiguous()
        self.levels = levels
        self.num_pixels = self.table.shape[0] // levels
        self.num_components = self.table.shape[1]
        self._np = self.table.numpy()

    def log_table(self, i: int) -> np.ndarray:
        rows = self._np[i * self.levels : (i + 1) * self.levels]
        return rows if rows.dtype == np.float32 else rows.astype(np.float32)

    def digest(self, h: hashlib._Hash) -> None:
        h.update(str(self._np.dtype).encode())
        h.update(piece_digests(memoryview(self._np).cast("B")))


class _LeafMethod:
    """A leaf that gives its own per-pixel tables (``pixel_log_table(i) -> [L, N]``)."""

    def __init__(self, leaf: Leaf, num_pixels: int, num_components: int) -> None:
        self.leaf = leaf
        self.levels = int(leaf.num_levels)
        self.num_pixels, self.num_components = num_pixels, num_components

    def log_table(self, i: int) -> np.ndarray:
        t = self.leaf.pixel_log_table(i)  # type: ignore[attr-defined]  (the hook: see the module docstring)
        return np.ascontiguousarray(torch.as_tensor(t).detach().cpu().numpy(), dtype=np.float32)

    def digest(self, h: hashlib._Hash) -> None:
        for name, t in self.leaf.tensors().items():
            h.update(name.encode())
            h.update(memoryview(np.ascontiguousarray(t.detach().cpu().numpy())).cast("B"))


def pixel_tables(circuit: MixtureCircuit) -> PixelTables:
    """The :class:`PixelTables` of a circuit's leaf; :class:`CodecError` for continuous leaves."""
    leaf = circuit.leaf
    n, s = int(leaf.batch_shape[0]), int(leaf.batch_shape[1])
    if isinstance(leaf, Categorical):
        return _TableRows(categorical_table(leaf.logits), leaf.num_levels)
    if isinstance(leaf, Bernoulli):
        logits = leaf.logits.detach().cpu().double()
        log_p = torch.stack([torch.nn.functional.logsigmoid(-logits), torch.nn.functional.logsigmoid(logits)], 2)
        return _TableRows(categorical_table(log_p.float()), 2)
    if callable(getattr(leaf, "pixel_log_table", None)) and hasattr(leaf, "num_levels"):
        return _LeafMethod(leaf, s, n)
    raise CodecError(
        f"cannot compress with a {leaf.kind} circuit: lossless coding needs a probability for each of the L "
        "pixel levels; use a categorical or Bernoulli circuit (or a leaf with discretized levels)"
    )


PIECE = 64 << 20
"""Large tables are hashed in pieces of this many bytes, in parallel (a 3 GB table takes seconds in one piece)."""


def piece_digests(buf: memoryview) -> bytes:
    """The SHA-256 digests of ``buf``'s consecutive ``PIECE``-byte pieces, concatenated (hashed by threads:
    hashlib releases the GIL)."""
    pieces = [buf[i : i + PIECE] for i in range(0, len(buf), PIECE)]
    with ThreadPoolExecutor(max(1, min(len(pieces), torch.get_num_threads()))) as pool:
        return b"".join(pool.map(lambda piece: hashlib.sha256(piece).digest(), pieces))


def circuit_digest(tables: PixelTables, log_weights: Tensor, kind: str) -> str:
    """SHA-256 (hex) of what the codec's probabilities depend on: leaf kind, N, S, L, tables (through the
    digests of their 64 MiB pieces), weights."""
    h = hashlib.sha256()
    h.update(f"{kind}:{tables.num_components}:{tables.num_pixels}:{tables.levels}:".encode())
    tables.digest(h)
    w = np.ascontiguousarray(log_weights.detach().cpu().numpy())
    h.update(str(w.dtype).encode())
    h.update(memoryview(w).cast("B"))
    return h.hexdigest()


def level_bins(levels: int) -> tuple[int, int]:
    """``(W, B)``: a pixel is coded as its bin ``x // W`` (``B`` bins) and then ``x % W``, ``W = ⌈√L⌉``."""
    width = math.isqrt(levels - 1) + 1
    return width, -(-levels // width)


class PixelProducts:
    """Pixel ``i``'s tables for the predictive products, refilled in place per pixel.

    ``levels_t [N, B·W]``: ``max(exp(max(log_table(i), LOG_CLAMP)), GEMM_CLAMP)`` transposed (the products
    gather its rows), levels beyond ``L`` 0; ``bins_t [N, B]``: its sums over each bin's ``W`` levels."""

    def __init__(self, levels: int, num_components: int) -> None:
        self.width, self.num_bins = level_bins(levels)
        self.levels_t = torch.zeros(num_components, self.num_bins * self.width, dtype=torch.float32)
        self.bins_t = torch.empty(num_components, self.num_bins, dtype=torch.float32)
        self.update_np = np.empty((levels, num_components), dtype=np.float32)
        self.update = torch.from_numpy(self.update_np)  # [L, N] leaf probabilities for the update

    def fill(self, tables: PixelTables, i: int) -> None:
        """``update = exp(max(log_table(i), LOG_CLAMP))`` with numpy's exp (it gives an element the same value
        wherever it lies in an array), then the product tables from it."""
        np.exp(np.maximum(tables.log_table(i), np.float32(LOG_CLAMP)), out=self.update_np)
        levels = self.update.shape[0]
        self.levels_t[:, :levels].copy_(self.update.T).clamp_min_(GEMM_CLAMP)
        torch.sum(self.levels_t.view(-1, self.num_bins, self.width), 2, out=self.bins_t)


class BlockState:
    """The posterior of one block's images, one row per distinct prefix ``x_<i`` among them.

    ``w [G, N]`` float64, largest entry per row 1 (to rounding), entries in ``[FLOOR, 1]`` (0 for components
    of weight 0): the exact posterior up to float64 rounding of the float32 leaf probabilities' products.
    ``group [count]``: the row of each image. Images with the same pixels so far have bit-identical
    posteriors, so they share a row (on MNIST the first rows of pixels are background: ``G = 1`` for the
    first ~60 pixels).

    Per pixel: :meth:`predict_bins`, then :meth:`predict_levels` for the coded bins, then :meth:`update`.
    Every product is float32 with a multiple of ``CHUNK`` rows (zero rows pad them), over the components at
    or above ``CUTOFF`` in any row (the others as 0; ``threshold_`` zeroes entries below it whatever float32
    made of them, so the inputs are fixed by the state), over those columns only when they are at most
    ``COMPACT_FRACTION`` of ``N``.
    """

    def __init__(self, log_weights: Tensor, count: int) -> None:
        w = torch.exp(log_weights.detach().cpu().double() - log_weights.max().item())
        # Components of weight 0 (log weight -inf) have no mass in p̂: the floor must not revive them.
        self._live = None if bool((w > 0).all()) else (w > 0).double()  # [N]
        self.w = w.clamp_min(FLOOR)[None]  # [1, N]: every image starts with the empty prefix
        if self._live is not None:
            self.w = self.w * self._live
        self.group = torch.zeros(count, dtype=torch.long)  # [count]
        self.count = count
        self._sub = self._levels_t = torch.empty(0)

    def predict_bins(self, tabs: PixelProducts) -> np.ndarray:
        """``[count, B]`` float64 probabilities (unnormalized) of the current pixel's bins."""
        g, n = self.w.shape
        w32 = torch.zeros(-(-(g + 1) // CHUNK) * CHUNK, n, dtype=torch.float32)  # row g on: 0 (padding)
        torch.nn.functional.threshold_(w32[:g].copy_(self.w), CUTOFF, 0.0)
        idx = (w32.amax(0) > 0).nonzero().squeeze(1)
        if idx.numel() <= COMPACT_FRACTION * n:
            self._sub, self._levels_t = w32.index_select(1, idx), tabs.levels_t.index_select(0, idx)
            bins_t = tabs.bins_t.index_select(0, idx)
        else:
            self._sub, self._levels_t, bins_t = w32, tabs.levels_t, tabs.bins_t
        probs = torch.mm(self._sub[: -(-g // CHUNK) * CHUNK], bins_t)  # [G padded, B]
        return probs.index_select(0, self.group).double().numpy()

    def predict_levels(self, tabs: PixelProducts, bins: np.ndarray) -> np.ndarray:
        """``[count, W]`` float64 probabilities (unnormalized) of the levels in each image's bin ``bins [count]``
        (after :meth:`predict_bins`): one product per bin that occurs, over the rows that code it."""
        g, width = self.w.shape[0], tabs.width
        key = self.group * tabs.num_bins + torch.from_numpy(np.asarray(bins, dtype=np.int64))
        keys, inverse = torch.unique(key, sorted=True, return_inverse=True)  # distinct (row, bin)
        rows, kbins = keys // tabs.num_bins, keys % tabs.num_bins
        out = torch.empty(len(keys), width, dtype=torch.float32)
        for b in torch.unique(kbins).tolist():  # at most B products, each with few rows
            at = (kbins == b).nonzero().squeeze(1)
            pad = torch.full((-len(at) % CHUNK,), g, dtype=torch.long)  # row g of the state copy is 0
            sub = self._sub.index_select(0, torch.cat([rows[at], pad]))
            out[at] = torch.mm(sub, self._levels_t[:, b * width : (b + 1) * width])[: len(at)]
        return out.index_select(0, inverse).double().numpy()

    def update(self, p: Tensor, symbols: np.ndarray) -> None:
        """``π ← π ⊙ P_i[x_i]`` (``p = update table [L, N]``), rescaled to a leader of 1 and floored; rows
        split where images of one prefix differ in ``x_i``."""
        levels = p.shape[0]
        key = self.group * levels + torch.from_numpy(np.asarray(symbols, dtype=np.int64))
        keys, self.group = torch.unique(key, sorted=True, return_inverse=True)
        parent = keys // levels
        if parent.numel() != self.w.shape[0] or bool((parent != torch.arange(parent.numel())).any()):
            self.w = self.w.index_select(0, parent)
        self.w.mul_(p.index_select(0, keys % levels))
        # One reciprocal per row, then multiplications (a division per entry costs 4x): the leader is 1 to
        # within rounding. A real row's leader is >= e^-87.
        self.w.mul_(self.w.amax(1, keepdim=True).clamp_min_(FLOOR).reciprocal_())
        self.w.clamp_min_(FLOOR)
        if self._live is not None:
            self.w.mul_(self._live)


def bits_bound(num_pixels: int, levels: int) -> float:
    """Upper bound (bits) on what quantization and range coding add to ``Σ -log2 p̂`` over ``num_pixels``
    pixels of ``levels`` levels (a bin and a level in it, or the level alone when ``B = 1``), before the
    stream's final words (see the coder module docstring)."""
    width, num_bins = level_bins(levels)
    per_symbol = [-math.log2(1.0 - k / 2.0**24) - math.log2(1.0 - 2.0**-8) for k in (width, num_bins) if k > 1]
    return num_pixels * sum(per_symbol)
