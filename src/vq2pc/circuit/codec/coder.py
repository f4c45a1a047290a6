"""Lossless image coding with a discrete circuit: ``encode(circuit, images) -> bytes`` and back.

Each block of ``rows`` images is one range-coded stream (constriction's ``RangeEncoder``, 32-bit
words, 24-bit probabilities), pixel-major: pixel 0 of every image of the block, then pixel 1, ...
The conditional of each pixel comes from :mod:`vq2pc.circuit.codec.model` (one product per block and
pixel over the block's classes of images with equal pixels so far). A block is the unit of random
access: decoding image ``k`` decodes its block; a block's stream ends once (about 32–64 bits), not once
per image.

**Why encoder and decoder agree.** Both run :func:`_run`: the same blocks, the same per-block
operations in the same order, pixel by pixel, on the same state (see the model module), and
hand the same float64 array to constriction. constriction quantizes it with its lazy categorical
model (``perfect=False``): the left cumulative of level ``l`` is ``⌊C_l · s⌋ + l`` with ``C_l`` the
sequential float sum of the first ``l`` probabilities and ``s = (2^24 − L) / ΣP`` — a fixed sequence
of IEEE operations in compiled code, so identical inputs give identical integer CDFs on every
platform, and every level has at least 1/2^24 (any value is codable).

**Code length.** That quantization gives every level ``q_l ≥ p_l (1 − L/2^24)``, and the range coder
(64-bit state, ≥ 2^32 after renormalization) loses at most ``−log2(1 − 2^−8)`` bits per symbol to
integer truncation; so a block costs at most ``Σ −log2 p̂(x_i | x_<i) + n·(L/2^24 + 2^−8)/ln 2``
bits (``n`` symbols, :func:`model.bits_bound`) plus its final words (≤ 64 bits), and typically far less
than the bound. The file adds a header (about 400 bytes) and 12 bytes of index per block.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
from tqdm.auto import tqdm

from vq2pc.circuit.codec.format import Header, block_words, pack, unpack
from vq2pc.circuit.codec.model import BlockState, CodecError, PixelTables, circuit_digest, pixel_tables, prob_tables
from vq2pc.circuit.mixture import MixtureCircuit
from vq2pc.core import validate
from vq2pc.core.files import atomic_write
from vq2pc.data.datasets import to_model_space

__all__ = ["DEFAULT_ROWS", "dataset_images", "decode", "encode", "load_compressed", "read_header", "save_compressed"]

DEFAULT_ROWS = 64
"""Images per block (the random-access unit): a stream ends once per block (~32–64 bits)."""
STATE_BUDGET = 256 << 20
"""Bytes of posterior state held at once (blocks are processed in groups that fit)."""

Step = Callable[[int, int, np.ndarray], np.ndarray]


def _constriction() -> ModuleType:
    """constriction (the entropy coder), an optional dependency: one clear error when it is missing."""
    try:
        import constriction
    except ModuleNotFoundError:
        raise ModuleNotFoundError("compression needs the constriction package: pip install 'vq2pc[codec]'") from None
    return constriction


def encode(
    circuit: MixtureCircuit,
    images: object,
    *,
    rows: int = DEFAULT_ROWS,
    threads: int | None = None,
    progress: bool = False,
) -> bytes:
    """The compressed file for ``images`` (``[B, S]`` or ``[B, *image_shape]`` integer levels)."""
    if not isinstance(rows, int) or isinstance(rows, bool) or rows < 1:
        raise ValueError(f"rows must be a positive integer (images per block), got {rows!r}")
    tables = pixel_tables(circuit)
    x, shape = _images(images, tables.num_pixels, tables.levels, circuit)
    digest = _identity(circuit, tables)
    header = Header(digest, circuit.leaf.kind, shape, tables.levels, int(x.shape[0]), rows)
    counts = _counts(header)
    constriction = _constriction()
    coders = [constriction.stream.queue.RangeEncoder() for _ in counts]
    family = constriction.stream.model.Categorical(perfect=False)

    def step(b: int, i: int, probs: np.ndarray) -> np.ndarray:
        sym = x[b * rows : b * rows + counts[b], i]
        coders[b].encode(sym, family, probs)
        return sym

    _run(tables, circuit.log_weights, list(range(len(counts))), counts, rows, step, threads, progress, "compress")
    return pack(header, [c.get_compressed() for c in coders])


def decode(
    circuit: MixtureCircuit,
    data: bytes,
    *,
    indices: Sequence[int] | None = None,
    threads: int | None = None,
    progress: bool = False,
) -> np.ndarray:
    """The images of a compressed file, ``[n, *image_shape]`` (uint8 when ``L ≤ 256``).

    ``indices``: decode only these images (in this order); only their blocks are decoded."""
    header, offsets, crcs, start = unpack(data)
    header.check_constants()
    tables = pixel_tables(circuit)
    digest = _identity(circuit, tables)
    if digest != header.circuit_sha256:
        raise CodecError(
            f"compressed file was made with another circuit (its SHA-256 {header.circuit_sha256[:12]}…, "
            f"this circuit's {digest[:12]}…)"
        )
    if math.prod(header.image_shape) != tables.num_pixels:
        raise CodecError(f"compressed file has image shape {header.image_shape}; the circuit has S={tables.num_pixels}")
    wanted = _indices(indices, header.count)
    blocks = sorted({int(k) // header.rows for k in wanted})
    counts = _counts(header)
    constriction = _constriction()
    words = {b: block_words(data, offsets, crcs, start, b) for b in blocks}
    decoders = {b: constriction.stream.queue.RangeDecoder(words[b]) for b in blocks}
    out = {b: np.zeros((counts[b], tables.num_pixels), dtype=np.int32) for b in blocks}
    family = constriction.stream.model.Categorical(perfect=False)

    def step(b: int, i: int, probs: np.ndarray) -> np.ndarray:
        out[b][:, i] = decoders[b].decode(family, probs)
        return out[b][:, i]

    _run(tables, circuit.log_weights, blocks, counts, header.rows, step, threads, progress, "decompress")
    flat = np.concatenate([out[b] for b in blocks])  # the decoded blocks' images, in block order
    first = np.zeros(header.num_blocks, dtype=np.int64)  # row of each decoded block's first image in `flat`
    first[blocks] = np.cumsum([0] + [counts[b] for b in blocks[:-1]])
    k = np.asarray(wanted, dtype=np.int64)
    picked = flat[first[k // header.rows] + k % header.rows]
    dtype = np.uint8 if header.levels <= 256 else np.int32
    return picked.astype(dtype).reshape(len(wanted), *header.image_shape)


def read_header(data: bytes) -> Header:
    """The header of a compressed file (checked)."""
    return unpack(data)[0]


def save_compressed(path: str | Path, data: bytes) -> Path:
    """Write a compressed file atomically."""
    return atomic_write(path, lambda p: p.write_bytes(data))


def load_compressed(path: str | Path) -> bytes:
    """Read a compressed file's bytes (a clear error when it is missing)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"compressed file not found: {p}")
    return p.read_bytes()


