"""The stage verbs of the `vq2pc` command line chained on 100 digits: train-vqvae, train-prior, distill, evaluate,
usage, sample and inpaint."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from cli_stages import EXPECTED_KEYS, distill_argv, run_stage
from test_cli import DATA, last_json, run_cli

from vq2pc.circuit import MixtureCircuit
from vq2pc.circuit.classes import ClassMixture
from vq2pc.core.checkpoint import load_checkpoint
from vq2pc.data import load_dataset
from vq2pc.evaluate.density import test_bpd
from vq2pc.models.priors.pixelcnn import PixelCNNPrior, PriorConfig


@pytest.mark.parametrize("verb", list(EXPECTED_KEYS))
def test_stage_verbs_chain(verb: str, stages: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    result = run_stage(stages, verb, capsys)
    files = stages["files"]
    assert EXPECTED_KEYS[verb] <= result.keys(), result
    if verb == "train-vqvae":
        assert result["epochs"] == 1 and math.isfinite(result["best_val_loss"])
        payload = load_checkpoint(files["vqvae"], "vqvae")
        assert payload["meta"]["config"]["K"] == 4 and payload["meta"]["config"]["hidden"] == 8
    elif verb == "train-prior":
        payload = load_checkpoint(files["prior"], "prior")
        assert payload["meta"]["config"]["K"] == 4 and payload["meta"]["config"]["num_classes"] == 10
    elif verb == "distill":
        circuit = MixtureCircuit.load(files["circuit"])
        assert result["N"] == len(circuit) == 4**4 and result["strategy"] == "exhaustive"
        assert circuit.meta["image_shape"] == [1, 8, 8] and circuit.meta["levels"] == 17
        assert abs(float(torch.logsumexp(circuit.log_weights.double(), 0))) < 1e-6
        assert result["classes"] == ClassMixture.load(files["circuit"]).num_classes == 10  # --classes
    elif verb == "evaluate":
        assert result["N"] == 256 and math.isfinite(result["test_bpd"]) and result["test_bpd"] > 0
        splits = load_dataset("digits", None, seed=0, limit=100)
        bpd = test_bpd(
            MixtureCircuit.load(files["circuit"]),
            splits.test_x,
            "gaussian",
            splits.levels,
            draws=2,
            generator=torch.Generator().manual_seed(0),
        )
        assert result["test_bpd"] == pytest.approx(bpd["mean"], abs=1e-9)
    else:
        assert result["space_size"] == 256 and 0 < result["fraction_90"] <= result["fraction_99"] <= 1
        assert files["usage"].is_file() and files["usage"].stat().st_size > 0


def test_distill_with_mismatched_prior_is_one_line_error(
    stages: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_stage(stages, "train-vqvae", capsys)
    other = PixelCNNPrior(PriorConfig(K=5, latent_hw=(2, 2), num_classes=10, hidden=8, layers=1))
    other.save(tmp_path / "prior5.pt")
    code, out, err = run_cli(
        [
            "distill",
            "--vqvae",
            str(stages["files"]["vqvae"]),
            "--prior",
            str(tmp_path / "prior5.pt"),
            "--out",
            str(tmp_path / "c.safetensors"),
        ],
        capsys,
    )
    assert code == 1 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vq2pc distill: error: "), err
    assert "K=5" in lines[0] and "K=4" in lines[0]
    assert not (tmp_path / "c.safetensors").exists()


def _train_transformer(
    vqvae: str, out: Path, capsys: pytest.CaptureFixture[str], *options: str
) -> tuple[int, str, str]:
    """`train-prior --prior transformer` on the session's VQ-VAE, written to ``out``."""
    return run_cli(
        ["train-prior", *DATA, "--vqvae", vqvae, "--prior", "transformer", *options, "--out", str(out)], capsys
    )


def test_transformer_prior_trains_distills_and_reports_usage(
    stages: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`train-prior --prior transformer`; `distill` and `usage` load either prior from its checkpoint."""
    run_stage(stages, "train-vqvae", capsys)
    vqvae, prior = str(stages["files"]["vqvae"]), tmp_path / "tf.pt"
    code, out, err = _train_transformer(
        vqvae, prior, capsys, "--epochs", "1", "--hidden", "8", "--layers", "1", "--heads", "2"
    )
    assert code == 0, err
    assert last_json(out)["prior"] == "transformer"
    assert load_checkpoint(prior, "transformer-prior")["meta"]["config"]["heads"] == 2
    beam = ["--strategy", "beam", "--components", "20", "--starts", "1"]
    code, out, err = run_cli(
        ["distill", "--vqvae", vqvae, "--prior", str(prior), *beam, "--out", str(tmp_path / "c.safetensors")], capsys
    )
    assert code == 0, err
    assert 0 < last_json(out)["N"] <= 20
    code, out, err = run_cli(["usage", "--prior", str(prior), "--out", str(tmp_path / "u.png")], capsys)
    assert code == 0 and last_json(out)["space_size"] == 256, err


def test_transformer_width_must_be_a_multiple_of_heads(
    stages: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_stage(stages, "train-vqvae", capsys)
    code, _, err = _train_transformer(
        str(stages["files"]["vqvae"]), tmp_path / "bad.pt", capsys, "--hidden", "10", "--heads", "4"
    )
    assert code == 1 and "multiple of heads" in err and len(err.strip().splitlines()) == 1


def test_sample_and_inpaint_on_distilled_circuit(
    stages: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_stage(stages, "distill", capsys)
    circuit = str(stages["files"]["circuit"])
    code, out, err = run_cli(
        ["sample", circuit, "-n", "9", "--out", str(tmp_path / "s.png"), "--npy", str(tmp_path / "s.npy")], capsys
    )
    assert code == 0, err
    assert last_json(out)["samples"] == 9
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert np.load(tmp_path / "s.npy").shape == (9, 1, 8, 8)

    images = load_dataset("digits", None, seed=0, limit=100).test_x[:6].numpy()  # uint8 levels [6, 1, 8, 8]
    np.save(tmp_path / "x.npy", images)
    code, out, err = run_cli(
        ["inpaint", circuit, "--images", str(tmp_path / "x.npy"), "--mask", "bottom", "--out", str(tmp_path / "i.png")],
        capsys,
    )
    assert code == 0, err
    report = last_json(out)
    assert report["images"] == 6 and report["mask"] == "bottom"
    assert math.isfinite(report["conditional_bpd_hidden"]) and report["mse_conditional_mean_model_space"] >= 0
    assert (tmp_path / "i.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_distill_std_floor_raises_small_stds(
    stages: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_stage(stages, "train-prior", capsys)
    files, out_path = stages["files"], tmp_path / "floored.safetensors"
    code, _, err = run_cli(distill_argv(files, out_path, "--strategy", "exhaustive", "--std-min", "0.05"), capsys)
    assert code == 0, err
    floored = MixtureCircuit.load(out_path)
    assert floored.meta["std_floor"] == 0.05 and float(floored.leaf.scale.min()) >= 0.05
    code, _, err = run_cli(distill_argv(files, tmp_path / "bad.safetensors", "--std-min", "-1"), capsys)
    assert code == 1 and "std_floor must be a positive" in err and not (tmp_path / "bad.safetensors").exists()
