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
the per-image state is one whose result is fixed by IEEE 754 (gather, multiply, divide, max,
comparisons, float32 casts), so it does not depend on vector width, tails or thread splits; the
only transcendental function, ``exp`` of the table, is numpy's (single-threaded, and measured to
give the same value for an element wherever it lies in the array). The matrix product is float32
MKL ``sgemm`` with exactly ``R`` rows (a block is always padded to ``R``), run with one MKL thread
(the caller sets it; parallelism is over blocks), so its result depends only on the block's own
contents. All values stay in the normal float32 range (``FLOOR``, ``CUTOFF``, ``LOG_CLAMP`` below),
so flush-to-zero settings cannot change a result either. Same machine, same library builds:
identical; across CPUs or MKL versions (whose ``sgemm`` kernels may sum in another order) identity
is best effort, not guaranteed.

**Accuracy.** The state is the posterior in linear space (float32), rescaled so that its largest
entry is exactly 1 after every pixel and floored at ``FLOOR`` (a component far behind is kept, not
dropped, so it can come back). When at most half of the ``N`` components reach ``CUTOFF`` in some row
of the block, the product runs over those columns only (the others are below ``2⁻⁵⁰`` of every row's
leader); leaf probabilities are clamped below at ``exp(LOG_CLAMP)``. Each of these changes a pixel's
coded probability by a factor of at most about ``1 + N·2⁻⁵⁰ / P_lead(x_i)`` (``P_lead`` the leading
component's probability of the observed level) — far below a millibit per image in practice — and
none breaks exact decoding, since the decoder does the same.
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
from vq2pc.core.leaves import Bernoulli, Categorical

__all__ = ["CUTOFF", "FLOOR", "LOG_CLAMP", "BlockState", "CodecError", "PixelTables", "circuit_digest", "pixel_tables"]

FLOOR = 2.0**-64
"""Smallest posterior weight kept in the state (relative to the leader, which is 1)."""
CUTOFF = 2.0**-50
"""Components below this weight are left out of the block's matrix product."""
LOG_CLAMP = -40.0
"""Leaf log-probabilities are clamped below at this value (nats), so ``FLOOR·exp(LOG_CLAMP)`` is a normal float32."""
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

    def __init__(self, leaf: object, num_pixels: int, num_components: int) -> None:
        self.leaf = leaf
        self.levels = int(leaf.num_levels)
        self.num_pixels, self.num_components = num_pixels, num_components

    def log_table(self, i: int) -> np.ndarray:
        t = self.leaf.pixel_log_table(i)  # type: ignore[attr-defined]
        return np.ascontiguousarray(torch.as_tensor(t).detach().cpu().numpy(), dtype=np.float32)

    def digest(self, h: hashlib._Hash) -> None:
        for name, t in self.leaf.tensors().items():  # type: ignore[attr-defined]
            h.update(name.encode())
            h.update(memoryview(np.ascontiguousarray(t.detach().cpu().numpy())).cast("B"))


def pixel_tables(circuit: object) -> PixelTables:
    """The :class:`PixelTables` of a circuit's leaf; :class:`CodecError` for continuous leaves."""
    leaf = circuit.leaf  # type: ignore[attr-defined]
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


def prob_table(tables: PixelTables, i: int, out: np.ndarray, rows: slice = slice(None)) -> None:
    """``out[rows] = P_i[rows]`` (``out [L, N]`` float32): ``exp(max(log_table(i), LOG_CLAMP))`` with numpy's
    exp, which gives an element the same value wherever it lies, so workers may fill row ranges."""
    np.exp(np.maximum(tables.log_table(i)[rows], np.float32(LOG_CLAMP)), out=out[rows])


class BlockState:
    """The posterior of one block of ``R`` images (rows beyond ``count`` are padding, weight 0).

    ``w [R, N]`` float32, largest entry per real row 1, entries in ``[FLOOR, 1]``.
    """

    def __init__(self, log_weights: Tensor, rows: int, count: int) -> None:
        w = torch.exp(log_weights.detach().cpu().double() - log_weights.max().item()).float()
        self.w = torch.zeros(rows, w.shape[0], dtype=torch.float32)  # [R, N]; padding rows stay 0
        self.w[:count] = w.clamp_min(FLOOR)
        self.count = count
        self._rows = torch.empty_like(self.w)
        self._idx = torch.zeros(rows, dtype=torch.long)

    def predict(self, p: Tensor) -> np.ndarray:
        """``[count, L]`` float64 mixture probabilities (unnormalized) for the current pixel, ``p = P_i [L, N]``.

        Components below ``CUTOFF`` in every row of the block are left out when that leaves at most
        ``COMPACT_FRACTION`` of them (else the product is dense)."""
        idx = (self.w.amax(0) >= CUTOFF).nonzero().squeeze(1)
        if idx.numel() <= COMPACT_FRACTION * self.w.shape[1]:
            probs = torch.mm(self.w.index_select(1, idx), p.index_select(1, idx).T)
        else:
            probs = torch.mm(self.w, p.T)
        return probs[: self.count].double().numpy()

    def update(self, p: Tensor, symbols: np.ndarray) -> None:
        """``π ← π ⊙ P_i[x_i]``, rescaled to a leader of 1 and floored (``symbols [count]`` levels)."""
        self._idx[: self.count] = torch.from_numpy(np.asarray(symbols, dtype=np.int64))
        torch.index_select(p, 0, self._idx, out=self._rows)
        self.w.mul_(self._rows)
        self.w.div_(self.w.amax(1, keepdim=True).clamp_min_(FLOOR))  # a real row's leader is >= 2^-58
        self.w[: self.count].clamp_min_(FLOOR)


def bits_bound(num_symbols: int, levels: int) -> float:
    """Upper bound (bits) on what quantization and range coding add to ``Σ -log2 p̂`` over ``num_symbols``
    symbols of ``levels`` levels, before the stream's final words (see the coder module docstring)."""
    return num_symbols * (-math.log2(1.0 - levels / 2.0**24) - math.log2(1.0 - 2.0**-8))
