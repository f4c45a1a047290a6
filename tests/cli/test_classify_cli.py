"""`vq2pc classify` and `sample` / `inpaint --class` on a tiny class-aware circuit."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from vq2pc.circuit.classes import ClassMixture
from vq2pc.circuit.mixture import MixtureCircuit
from vq2pc.cli import main
from vq2pc.core.leaves import Gaussian


@pytest.fixture()
def class_circuit(tmp_path: Path) -> tuple[Path, ClassMixture]:
    """N = 4 components on 16 pixels, C = 2 classes: components 0, 1 belong to class 0, components 2, 3 to class 1."""
    g = torch.Generator().manual_seed(0)
    circuit = MixtureCircuit(
        Gaussian(torch.rand(4, 16, generator=g), 0.05 + 0.1 * torch.rand(4, 16, generator=g)),
        torch.zeros(4),
        meta={"image_shape": [1, 4, 4], "levels": 256},
    )
    log_w = torch.tensor([[0.0, -9.0], [0.0, -9.0], [-9.0, 0.0], [-9.0, 0.0]])
    cm = ClassMixture(circuit, log_w)
    return cm.save(tmp_path / "c.safetensors"), cm


def test_classify_prints_exact_posteriors(tmp_path: Path, class_circuit, capsys: pytest.CaptureFixture[str]) -> None:
    path, cm = class_circuit
    x = torch.cat(
        [
            cm.sample(3, c=0, generator=torch.Generator().manual_seed(1)),
            cm.sample(3, c=1, generator=torch.Generator().manual_seed(2)),
        ]
    )
    np.save(tmp_path / "x.npy", x.reshape(6, 1, 4, 4).numpy())
    mask = np.zeros((1, 4, 4), dtype=bool)
    mask[:, :2] = True  # top half observed
    np.save(tmp_path / "m.npy", mask)
    assert main(["classify", str(path), "--images", str(tmp_path / "x.npy"), "--mask", str(tmp_path / "m.npy")]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    want = cm.class_posterior(x, torch.from_numpy(mask).reshape(16)).exp()
    assert out["images"] == 6 and out["classes"] == 2 and out["observed_fraction"] == 0.5
    assert np.allclose(out["probabilities"], want.numpy(), atol=1e-5)
    assert out["predictions"] == want.argmax(1).tolist()


def test_sample_and_inpaint_take_a_class(tmp_path: Path, class_circuit, capsys: pytest.CaptureFixture[str]) -> None:
    path, cm = class_circuit
    assert (
        main(
            [
                "sample",
                str(path),
                "--n",
                "4",
                "--class",
                "1",
                "--out",
                str(tmp_path / "s.png"),
                "--npy",
                str(tmp_path / "s.npy"),
            ]
        )
        == 0
    )
    assert np.load(tmp_path / "s.npy").shape == (4, 1, 4, 4)
    np.save(tmp_path / "x.npy", cm.sample(5, c=0).reshape(5, 1, 4, 4).numpy())
    assert (
        main(
            [
                "inpaint",
                str(path),
                "--images",
                str(tmp_path / "x.npy"),
                "--class",
                "0",
                "--out",
                str(tmp_path / "i.png"),
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["class"] == 0 and np.isfinite(out["conditional_bpd_hidden"])


def test_bad_class_and_mask_are_one_line_errors(
    tmp_path: Path, class_circuit, capsys: pytest.CaptureFixture[str]
) -> None:
    path, cm = class_circuit
    np.save(tmp_path / "x.npy", cm.sample(2, c=0).reshape(2, 1, 4, 4).numpy())
    np.save(tmp_path / "m.npy", np.ones((3, 3), dtype=bool))
    assert main(["classify", str(path), "--images", str(tmp_path / "x.npy"), "--mask", str(tmp_path / "m.npy")]) == 1
    assert main(["sample", str(path), "--n", "2", "--class", "5", "--out", str(tmp_path / "s.png")]) == 1
    cm.model.save(tmp_path / "plain.safetensors")
    assert main(["classify", str(tmp_path / "plain.safetensors"), "--images", str(tmp_path / "x.npy")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and "mask has shape (3, 3)" in err[0]
    assert "class index 5 is out of range" in err[1] and "no class weights" in err[2]
