"""The `vq2pc sample` / `vq2pc inpaint` verbs on a tiny saved circuit."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from vq2pc.circuit import MixtureCircuit
from vq2pc.cli import circuit as circuit_cli
from vq2pc.core.leaves import Gaussian


def main(argv: list[str]) -> int:
    """Run one of this module's verbs (isolated from the other verb modules, like `vq2pc.cli.main`)."""
    parser = argparse.ArgumentParser(prog="vq2pc")
    circuit_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ValueError as exc:
        print(f"vq2pc {args.command}: error: {exc}", file=sys.stderr)
        return 1


@pytest.fixture()
def circuit_path(tmp_path: Path) -> Path:
    g = torch.Generator().manual_seed(0)
    c = MixtureCircuit(
        Gaussian(torch.rand(5, 16, generator=g), 0.05 + 0.1 * torch.rand(5, 16, generator=g)),
        torch.zeros(5),
        meta={"image_shape": [1, 4, 4], "levels": 256},
    )
    return c.save(tmp_path / "c.safetensors")


def test_sample_writes_png_and_npy(tmp_path: Path, circuit_path: Path) -> None:
    rc = main(
        [
            "sample",
            str(circuit_path),
            "--num-samples",
            "9",
            "--out",
            str(tmp_path / "s.png"),
            "--npy",
            str(tmp_path / "s.npy"),
        ]
    )
    assert rc == 0
    assert (tmp_path / "s.png").stat().st_size > 0
    assert np.load(tmp_path / "s.npy").shape == (9, 1, 4, 4)


def test_inpaint_reports_json(tmp_path: Path, circuit_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    c = MixtureCircuit.load(circuit_path)
    images = c.sample(6, generator=torch.Generator().manual_seed(1)).reshape(6, 1, 4, 4).numpy()
    np.save(tmp_path / "x.npy", images)
    rc = main(
        [
            "inpaint",
            str(circuit_path),
            "--images",
            str(tmp_path / "x.npy"),
            "--mask",
            "center",
            "--out",
            str(tmp_path / "i.png"),
        ]
    )
    assert rc == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["images"] == 6 and np.isfinite(report["conditional_bpd_hidden"])
    assert report["mse_conditional_mean_model_space"] >= 0 and (tmp_path / "i.png").is_file()


def test_bad_circuit_file_is_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "bad.safetensors").write_bytes(b"not a circuit")
    assert main(["sample", str(tmp_path / "bad.safetensors"), "--out", str(tmp_path / "s.png")]) == 1
    assert "error" in capsys.readouterr().err
