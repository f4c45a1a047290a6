"""The per-pixel conditionals ``p̂(x_i | x_<i)`` of a discrete circuit, as the codec computes them.

For ``p̂(x) = Σ_n w_n Π_i p(x_i | θ_n)`` the conditional of pixel ``i`` given the pixels before it is
``Σ_n π_n^{(i)} p(x_i | θ_n)`` with the posterior ``π^{(i)} ∝ w_n Π_{j<i} p(x_j | θ_n)``. Per pixel and per
block of ``R`` images: ``probs [R, L] = π [R, N] @ P_iᵀ`` (one matrix product, ``P_i [L, N]`` the pixel's
probability table), then ``π ← π ⊙ P_i[x_i]`` (a row gather) and a renormalization.

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
same value wherever it lies in the array). The predictive product is float32 MKL ``sgemm`` with
exactly ``R`` rows (a block is always padded to ``R``), run with one MKL thread (the caller sets it;
parallelism is over blocks), so its result depends only on the block's own contents: measured, the
rows of a product with ``R ≥ 16`` rows do not depend on ``R``, on their position or on 1 vs 2
threads, while a 1-, 2- or 7-row product takes other paths (hence ``rows ≥ 16``). All product terms
are normal float32 numbers (``CUTOFF``, ``GEMM_CLAMP``) and the state never nears float64's subnormal
range (``FLOOR``, ``LOG_CLAMP``), so flush-to-zero settings cannot change a result either. Same
machine and library builds: identical; across CPUs or MKL versions (whose ``sgemm`` kernels may sum in
another order) identity is best effort, not guaranteed.

**Accuracy.** The state is the exact posterior in linear space (float64, rescaled so that its leader
is exactly 1 after every pixel; the leaf factors are float32 ``exp`` of the float32 table). The
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
    "CodecError",
    "PixelTables",
    "circuit_digest",
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
"""The product runs over the active columns only when at most this fraction of the ``N`` is active."""


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


def prob_tables(tables: PixelTables, i: int, update: np.ndarray, gemm: np.ndarray) -> None:
    """Fill pixel ``i``'s tables (``[L, N]`` float32): ``update = exp(max(log_table(i), LOG_CLAMP))`` with
    numpy's exp (it gives an element the same value wherever it lies in an array), ``gemm = max(update,
    GEMM_CLAMP)``."""
    np.exp(np.maximum(tables.log_table(i), np.float32(LOG_CLAMP)), out=update)
    np.maximum(update, np.float32(GEMM_CLAMP), out=gemm)


class BlockState:
    """The posterior of one block of ``R`` images (rows beyond ``count`` are padding, weight 0).

    ``w [R, N]`` float64, largest entry per real row exactly 1, entries in ``[FLOOR, 1]`` (0 for components
    of weight 0): the exact posterior up to float64 rounding of the float32 leaf probabilities' products.
    """

    def __init__(self, log_weights: Tensor, rows: int, count: int) -> None:
        w = torch.exp(log_weights.detach().cpu().double() - log_weights.max().item())
        self.w = torch.zeros(rows, w.shape[0], dtype=torch.float64)  # [R, N]; padding rows stay 0
        self.w[:count] = w.clamp_min(FLOOR)
        # Components of weight 0 (log weight -inf) have no mass in p̂: the floor must not revive them.
        self._live = None if bool((w > 0).all()) else (w > 0).double()  # [N]
        if self._live is not None:
            self.w.mul_(self._live)
        self.count = count
        self._w_np = self.w.numpy()  # the same memory
        self._rows = torch.empty(rows, w.shape[0], dtype=torch.float32)
        self._w32 = torch.empty(rows, w.shape[0], dtype=torch.float32)
        self._idx = torch.zeros(rows, dtype=torch.long)

    def predict(self, gemm: Tensor) -> np.ndarray:
        """``[count, L]`` float64 mixture probabilities (unnormalized) of the current pixel (``gemm [L, N]``).

        One float32 product over the components at or above ``CUTOFF`` (the others as 0); over those
        columns only when they are at most ``COMPACT_FRACTION`` of ``N``. ``threshold_`` zeroes entries
        below ``CUTOFF`` whatever float32 made of them (subnormal or 0), so the product's inputs are fixed."""
        idx = torch.from_numpy(np.flatnonzero((self._w_np >= CUTOFF).any(0)))  # columns with a row >= CUTOFF
        if idx.numel() <= COMPACT_FRACTION * self.w.shape[1]:
            w32 = torch.nn.functional.threshold_(self.w.index_select(1, idx).float(), CUTOFF, 0.0)
            probs = torch.mm(w32, gemm.index_select(1, idx).T)
        else:
            torch.nn.functional.threshold_(self._w32.copy_(self.w), CUTOFF, 0.0)
            probs = torch.mm(self._w32, gemm.T)
        return probs[: self.count].double().numpy()

    def update(self, p: Tensor, symbols: np.ndarray) -> None:
        """``π ← π ⊙ P_i[x_i]`` (``p = update table [L, N]``), rescaled to a leader of 1 and floored."""
        sym = np.asarray(symbols, dtype=np.int64)
        if sym.min() == sym.max():  # one level in every image: one row of factors, broadcast (padding rows stay 0)
            self.w.mul_(p[int(sym[0])])
        else:
            self._idx[: self.count] = torch.from_numpy(sym)
            torch.index_select(p, 0, self._idx, out=self._rows)
            self.w.mul_(self._rows)
        self.w.div_(self.w.amax(1, keepdim=True).clamp_min_(FLOOR))  # a real row's leader is >= e^-87
        self.w[: self.count].clamp_min_(FLOOR)
        if self._live is not None:
            self.w.mul_(self._live)


def bits_bound(num_symbols: int, levels: int) -> float:
    """Upper bound (bits) on what quantization and range coding add to ``Σ -log2 p̂`` over ``num_symbols``
    symbols of ``levels`` levels, before the stream's final words (see the coder module docstring)."""
    return num_symbols * (-math.log2(1.0 - levels / 2.0**24) - math.log2(1.0 - 2.0**-8))
