"""`vq2pc compress` / `vq2pc decompress`: a round trip through files, random access, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from vq2pc.circuit import MixtureCircuit
from vq2pc.cli import main
from vq2pc.core.leaves import Categorical

pytest.importorskip("constriction")


def test_compress_then_decompress(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    g = torch.Generator().manual_seed(0)
    c = MixtureCircuit(
        Categorical(torch.randn(16, 36, 5, generator=g)), torch.zeros(16), meta={"image_shape": [1, 6, 6]}
    )
    c.save(tmp_path / "c.safetensors")
    x = c.sample(20, generator=g).long().reshape(20, 1, 6, 6).numpy().astype(np.uint8)
    np.save(tmp_path / "x.npy", x)
    assert (
        main(
            [
                "compress",
                str(tmp_path / "c.safetensors"),
                "--images",
                str(tmp_path / "x.npy"),
                "--rows",
                "16",
                "--out",
                str(tmp_path / "x.vq2pc"),
                "--no-progress",
            ]
        )
        == 0
    )
    summary = json.loads(capsys.readouterr().out)
    assert summary["images"] == 20 and summary["bytes"] == (tmp_path / "x.vq2pc").stat().st_size
    assert {"bits_per_pixel", "model_bpd", "seconds"} <= set(summary)
    assert (
        main(
            [
                "decompress",
                str(tmp_path / "c.safetensors"),
                str(tmp_path / "x.vq2pc"),
                "--out",
                str(tmp_path / "y.npy"),
                "--no-progress",
            ]
        )
        == 0
    )
    assert np.array_equal(np.load(tmp_path / "y.npy"), x)
    assert (
        main(
            [
                "decompress",
                str(tmp_path / "c.safetensors"),
                str(tmp_path / "x.vq2pc"),
                "--images-range",
                "17:25",
                "--out",
                str(tmp_path / "z.npy"),
                "--no-progress",
            ]
        )
        == 0
    )
    assert np.array_equal(np.load(tmp_path / "z.npy"), x[17:20])
    other = MixtureCircuit(Categorical(torch.randn(16, 36, 5, generator=g)), torch.zeros(16))
    other.save(tmp_path / "o.safetensors")
    capsys.readouterr()
    assert (
        main(
            [
                "decompress",
                str(tmp_path / "o.safetensors"),
                str(tmp_path / "x.vq2pc"),
                "--out",
                str(tmp_path / "w.npy"),
                "--no-progress",
            ]
        )
        == 1
    )
    err = capsys.readouterr().err.strip()
    assert err.startswith("vq2pc decompress: error: compressed file was made with another circuit") and "\n" not in err
    assert not (tmp_path / "w.npy").exists()
