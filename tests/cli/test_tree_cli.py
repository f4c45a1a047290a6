"""`vq2pc distill-tree` on a tiny categorical VQ-VAE and prior over the digits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import MNIST_DIR, needs_mnist
from test_cli import DATA, last_json, run_cli

from vq2pc.circuit import TreeCircuit
from vq2pc.circuit.tree_mixture import TreeMixture
from vq2pc.models.priors.pixelcnn import PixelCNNPrior, PriorConfig
from vq2pc.models.vqvae import VQVAE, VQVAEConfig


@pytest.fixture()
def run_dir(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    cfg = VQVAEConfig(image_shape=(1, 8, 8), levels=17, leaf="categorical", latent_hw=(2, 2), K=4, D=4, hidden=8)
    VQVAE(cfg).save(tmp_path / "vqvae.pt")
    return tmp_path


@pytest.mark.parametrize("source", ["encoded", "mixed"])
def test_distill_tree_writes_a_fitted_circuit(
    run_dir: Path, source: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    PixelCNNPrior(PriorConfig(K=4, latent_hw=(2, 2), num_classes=10, hidden=8, layers=1)).save(run_dir / "prior.pt")
    out = tmp_path / "tree.safetensors"
    argv = ["distill-tree", str(run_dir), *DATA, "--source", source, "--prior-samples", "50", "--iterations", "2"]
    code, stdout, err = run_cli([*argv, "--out", str(out)], capsys)
    assert code == 0, err
    row = last_json(stdout)
    assert row["K"] == 4 and row["grid"] == [2, 2] and row["val_bpd"] <= row["val_bpd_distilled"]
    c = TreeCircuit.load(out)
    assert c.meta["source"] == source and c.num_params == row["params"]


def test_distill_tree_names_a_missing_prior(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["distill-tree", str(run_dir), *DATA, "--source", "prior", "--out", str(tmp_path / "t.safetensors")]
    code, _, err = run_cli(argv, capsys)
    assert code == 1 and "no prior" in err and not (tmp_path / "t.safetensors").exists()


def test_distill_tree_from_kmeans_latents_with_tied_leaves(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "tree.safetensors"
    argv = ["distill-tree", *DATA, "--source", "kmeans", "--grid", "4", "4", "--K", "6", "--context", "1"]
    code, stdout, err = run_cli([*argv, "--leaf-bins", "4", "--iterations", "2", "--out", str(out)], capsys)
    assert code == 0, err
    row = last_json(stdout)
    assert row["grid"] == [4, 4] and row["K"] == 6 and row["leaf_bins"] == 4
    c = TreeCircuit.load(out)
    assert c.num_params == row["params"] == 5 + 15 * 6 * 5 + 64 * 6 * 3 + 64 * (17 - 4)
    leaves = c.log_params().leaves.exp()  # tied: levels 0 and 1 share a bin, their ratio is one per pixel
    assert torch.allclose(leaves[:, 0] / leaves[:, 1], (leaves[:, 0] / leaves[:, 1])[:, :1].expand(-1, 6), rtol=1e-4)


def test_distill_tree_needs_a_run_folder_for_vqvae_latents(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(["distill-tree", *DATA, "--out", str(tmp_path / "t.safetensors")], capsys)
    assert code == 1 and "needs a run folder" in err and not (tmp_path / "t.safetensors").exists()


def test_distill_tree_on_a_shifted_kmeans_grid(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "tree.safetensors"
    argv = ["distill-tree", *DATA, "--source", "kmeans", "--grid", "5", "5", "--shift", "1", "--K", "4"]
    code, stdout, err = run_cli([*argv, "--iterations", "1", "--out", str(out)], capsys)
    assert code == 0, err
    assert last_json(stdout)["grid"] == [5, 5]
    c = TreeCircuit.load(out)  # 8x8 digits: rows of 1, 2, 2, 2, 1 pixels
    assert c.meta["shift"] == [1, 1] and torch.bincount(c.owner).view(5, 5)[0].tolist() == [1, 2, 2, 2, 1]
    code, _, err = run_cli(["distill-tree", *DATA, "--shift", "1", "--out", str(tmp_path / "t.safetensors")], capsys)
    assert code == 1 and "--shift needs --source kmeans" in err and not (tmp_path / "t.safetensors").exists()


def _kmeans_tree(out: Path, seed: str, capsys: pytest.CaptureFixture[str], grid: str = "4") -> None:
    argv = ["distill-tree", *DATA, "--source", "kmeans", "--grid", grid, grid, "--K", "3", "--iterations", "1"]
    code, _, err = run_cli([*argv, "--seed", seed, "--out", str(out)], capsys)
    assert code == 0, err


def test_mix_trees_fits_weights_that_beat_uniform_on_validation(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trees = [tmp_path / "t4.safetensors", tmp_path / "t8.safetensors"]
    _kmeans_tree(trees[0], "0", capsys)
    _kmeans_tree(trees[1], "1", capsys, grid="8")
    rows = {}
    for how in ("uniform", "fitted"):
        out = tmp_path / f"{how}.safetensors"
        argv = ["mix-trees", *map(str, trees), *DATA, "--out", str(out)]
        code, stdout, err = run_cli(argv + (["--fit-weights"] if how == "fitted" else []), capsys)
        assert code == 0, err
        rows[how] = last_json(stdout)
        mix = TreeMixture.load(out)
        assert mix.num_params == rows[how]["params"]
        assert mix.log_weights.exp().tolist() == pytest.approx(rows[how]["weights"], abs=1e-4)
    assert rows["uniform"]["weights"] == [0.5, 0.5]
    assert rows["fitted"]["val_bpd"] <= rows["uniform"]["val_bpd"] + 1e-6
    # Jensen: the uniform mixture is no worse than the mean of its trees' BPDs
    assert rows["uniform"]["val_bpd"] <= sum(rows["uniform"]["val_bpd_each"]) / 2 + 1e-4


def test_mix_trees_names_a_missing_tree(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "mix.safetensors"
    code, _, err = run_cli(["mix-trees", str(tmp_path / "none.safetensors"), *DATA, "--out", str(out)], capsys)
    assert code == 1 and "tree circuit not found" in err and not out.exists()


@needs_mnist
def test_mix_trees_names_a_tree_made_for_other_data(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tree, out = tmp_path / "t.safetensors", tmp_path / "mix.safetensors"
    _kmeans_tree(tree, "0", capsys)  # digits: 64 pixels, 17 levels
    argv = ["mix-trees", str(tree), "--dataset", "mnist", "--data-dir", str(MNIST_DIR.parent), "--limit", "50"]
    code, _, err = run_cli([*argv, "--out", str(out)], capsys)
    assert code == 1 and "does not fit the data 'mnist'" in err and not out.exists()


def test_distill_tree_with_gaussian_leaves_reports_its_discrete_twin(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "gauss.safetensors"
    argv = ["distill-tree", *DATA, "--source", "kmeans", "--grid", "4", "4", "--K", "4", "--leaf", "gaussian"]
    code, stdout, err = run_cli([*argv, "--alpha-leaf", "0.001", "--iterations", "2", "--out", str(out)], capsys)
    assert code == 0, err
    row = last_json(stdout)
    c = TreeCircuit.load(out)
    assert (
        c.std_min == 1e-3 and row["leaf"] == "gaussian" and c.num_params == row["params"] == 3 + 15 * 4 * 3 + 2 * 64 * 4
    )
    assert row["test_bpd_discrete"] <= row["test_bpd"]  # binning a density never costs bits (Jensen)
    code, _, err = run_cli(["mix-trees", str(out), *DATA, "--out", str(tmp_path / "mix.safetensors")], capsys)
    assert code == 1 and "Gaussian leaves" in err and not (tmp_path / "mix.safetensors").exists()
    code, _, err = run_cli([*argv, "--leaf-bins", "4", "--out", str(tmp_path / "t.safetensors")], capsys)
    assert code == 1 and "--leaf gaussian needs" in err and not (tmp_path / "t.safetensors").exists()
