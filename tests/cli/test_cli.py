"""The `vq2pc` command line through `vq2pc.cli.main`: help texts, one-line errors, the stage verbs chained."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from vq2pc.circuit import MixtureCircuit
from vq2pc.circuit.classes import ClassMixture
from vq2pc.cli import build_parser, main
from vq2pc.core.checkpoint import load_checkpoint
from vq2pc.data import load_dataset
from vq2pc.evaluate.density import test_bpd
from vq2pc.models.priors.pixelcnn import PixelCNNPrior, PriorConfig

VERBS = [
    "run",
    "train-vqvae",
    "train-prior",
    "train-baseline",
    "distill",
    "finetune",
    "evaluate",
    "usage",
    "sample",
    "inpaint",
    "classify",
    "refine",
    "export",
    "compress",
    "decompress",
]
DATA = ["--limit", "100", "--seed", "0"]


def squash(text: str) -> str:
    """Whitespace-normalized text (argparse re-wraps paragraphs to the terminal width)."""
    return " ".join(text.split())


def verb_parsers() -> dict[str, Any]:
    """The sub-parser of every verb, by name."""
    parser = build_parser()
    return dict(parser._subparsers._group_actions[0].choices)  # argparse has no public accessor


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """``main(argv)`` -> (exit code, stdout, stderr); ``--help`` exits through SystemExit."""
    try:
        code = main(argv)
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def last_json(out: str) -> dict[str, Any]:
    return json.loads(out.strip().splitlines()[-1])


def test_top_level_help_lists_every_verb(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(["--help"], capsys)
    assert code == 0
    assert "Distill a VQ-VAE into a tractable probabilistic circuit" in squash(out)
    for verb in VERBS:
        assert f"    {verb}" in out, verb
    assert set(verb_parsers()) == set(VERBS)


def test_no_verb_prints_help_and_fails(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli([], capsys)
    assert code == 2 and "usage: vq2pc" in out


@pytest.mark.parametrize("verb", VERBS)
def test_verb_help_prints_its_description(verb: str, capsys: pytest.CaptureFixture[str]) -> None:
    description = verb_parsers()[verb].description
    code, out, _ = run_cli([verb, "--help"], capsys)
    assert code == 0 and out.startswith(f"usage: vq2pc {verb}")
    assert description, f"`vq2pc {verb}` has no description"
    assert squash(description) in squash(out)


def test_missing_config_is_one_line_error(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(["run", "--config", "nonexistent.yaml"], capsys)
    assert code == 1 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("vq2pc run: error: ") and "nonexistent.yaml" in lines[0]
    assert "Traceback" not in err


@pytest.fixture(scope="module")
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
        "distill": [
            "distill",
            "--vqvae",
            str(files["vqvae"]),
            "--prior",
            str(files["prior"]),
            "--strategy",
            "exhaustive",
            "--classes",
            "--out",
            str(files["circuit"]),
        ],
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
    """Run ``verb`` once per module (the chain's earlier verbs first), returning its JSON line."""
    for earlier in list(EXPECTED_KEYS)[: list(EXPECTED_KEYS).index(verb) + 1]:
        if earlier not in stages["outputs"]:
            code, out, err = run_cli(stages["argvs"][earlier], capsys)
            assert code == 0, err
            stages["outputs"][earlier] = last_json(out)
    return stages["outputs"][verb]


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


def test_transformer_prior_trains_distills_and_reports_usage(
    stages: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`train-prior --prior transformer`; `distill` and `usage` load either prior from its checkpoint."""
    run_stage(stages, "train-vqvae", capsys)
    vqvae, prior = str(stages["files"]["vqvae"]), tmp_path / "tf.pt"
    code, out, err = run_cli(
        [
            "train-prior",
            *DATA,
            "--epochs",
            "1",
            "--vqvae",
            vqvae,
            "--prior",
            "transformer",
            "--hidden",
            "8",
            "--layers",
            "1",
            "--heads",
            "2",
            "--out",
            str(prior),
        ],
        capsys,
    )
    assert code == 0, err
    assert last_json(out)["prior"] == "transformer"
    assert load_checkpoint(prior, "transformer-prior")["meta"]["config"]["heads"] == 2
    code, out, err = run_cli(
        [
            "distill",
            "--vqvae",
            vqvae,
            "--prior",
            str(prior),
            "--strategy",
            "beam",
            "--components",
            "20",
            "--starts",
            "1",
            "--out",
            str(tmp_path / "c.safetensors"),
        ],
        capsys,
    )
    assert code == 0, err
    assert 0 < last_json(out)["N"] <= 20
    code, out, err = run_cli(["usage", "--prior", str(prior), "--out", str(tmp_path / "u.png")], capsys)
    assert code == 0 and last_json(out)["space_size"] == 256, err
    code, out, err = run_cli(
        [
            "train-prior",
            *DATA,
            "--vqvae",
            vqvae,
            "--prior",
            "transformer",
            "--hidden",
            "10",
            "--heads",
            "4",
            "--out",
            str(tmp_path / "bad.pt"),
        ],
        capsys,
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
    code, _, err = run_cli(
        [
            "distill",
            "--vqvae",
            str(files["vqvae"]),
            "--prior",
            str(files["prior"]),
            "--strategy",
            "exhaustive",
            "--std-min",
            "0.05",
            "--out",
            str(out_path),
        ],
        capsys,
    )
    assert code == 0, err
    floored = MixtureCircuit.load(out_path)
    assert floored.meta["std_floor"] == 0.05 and float(floored.leaf.scale.min()) >= 0.05
    code, _, err = run_cli(
        [
            "distill",
            "--vqvae",
            str(files["vqvae"]),
            "--prior",
            str(files["prior"]),
            "--std-min",
            "-1",
            "--out",
            str(tmp_path / "bad.safetensors"),
        ],
        capsys,
    )
    assert code == 1 and "std_floor must be a positive" in err and not (tmp_path / "bad.safetensors").exists()


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


def test_finetune_verb_improves_validation_and_writes_a_circuit(
    stages: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_stage(stages, "train-prior", capsys)
    files, out = stages["files"], tmp_path / "ft.safetensors"
    code, stdout, err = run_cli(
        [
            "finetune",
            "--vqvae",
            str(files["vqvae"]),
            "--prior",
            str(files["prior"]),
            *DATA,
            "-N",
            "12",
            "--epochs",
            "2",
            "--lr",
            "3e-3",
            "--schedule",
            "cosine",
            "--batch-size",
            "25",
            "--top-k",
            "2",
            "--out",
            str(out),
        ],
        capsys,
    )
    assert code == 0, err
    result = last_json(stdout)
    circuit = MixtureCircuit.load(out)
    assert result["N"] == len(circuit) == 12 and circuit.meta["finetune"]["best_epoch"] == result["best_epoch"]
    assert result["settings"]["schedule"] == circuit.meta["finetune"]["schedule"] == "cosine"
    assert result["best_val_log_prob"] >= result["start_val_log_prob"] and result["epochs_run"] >= 1
    code, _, err = run_cli(
        [
            "finetune",
            "--vqvae",
            str(files["vqvae"]),
            "--prior",
            str(files["prior"]),
            *DATA,
            "--grad-components",
            "random",
            "--subset",
            "0",
            "--out",
            str(tmp_path / "bad.safetensors"),
        ],
        capsys,
    )
    assert code != 0 and "fine-tuning" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "bad.safetensors").exists()
    code, stdout, err = run_cli(
        [
            "finetune",
            "--vqvae",
            str(files["vqvae"]),
            "--prior",
            str(files["prior"]),
            *DATA,
            "--N",
            "12",
            "--epochs",
            "1",
            "--batch-size",
            "50",
            "--discretized",
            "--out",
            str(tmp_path / "d.safetensors"),
        ],
        capsys,
    )
    assert code == 0, err
    assert last_json(stdout)["settings"]["discretized"] == 17
    assert MixtureCircuit.load(tmp_path / "d.safetensors").leaf.kind == "discretized-gaussian"


def test_discretized_distill_evaluates_sample_and_inpaint_on_levels(
    stages: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`distill --discretized`: integer-level circuit whose BPD is the Gaussian circuit's discrete BPD."""
    gauss = run_stage(stages, "evaluate", capsys)
    assert gauss["test_bpd_discrete"] < gauss["test_bpd"]
    out_file = tmp_path / "d.safetensors"
    files = stages["files"]
    code, out, err = run_cli(
        [
            "distill",
            "--vqvae",
            str(files["vqvae"]),
            "--prior",
            str(files["prior"]),
            "--strategy",
            "exhaustive",
            "--discretized",
            "--out",
            str(out_file),
        ],
        capsys,
    )
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
