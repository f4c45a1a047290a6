"""Lossless compression with a circuit against standard codecs, on the same integer images.

:func:`circuit_compression` codes images with :mod:`vq2pc.circuit.codec` (checking the round trip) and
sets the file's bits per pixel beside the circuit's own BPD on those images; :func:`standard_codecs`
measures per-image PNG (optimized), WebP lossless (method 6), JPEG XL lossless (when the
``pillow-jxl-plugin`` package is installed; else reported as not measured) and gzip -9 / xz -9e
of the whole set as one uint8 array. Pillow and the JPEG XL plugin are optional (``vq2pc[codec]``).
"""

from __future__ import annotations

import gzip
import io
import lzma
import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from vq2pc.circuit.codec import decode, encode, read_header
from vq2pc.circuit.codec.format import unpack

__all__ = ["circuit_compression", "standard_codecs"]


def circuit_compression(
    circuit: Any, images: torch.Tensor, *, rows: int = 64, threads: int | None = None, progress: bool = False
) -> dict[str, Any]:
    """Code ``images [n, ...]`` (integer levels of the circuit) and decode them back (must be bit-exact).

    Returns bits per pixel of the whole file and of the code words alone, the model BPD
    ``-log2 p̂(x) / S`` (mean over images), their gap, sizes, and encode/decode images per second."""
    n, s = int(images.shape[0]), circuit.num_variables
    flat = images.reshape(n, s).long()
    t0 = time.perf_counter()
    data = encode(circuit, images, rows=rows, threads=threads, progress=progress)
    t_enc = time.perf_counter() - t0
    t0 = time.perf_counter()
    back = decode(circuit, data, threads=threads, progress=progress)
    t_dec = time.perf_counter() - t0
    if not np.array_equal(back.reshape(n, s), flat.numpy()):
        raise RuntimeError("the decoded images differ from the originals")
    t0 = time.perf_counter()
    decode(circuit, data, indices=[n // 2], threads=threads)
    t_one = time.perf_counter() - t0
    log_p = torch.cat([circuit.log_prob(flat[i : i + 1024].float()).double() for i in range(0, n, 1024)])
    model_bpd = float(-log_p.mean() / (s * math.log(2)))
    _, offsets, _, start = unpack(data)
    payload_bpp = 8 * int(offsets[-1]) / (n * s)
    header = read_header(data)
    return {
        "images": n,
        "S": s,
        "levels": header.levels,
        "rows": rows,
        "file_bytes": len(data),
        "header_and_index_bytes": start,
        "bits_per_pixel": 8 * len(data) / (n * s),
        "code_bits_per_pixel": payload_bpp,
        "model_bpd": model_bpd,
        "code_excess_percent": 100 * (payload_bpp - model_bpd) / model_bpd,
        "file_excess_percent": 100 * (8 * len(data) / (n * s) - model_bpd) / model_bpd,
        "encode_images_per_s": n / t_enc,
        "decode_images_per_s": n / t_dec,
        "random_access_one_image_s": t_one,
        "threads": threads or torch.get_num_threads(),
    }


def standard_codecs(images: np.ndarray) -> dict[str, dict[str, Any]]:
    """Bits per pixel of standard lossless codecs on ``images [n, H, W]`` (uint8, one channel)."""
    arr = np.ascontiguousarray(images, dtype=np.uint8)
    n_px = arr.size
    out: dict[str, dict[str, Any]] = {}

    def row(name: str, size: Callable[[], int], settings: str) -> None:
        t0 = time.perf_counter()
        try:
            nbytes = size()
        except (ImportError, KeyError, OSError, ValueError) as exc:  # codec missing from this Pillow build
            out[name] = {"measured": False, "why": f"{type(exc).__name__}: {exc}", "settings": settings}
            return
        out[name] = {
            "measured": True,
            "bytes": nbytes,
            "bits_per_pixel": 8 * nbytes / n_px,
            "settings": settings,
            "seconds": round(time.perf_counter() - t0, 3),
        }

    row("png", lambda: _per_image(arr, "PNG", optimize=True), "per image, Pillow optimize=True")
    row(
        "webp",
        lambda: _per_image(arr, "WEBP", lossless=True, method=6, quality=100),
        "per image, Pillow lossless=True method=6 quality=100",
    )
    row("jpeg_xl", lambda: _jxl(arr, effort=7), "per image, pillow-jxl-plugin lossless=True effort=7 (default)")
    row("jpeg_xl_effort9", lambda: _jxl(arr, effort=9), "per image, pillow-jxl-plugin lossless=True effort=9")
    raw = arr.tobytes()
    row("gzip", lambda: len(gzip.compress(raw, compresslevel=9)), "whole set as one uint8 array, level 9")
    row("xz", lambda: len(lzma.compress(raw, preset=9 | lzma.PRESET_EXTREME)), "whole set as one uint8 array, -9e")
    return out


def _per_image(arr: np.ndarray, fmt: str, **kwargs: Any) -> int:
    from PIL import Image

    total = 0
    for a in arr:  # one file per image: the per-image codecs' own unit
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format=fmt, **kwargs)
        total += buf.tell()
    return total


def _jxl(arr: np.ndarray, effort: int) -> int:
    import pillow_jxl  # noqa: F401  (registers the JXL format with Pillow)

    return _per_image(arr, "JXL", lossless=True, effort=effort)
