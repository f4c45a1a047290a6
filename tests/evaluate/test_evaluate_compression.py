"""The compression report: the circuit's file against its own BPD, and the standard codecs' sizes."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch

from vq2pc import Categorical, MixtureCircuit
from vq2pc.evaluate.compression import circuit_compression, standard_codecs

pytest.importorskip("constriction")


def test_circuit_file_matches_the_model_bpd() -> None:
    g = torch.Generator().manual_seed(0)
    c = MixtureCircuit(Categorical(torch.randn(32, 36, 8, generator=g) * 2), torch.zeros(32))
    x = c.sample(64, generator=g).long()
    r = circuit_compression(c, x, rows=32, threads=1)
    assert r["images"] == 64 and r["file_bytes"] * 8 == pytest.approx(r["bits_per_pixel"] * 64 * 36)
    # code words: within 2 words per block of -log2 p̂ (the bound of the coder module, far from tight here)
    assert abs(r["code_bits_per_pixel"] - r["model_bpd"]) * 64 * 36 <= 2 * 64 + 1
    assert r["bits_per_pixel"] > r["code_bits_per_pixel"]  # the header and index come on top


def test_standard_codecs_measure_or_say_why() -> None:
    imgs = np.zeros((3, 28, 28), dtype=np.uint8)
    imgs[:, 10:18, 10:18] = 255
    out = standard_codecs(imgs)
    assert set(out) == {"png", "webp", "jpeg_xl", "jpeg_xl_effort9", "gzip", "xz"}
    assert out["gzip"]["bytes"] == len(gzip.compress(imgs.tobytes(), compresslevel=9))
    assert out["png"]["measured"] and 0 < out["png"]["bits_per_pixel"] < 8
    assert all(r["measured"] or r["why"] for r in out.values())
