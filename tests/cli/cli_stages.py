"""The chained stage verbs shared by the CLI test modules: one tiny VQ-VAE, prior and circuit per session."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from test_cli import DATA, last_json, run_cli


def distill_argv(files: dict[str, Path], out: Path, *options: str) -> list[str]:
    """``distill`` of the session's VQ-VAE and prior (``files``) with ``options``, writing ``out``."""
    return ["distill", "--vqvae", str(files["vqvae"]), "--prior", str(files["prior"]), *options, "--out", str(out)]


@pytest.fixture(scope="session")
def stages(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """train-vqvae -> train-prior -> distill (exhaustive) -> evaluate -> usage on 100 digits, one epoch each."""
    tmp = tmp_path_factory.mktemp("cli")
    files = {
        "vqvae": tmp / "vq.pt",
        "prior": tmp / "prior.pt",
        "circuit": tmp / "c.safetensors",
        "usage": tmp / "usage.png",
    }
    argvs = {
        "train-vqvae": [
            "train-vqvae",
            *DATA,
            "--epochs",
            "1",
            "--hidden",
            "8",
            "--K",
            "4",
            "--D",
            "4",
            "--res-blocks",
            "0",
            "--out",
            str(files["vqvae"]),
        ],
        "train-prior": [
            "train-prior",
            *DATA,
            "--epochs",
            "1",
            "--vqvae",
            str(files["vqvae"]),
            "--hidden",
            "8",
            "--layers",
            "1",
            "--out",
            str(files["prior"]),
        ],
        "distill": distill_argv(files, files["circuit"], "--strategy", "exhaustive", "--classes"),
        "evaluate": ["evaluate", str(files["circuit"]), *DATA, "--draws", "2"],
        "usage": ["usage", "--prior", str(files["prior"]), "--out", str(files["usage"])],
    }
    return {"tmp": tmp, "files": files, "argvs": argvs, "outputs": {}}


EXPECTED_KEYS = {
    "train-vqvae": {"checkpoint", "best_val_loss", "epochs", "num_params"},
    "train-prior": {"checkpoint", "best_val_nll_per_latent", "epochs"},
    "distill": {"circuit", "N", "num_params", "strategy"},
    "evaluate": {"circuit", "N", "test_bpd", "test_bpd_std"},
    "usage": {"space_size", "fraction_90", "fraction_99", "figure"},
}


def run_stage(stages: dict[str, Any], verb: str, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    """Run ``verb`` once per session (the chain's earlier verbs first), returning its JSON line."""
    for earlier in list(EXPECTED_KEYS)[: list(EXPECTED_KEYS).index(verb) + 1]:
        if earlier not in stages["outputs"]:
            code, out, err = run_cli(stages["argvs"][earlier], capsys)
            assert code == 0, err
            stages["outputs"][earlier] = last_json(out)
    return stages["outputs"][verb]