def _run(
    tables: PixelTables,
    log_weights: torch.Tensor,
    blocks: list[int],
    counts: list[int],
    rows: int,
    step: Step,
    threads: int | None,
    progress: bool,
    desc: str,
) -> None:
    """Pixel by pixel: ``probs = predict``, ``symbols = step(b, i, probs)``, ``update``, for every block.

    One MKL thread per product (determinism); ``threads`` workers each take a share of the blocks and
    run all pixels on it with their own ``P_i`` (no synchronization per pixel)."""
    threads = max(1, min(threads or torch.get_num_threads(), len(blocks)))
    shares = [blocks[t::threads] for t in range(threads)]
    per_group = max(1, STATE_BUDGET // (rows * tables.num_components * 8))  # at most [rows, N] float64 a block
    bar = tqdm(total=len(blocks) * tables.num_pixels, desc=desc, unit="px", disable=not progress, leave=False)

    def work(share: list[int]) -> None:
        """One worker: its blocks in groups whose state fits ``STATE_BUDGET``, all pixels per group."""
        upd_np = np.empty((tables.levels, tables.num_components), dtype=np.float32)  # pixel i's tables, refilled
        upd, gemm_t = torch.from_numpy(upd_np), torch.empty(tables.num_components, tables.levels)
        for g in range(0, len(share), per_group):
            states = {b: BlockState(log_weights, counts[b]) for b in share[g : g + per_group]}
            for i in range(tables.num_pixels):
                prob_tables(tables, i, upd_np, gemm_t)
                for b, state in states.items():
                    state.update(upd, step(b, i, state.predict(gemm_t)))
                bar.update(len(states))

    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if threads == 1:
            work(shares[0])
        else:
            with ThreadPoolExecutor(threads, initializer=torch.set_num_threads, initargs=(1,)) as pool:
                list(pool.map(work, shares))
    finally:
        torch.set_num_threads(prev)
        bar.close()


_DIGESTS: weakref.WeakKeyDictionary[MixtureCircuit, tuple[tuple, str]] = weakref.WeakKeyDictionary()


def _identity(circuit: MixtureCircuit, tables: PixelTables) -> str:
    """The circuit's SHA-256, cached per circuit object while its tensors are unchanged (same storage, same
    in-place version counter): hashing a 3 GB table takes seconds."""
    ts = [*circuit.leaf.tensors().values(), circuit.log_weights]
    key = tuple((t.data_ptr(), t._version, tuple(t.shape)) for t in ts)
    try:
        hit = _DIGESTS.get(circuit)
    except TypeError:  # an object without weak references (a duck-typed circuit): no cache
        return circuit_digest(tables, circuit.log_weights, circuit.leaf.kind)
    if hit is None or hit[0] != key:
        hit = (key, circuit_digest(tables, circuit.log_weights, circuit.leaf.kind))
        _DIGESTS[circuit] = hit
    return hit[1]


def _counts(header: Header) -> list[int]:
    """Images in each block."""
    return [min(header.rows, header.count - b * header.rows) for b in range(header.num_blocks)]


def _images(images: object, s: int, levels: int, circuit: MixtureCircuit) -> tuple[np.ndarray, tuple[int, ...]]:
    """``[B, S]`` int32 levels and the per-image shape to store."""
    t = images if isinstance(images, torch.Tensor) else torch.as_tensor(np.asarray(images))
    if t.dtype == torch.bool or t.is_complex():
        raise ValueError(f"images must hold integer levels, got dtype {t.dtype}")
    x = validate.rows(t, s, "images")
    validate.check_levels(x, levels, "images")
    shape = tuple(int(v) for v in t.shape[1:]) if t.dim() > 2 else None
    meta_shape = getattr(circuit, "meta", {}).get("image_shape")
    if shape is None:
        shape = tuple(int(v) for v in meta_shape) if meta_shape and math.prod(meta_shape) == s else (s,)
    return np.ascontiguousarray(x.numpy().astype(np.int32)), shape


def _indices(indices: Sequence[int] | None, count: int) -> list[int]:
    if indices is None:
        return list(range(count))
    out = [int(k) for k in indices]
    bad = [k for k in out if not 0 <= k < count]
    if bad or not out:
        raise ValueError(f"image indices must lie in [0, {count - 1}] (got {bad[:3] or 'none'})")
    return out


def dataset_images(circuit: MixtureCircuit, v: torch.Tensor, levels: int) -> torch.Tensor:
    """A dataset's integer images ``v`` (``levels`` levels) as the circuit's levels: binarized for a Bernoulli
    circuit (``v >= L/2``, the data module's convention), as they are for a categorical one with the same ``L``."""
    kind = circuit.leaf.kind
    if kind == "bernoulli":
        return to_model_space(v, "bernoulli", levels).long()
    ours = getattr(circuit.leaf, "num_levels", None)
    if ours is not None and ours != levels:
        raise ValueError(f"the images have {levels} levels; the circuit models {ours}")
    return v.long()
