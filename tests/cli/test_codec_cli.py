"""`vq2pc compress` / `vq2pc decompress`: a round trip through files, random access, one-line errors."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from vq2pc.circuit import MixtureCircuit
from vq2pc.cli import main
from vq2pc.core.leaves import Categorical

pytest.importorskip("constriction")


@pytest.fixture(scope="module")
def compressed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """20 images [20, 1, 6, 6] sampled from a random 16-component categorical circuit (5 levels), compressed
    in chunks of 16 rows; the command's exit code and JSON summary."""
    tmp = tmp_path_factory.mktemp("codec")
    g = torch.Generator().manual_seed(0)
    c = MixtureCircuit(
        Categorical(torch.randn(16, 36, 5, generator=g)), torch.zeros(16), meta={"image_shape": [1, 6, 6]}
    )
    c.save(tmp / "c.safetensors")
    x = c.sample(20, generator=g).long().reshape(20, 1, 6, 6).numpy().astype(np.uint8)
    np.save(tmp / "x.npy", x)
    argv = ["compress", str(tmp / "c.safetensors"), "--images", str(tmp / "x.npy"), "--rows", "16"]
    with contextlib.redirect_stdout(io.StringIO()) as out:
        code = main([*argv, "--out", str(tmp / "x.vq2pc"), "--no-progress"])
    return {"tmp": tmp, "x": x, "code": code, "summary": json.loads(out.getvalue())}


def _decompress(tmp: Path, circuit: str, out: str, *options: str) -> int:
    """`vq2pc decompress` of the fixture's file with the circuit ``circuit``, written to ``out``."""
    return main(
        ["decompress", str(tmp / circuit), str(tmp / "x.vq2pc"), *options, "--out", str(tmp / out), "--no-progress"]
    )


def test_compress_writes_a_summary(compressed: dict[str, Any]) -> None:
    summary = compressed["summary"]
    assert compressed["code"] == 0
    assert summary["images"] == 20 and summary["bytes"] == (compressed["tmp"] / "x.vq2pc").stat().st_size
    assert {"bits_per_pixel", "model_bpd", "seconds"} <= set(summary)


def test_decompress_gives_back_every_image(compressed: dict[str, Any]) -> None:
    tmp = compressed["tmp"]
    assert _decompress(tmp, "c.safetensors", "y.npy") == 0
    assert np.array_equal(np.load(tmp / "y.npy"), compressed["x"])


def test_decompress_a_range_reads_only_its_images(compressed: dict[str, Any]) -> None:
    tmp = compressed["tmp"]
    assert _decompress(tmp, "c.safetensors", "z.npy", "--images-range", "17:25") == 0
    assert np.array_equal(np.load(tmp / "z.npy"), compressed["x"][17:20])


def test_decompress_with_another_circuit_is_one_line_error(
    compressed: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    tmp = compressed["tmp"]
    other = MixtureCircuit(
        Categorical(torch.randn(16, 36, 5, generator=torch.Generator().manual_seed(1))), torch.zeros(16)
    )
    other.save(tmp / "o.safetensors")
    capsys.readouterr()
    assert _decompress(tmp, "o.safetensors", "w.npy") == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("vq2pc decompress: error: compressed file was made with another circuit") and "\n" not in err
    assert not (tmp / "w.npy").exists()
