"""The `vq2pc` training verbs with their options: quantizers, fine-tuning, discretized leaves."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cli_stages import distill_argv, run_stage
from test_cli import DATA, last_json, run_cli

from vq2pc.circuit import MixtureCircuit
from vq2pc.core.checkpoint import load_checkpoint
from vq2pc.data import load_dataset


def test_train_vqvae_with_gmvq_quantizer_and_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["train-vqvae", *DATA, "--epochs", "1", "--hidden", "8", "--K", "4", "--D", "4", "--res-blocks", "0"]
    code, _, err = run_cli(
        [
            *base,
            "--quantizer",
            "gmvq",
            "--quantizer-opt",
            "alpha=2.0",
            "--quantizer-opt",
            "kmeans_init=true",
            "--out",
            str(tmp_path / "g.pt"),
        ],
        capsys,
    )
    assert code == 0, err
    cfg = load_checkpoint(tmp_path / "g.pt", "vqvae")["meta"]["config"]
    assert cfg["quantizer"] == "gmvq" and cfg["quantizer_opts"] == {"alpha": 2.0, "kmeans_init": True}
    code, _, err = run_cli(
        [*base, "--quantizer", "gmvq", "--quantizer-opt", "alpha", "--out", str(tmp_path / "h.pt")], capsys
    )
    assert code == 1 and "KEY=VALUE" in err and not (tmp_path / "h.pt").exists()


def _finetune(
    stages: dict[str, Any], out: Path, capsys: pytest.CaptureFixture[str], *options: str
) -> tuple[int, str, str]:
    """`vq2pc finetune` of the session's VQ-VAE and prior with ``options``, written to ``out``."""
    run_stage(stages, "train-prior", capsys)
    files = stages["files"]
    models = ["--vqvae", str(files["vqvae"]), "--prior", str(files["prior"])]
    return run_cli(["finetune", *models, *DATA, *options, "--out", str(out)], capsys)


def test_finetune_verb_improves_validation_and_writes_a_circuit(
    stages: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "ft.safetensors"
    options = ["-N", "12", "--epochs", "2", "--lr", "3e-3", "--schedule", "cosine", "--batch-size", "25"]
    code, stdout, err = _finetune(stages, out, capsys, *options, "--top-k", "2")
    assert code == 0, err
    result = last_json(stdout)
    circuit = MixtureCircuit.load(out)
    assert result["N"] == len(circuit) == 12 and circuit.meta["finetune"]["best_epoch"] == result["best_epoch"]
    assert result["settings"]["schedule"] == circuit.meta["finetune"]["schedule"] == "cosine"
    assert result["best_val_log_prob"] >= result["start_val_log_prob"] and result["epochs_run"] >= 1


def test_finetune_verb_refuses_bad_settings_in_one_line(
    stages: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bad.safetensors"
    code, _, err = _finetune(stages, out, capsys, "--grad-components", "random", "--subset", "0")
    assert code != 0 and "subset must be >= 1, got 0" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_finetune_verb_discretized_writes_integer_level_leaves(
    stages: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "d.safetensors"
    code, stdout, err = _finetune(
        stages, out, capsys, "--N", "12", "--epochs", "1", "--batch-size", "50", "--discretized"
    )
    assert code == 0, err
    assert last_json(stdout)["settings"]["discretized"] == 17
    assert MixtureCircuit.load(out).leaf.kind == "discretized-gaussian"


def test_discretized_distill_evaluates_sample_and_inpaint_on_levels(
    stages: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`distill --discretized`: integer-level circuit whose BPD is the Gaussian circuit's discrete BPD."""
    gauss = run_stage(stages, "evaluate", capsys)
    assert gauss["test_bpd_discrete"] < gauss["test_bpd"]
    out_file = tmp_path / "d.safetensors"
    files = stages["files"]
    code, out, err = run_cli(distill_argv(files, out_file, "--strategy", "exhaustive", "--discretized"), capsys)
    assert code == 0, err
    assert MixtureCircuit.load(out_file).leaf.kind == "discretized-gaussian"
    code, out, err = run_cli(["evaluate", str(out_file), *DATA], capsys)
    assert code == 0, err
    assert last_json(out)["test_bpd"] == pytest.approx(gauss["test_bpd_discrete"], rel=1e-4)
    code, out, err = run_cli(
        ["sample", str(out_file), "--n", "4", "--out", str(tmp_path / "s.png"), "--npy", str(tmp_path / "s.npy")],
        capsys,
    )
    assert code == 0, err
    draws = np.load(tmp_path / "s.npy")
    assert draws.min() >= 0 and draws.max() <= 16 and (draws == np.round(draws)).all()
    np.save(tmp_path / "x.npy", load_dataset("digits", None, seed=0, limit=100).test_x[:3].numpy())
    code, out, err = run_cli(
        [
            "inpaint",
            str(out_file),
            "--images",
            str(tmp_path / "x.npy"),
            "--mask",
            "bottom",
            "--out",
            str(tmp_path / "i.png"),
        ],
        capsys,
    )
    assert code == 0, err
