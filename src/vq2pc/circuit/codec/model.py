"""The per-pixel conditionals ``p̂(x_i | x_<i)`` of a discrete circuit, as the codec computes them.

For ``p̂(x) = Σ_n w_n Π_i p(x_i | θ_n)`` the conditional of pixel ``i`` given the pixels before it is
``Σ_n π_n^{(i)} p(x_i | θ_n)`` with the posterior ``π^{(i)} ∝ w_n Π_{j<i} p(x_j | θ_n)``. Per pixel and per
block of images: ``probs [u, L] = π [u, N] @ P_i [N, L]`` over the block's ``u`` classes of images with
equal pixels so far (one product, ``P_i`` the pixel's probability table; each posterior row keeps only the
components at or above ``CUTOFF`` of its leader, as a sparse matrix when few are), then
``π ← π ⊙ P_i[x_i]`` (a row gather) and a renormalization.

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
same value wherever it lies in an array). The predictive product runs on one thread (the caller sets it; parallelism is over blocks), and
which product runs (sparse or dense, its shape and columns) is decided from the state alone, so the
encoder and the decoder run the same product on the same inputs. All product terms are normal float32 numbers
(``CUTOFF``, ``GEMM_CLAMP``) and the state never nears float64's subnormal range (``FLOOR``,
``LOG_CLAMP``), so flush-to-zero settings cannot change a result either. Same machine and library
builds: identical; across CPUs or library versions (whose kernels may sum in another order) identity
is best effort, not guaranteed.

**Accuracy.** The state is the exact posterior in linear space (float64, rescaled by the reciprocal of
its leader after every pixel, so the leader is 1 up to one rounding; the leaf factors are float32 ``exp`` of the float32 table). The
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
import warnings
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

# The sparse product uses torch's CSR tensors, which warn once that they are in beta; the codec relies only on
# their product with a dense matrix (tested bit for bit against its definition).
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta", category=UserWarning)

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
"""A dense product runs over the active columns only when at most this fraction of the ``N`` is active."""
SPARSE_COST = 6
"""A sparse product's cost per stored entry, in entries of a dense product (measured on one core: a
``[64, 4096] × [4096, 256]`` sgemm takes ~6.5 ns per row and component, a CSR product 30–50 ns per entry)."""


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


def prob_tables(tables: PixelTables, i: int, update: np.ndarray, gemm_t: Tensor) -> None:
    """Fill pixel ``i``'s tables: ``update [L, N] = exp(max(log_table(i), LOG_CLAMP))`` with numpy's exp
    (it gives an element the same value wherever it lies in an array) and ``gemm_t [N, L] = max(updateᵀ,
    GEMM_CLAMP)``, the product's operand, components as rows (a compact or sparse product reads whole rows)."""
    np.exp(np.maximum(tables.log_table(i), np.float32(LOG_CLAMP)), out=update)
    gemm_t.copy_(torch.from_numpy(update).T).clamp_min_(GEMM_CLAMP)


class BlockState:
    """The posterior of one block of ``count`` images, one row per class of images with equal pixels so far.

    Images whose pixels so far are equal have the same posterior, bit for bit (same factors, same
    operations), so the state keeps one row per class: ``w [u, N]`` float64, ``_group [count]`` the class of
    each image. All images share one class until their pixels differ (MNIST's top rows), and the prediction
    and the update run once per class. Each row's largest entry is 1 up to one rounding, entries lie in
    ``[FLOOR, 1]`` (0 for components of weight 0): the exact posterior up to float64 rounding of the float32 leaf
    probabilities' products.
    """

    def __init__(self, log_weights: Tensor, count: int) -> None:
        w = torch.exp(log_weights.detach().cpu().double() - log_weights.max().item())
        # Components of weight 0 (log weight -inf) have no mass in p̂: the floor must not revive them.
        self._live = None if bool((w > 0).all()) else (w > 0).double()  # [N]
        self.w = w.clamp_min(FLOOR).unsqueeze(0)  # [u = 1, N]
        if self._live is not None:
            self.w.mul_(self._live)
        self.count = count
        self._group = np.zeros(count, dtype=np.int64)  # [count] class of each image

    def predict(self, gemm_t: Tensor) -> np.ndarray:
        """``[count, L]`` float64 mixture probabilities (unnormalized) of the current pixel (``gemm_t [N, L]``).

        Per class, one float32 product over the components at or above ``CUTOFF`` (the others as 0): a
        sparse one (each row its own components) when that is cheaper by ``SPARSE_COST``, else a dense one
        over the union of those columns (all ``N`` when they are more than ``COMPACT_FRACTION``). The path
        depends on the state alone, so encoder and decoder compute the same bits."""
        w = self.w.numpy()  # [u, N]
        active = w >= CUTOFF
        cols = np.flatnonzero(active.any(0))
        n = w.shape[1]
        width = len(cols) if len(cols) <= COMPACT_FRACTION * n else n
        if np.count_nonzero(active) * SPARSE_COST < len(w) * width:
            probs = _sparse_product(w, active, gemm_t)
        else:
            probs = _dense_product(w, cols if width < n else None, gemm_t)
        return probs.double().numpy()[self._group]

    def update(self, p: Tensor, symbols: np.ndarray) -> None:
        """``π ← π ⊙ P_i[x_i]`` (``p = update table [L, N]``) per class, splitting the classes whose images
        differ at this pixel; rescaled by the reciprocal of the leader and floored."""
        sym = np.asarray(symbols, dtype=np.int64)
        _, first, inv = np.unique((self._group << 32) | sym, return_index=True, return_inverse=True)
        if len(first) == len(self.w):  # no class splits (each has one level): class c stays row c
            levels = torch.from_numpy(sym[first])
            self.w.mul_(p[levels[0]] if len(first) == 1 else p.index_select(0, levels))
        else:
            parent, levels = torch.from_numpy(self._group[first]), torch.from_numpy(sym[first])
            self.w = self.w.index_select(0, parent).mul_(p.index_select(0, levels))
            self._group = inv.reshape(-1)
        self.w.mul_(self.w.amax(1, keepdim=True).reciprocal_())  # a row's leader is >= FLOOR · e^-87 > 0
        self.w.clamp_min_(FLOOR)
        if self._live is not None:
            self.w.mul_(self._live)


def _dense_product(w: np.ndarray, cols: np.ndarray | None, gemm_t: Tensor) -> Tensor:
    """``[u, L]``: ``w32 [u, N] @ gemm_t`` over ``cols`` (all when ``None``), entries below ``CUTOFF`` as 0
    (whatever float32 made of them: subnormal or 0)."""
    w32 = torch.from_numpy(w if cols is None else w[:, cols]).float()
    torch.nn.functional.threshold_(w32, CUTOFF, 0.0)
    g = gemm_t if cols is None else gemm_t.index_select(0, torch.from_numpy(cols))
    return torch.mm(w32, g)


def _sparse_product(w: np.ndarray, active: np.ndarray, gemm_t: Tensor) -> Tensor:
    """``[u, L]``: each row's components at or above ``CUTOFF`` (a CSR matrix, float32) times ``gemm_t``."""
    flat = np.flatnonzero(active)  # row-major: row r's entries lie in [r·N, (r+1)·N)
    crow = np.searchsorted(flat, np.arange(len(w) + 1, dtype=np.int64) * w.shape[1])
    values = torch.from_numpy(w.ravel()[flat].astype(np.float32))
    csr = torch.sparse_csr_tensor(
        torch.from_numpy(crow),
        torch.from_numpy(flat % w.shape[1]),
        values,
        (len(w), w.shape[1]),
        check_invariants=False,
    )
    return torch.mm(csr, gemm_t)


def bits_bound(num_symbols: int, levels: int) -> float:
    """Upper bound (bits) on what quantization and range coding add to ``Σ -log2 p̂`` over ``num_symbols``
    symbols of ``levels`` levels, before the stream's final words (see the coder module docstring)."""
    return num_symbols * (-math.log2(1.0 - levels / 2.0**24) - math.log2(1.0 - 2.0**-8))
