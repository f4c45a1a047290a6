"""The benchmark scripts run at tiny sizes and print the promised JSON keys."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import MNIST_DIR, needs_mnist

from vq2pc.circuit.classes import ClassMixture
from vq2pc.circuit.distill import decode_head_leaf, decode_leaf
from vq2pc.circuit.mixture import MixtureCircuit
from vq2pc.circuit.tree_mixture import TreeMixture
from vq2pc.core.head_leaf import HeadCategorical
from vq2pc.data.datasets import load_dataset
from vq2pc.evaluate.classification import classification_masks
from vq2pc.models.vqvae import VQVAE, VQVAEConfig, encode_images

ROOT = Path(__file__).resolve().parents[1]
KEYS = {"query", "leaf", "N", "B", "S", "seconds", "fraction_of_matmul", "speedup_vs_slow", "peak_rss_mib"}


def _benchmark(script: str, *args: str, timeout: int = 120) -> subprocess.CompletedProcess[str]:
    """Run ``benchmarks/<script>`` with ``args`` in a fresh interpreter (it must exit 0)."""
    command = [sys.executable, str(ROOT / "benchmarks" / script), *args]
    return subprocess.run(command, capture_output=True, text=True, check=True, timeout=timeout)


def _run(*args: str) -> list[dict]:
    out = _benchmark("circuit_queries.py", *args, "--repeat", "1")
    return [json.loads(line) for line in out.stdout.splitlines()]


@pytest.mark.slow
def test_circuit_queries_prints_every_case() -> None:
    lines = _run("--N", "64", "--B", "16", "--S", "20", "--levels", "8")
    assert all(KEYS <= set(line) for line in lines)
    cases = {(line["query"], line["leaf"]) for line in lines}
    for leaf in ("gaussian", "categorical"):
        assert {(q, leaf) for q in ("log_prob", "log_prob_masked", "posterior", "conditional_mean")} <= cases
    assert all(line["seconds"] > 0 and line["peak_rss_mib"] > 0 for line in lines)
    assert all("times_gaussian" in line for line in lines if line["leaf"] == "categorical")


@pytest.mark.slow
@needs_mnist
def test_circuit_queries_on_mnist_images() -> None:
    lines = _run("--data", "mnist", "--mnist-dir", str(MNIST_DIR), "--N", "32", "--B", "8", "--leaves", "categorical")
    assert {line["query"] for line in lines} >= {"log_prob", "conditional_mean"}


@pytest.mark.slow
@needs_mnist
def test_exact_bpd_counts_one_pass_of_decodes_after_the_loop_swap() -> None:
    out = _benchmark(
        "exact_bpd.py",
        "--data-dir",
        str(MNIST_DIR),
        "--K",
        "2",
        "--n-test",
        "40",
        "--batch-size",
        "20",
        "--draws",
        "2",
        timeout=300,
    )
    before, after, draws = (json.loads(line) for line in out.stdout.splitlines())
    assert (before["path"], after["path"], draws["path"]) == ("before", "after", "draws")
    assert draws["latents"] == 16
    # before: one pass per batch of 20 rows and per draw; after: one per draw; draws: one in all
    assert (before["decodes"], after["decodes"], draws["decodes"]) == (2 * 2 * 16, 2 * 16, 16)
    assert before["extrapolated"] and after["extrapolated"] and not draws["extrapolated"]
    assert "bpd" in draws and draws["bpd"] > 0


def test_discretized_logprob_prints_every_case_and_skips_large_tables() -> None:
    out = _benchmark(
        "discretized_logprob.py",
        "--N",
        "32",
        "64",
        "--B",
        "8",
        "--S",
        "12",
        "--levels",
        "8",
        "--cat-max-N",
        "32",
        "--same-process",
    )
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert [(line["leaf"], line["N"]) for line in lines] == [
        (leaf, n) for n in (32, 64) for leaf in ("discretized-gaussian", "discretized-logistic", "categorical")
    ]
    assert "skipped" in lines[-1] and all("skipped" not in line for line in lines[:-1])
    assert all(line["seconds"] > 0 and line["peak_rss_mib"] > 0 and line["query_extra_mib"] >= 0 for line in lines[:-1])


def test_codec_throughput_prints_its_json_line() -> None:
    pytest.importorskip("constriction")
    out = _benchmark(
        "codec_throughput.py", "--N", "32", "--S", "20", "--L", "8", "--images", "40", "--rows", "16", "--threads", "1"
    )
    line = json.loads(out.stdout.strip().splitlines()[-1])
    assert {"encode_images_per_s", "decode_images_per_s", "threads", "bits_per_pixel", "model_bpd"} <= set(line)
    assert line["encode_images_per_s"] > 0 and line["threads"] == 1
    assert line["bits_per_pixel"] > line["model_bpd"]  # tiny set: the ~400-byte header dominates the gap


@pytest.mark.parametrize("leaf", ["gaussian", "categorical"])
def test_class_posterior_benchmark_prints_its_line(leaf: str) -> None:
    out = _benchmark(
        "class_posterior.py", "--N", "64", "--B", "16", "--S", "20", "--levels", "8", "--leaf", leaf, "--repeat", "1"
    )
    line = json.loads(out.stdout.strip().splitlines()[-1])
    assert {"log_prob_s", "class_posterior_s", "ratio", "recomputed_rows"} <= set(line) and line["leaf"] == leaf
    assert line["log_prob_s"] > 0 and line["class_posterior_s"] > 0


def test_field_circuits_step_prints_a_line_per_structure() -> None:
    pytest.importorskip("cirkit")
    out = _benchmark(
        "field_circuits_step.py",
        "--dataset",
        "digits",
        "--graphs",
        "quad-graph",
        "chow-liu-tree",
        "--units",
        "2",
        "--batch",
        "16",
        "--steps",
        "1",
        "--limit",
        "100",
        "--threads",
        "1",
    )
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert [line["region_graph"] for line in lines] == ["quad-graph", "chow-liu-tree"]
    pic = _benchmark("field_circuits_step.py", "--dataset", "digits", "--graphs", "quad-graph", "--units", "2",
                     "--pic-net-dim", "8", "--batch", "16", "--steps", "1", "--limit", "100", "--threads", "1")  # fmt: skip
    (line,) = [json.loads(line) for line in pic.stdout.splitlines()]
    assert line["pic_net_dim"] == 8 and line["num_params"] > 0 and line["seconds_per_step"] > 0
    assert all(line["num_params"] > 0 and line["seconds_per_step"] > 0 for line in lines) and "tree_seconds" in lines[1]


@pytest.mark.slow
@pytest.mark.parametrize("fit", ["em", "adam"])
def test_mnist_tree_circuit_prints_its_line(fit: str) -> None:
    args = ["--dataset", "digits", "--source", "kmeans", "--K", "4", "--grid", "2", "2", "--fit", fit]
    sizes = ["--train-limit", "100", "--val-limit", "50", "--test-limit", "50", "--em-iterations", "2"]
    out = _benchmark("mnist_tree_circuit.py", *args, *sizes)
    (line,) = [json.loads(s) for s in out.stdout.splitlines()]
    assert {"val_bpd_init", "val_bpd", "test_bpd", "params", "cpu_seconds", "alpha_leaf"} <= set(line)
    assert line["K"] == 4 and line["grid"] == [2, 2] and line["val_bpd"] <= line["val_bpd_init"] + 1e-9


def test_mnist_tree_circuit_with_gaussian_leaves_prints_its_discrete_twin() -> None:
    args = ["--dataset", "digits", "--source", "kmeans", "--K", "4", "--grid", "2", "2", "--leaf", "gaussian"]
    sizes = ["--train-limit", "100", "--val-limit", "50", "--test-limit", "50", "--em-iterations", "2"]
    out = _benchmark("mnist_tree_circuit.py", *args, *sizes, "--alpha-leaf", "1e-6", "--leaf-floor", "0.001")
    (line,) = [json.loads(s) for s in out.stdout.splitlines()]
    assert line["leaf"] == "gaussian" and line["leaf_floor"] == 0.001 and line["params"] == 3 + 3 * 4 * 3 + 2 * 64 * 4
    assert line["test_bpd_discrete"] <= line["test_bpd"]  # binning a density never costs bits (Jensen)


@pytest.mark.slow
def test_tree_seeds_their_mixture_and_paired_differences(tmp_path: Path) -> None:
    base = ["--dataset", "digits", "--source", "kmeans", "--K", "4", "--grid", "4", "4", "--context", "1"]
    sizes = ["--train-limit", "100", "--val-limit", "50", "--em-iterations", "1", "--leaf-bins", "0", "8"]
    for seed in ("0", "1"):
        files = ["--out", str(tmp_path / f"t{seed}.safetensors"), "--per-image", str(tmp_path / f"t{seed}.npy")]
        _benchmark("mnist_tree_circuit.py", *base, *sizes, "--seed", seed, *files)
    trees = [str(tmp_path / f"t{seed}.safetensors") for seed in ("0", "1")]
    out = _benchmark("tree_ensemble.py", *trees, "--dataset", "digits", "--against", str(tmp_path / "t1.npy"))
    row = json.loads(out.stdout)
    # Jensen: -log((p0 + p1) / 2) <= the mean of -log p_t on every image, so on their mean too
    assert row["trees"] == 2 and row["mixture_test_bpd"] <= row["test_bpd_mean"] + 1e-4
    assert abs(row["paired_vs_baseline"][1]["difference"]) < 1e-6  # tree 1 against its own per-image file
    paired = json.loads(_benchmark("paired_bpd.py", str(tmp_path / "t0.npy"), str(tmp_path / "t1.npy")).stdout)
    assert paired["mean_a"] == pytest.approx(row["test_bpd"][0], abs=1e-4)
    assert paired["difference"] == pytest.approx(row["paired_vs_baseline"][0]["difference"], abs=1e-4)
    mix_file = tmp_path / "mix.safetensors"
    fitted = json.loads(
        _benchmark("tree_ensemble.py", *trees, "--dataset", "digits", "--fit-weights", "--out", str(mix_file)).stdout
    )
    assert fitted["mixture_val_bpd"] <= row["mixture_val_bpd"] + 1e-4  # the weights maximize validation likelihood
    assert sum(fitted["weights"]) == pytest.approx(1, abs=1e-3)
    assert TreeMixture.load(mix_file).num_params == fitted["params_mixture"] == sum(row["params_each"]) + 1


@pytest.mark.parametrize("shifts", [0, 1])
def test_class_data_components_equals_the_table_class_mixture_of_the_same_components(
    tmp_path: Path, shifts: int
) -> None:
    """The benchmark's decoder-head circuit classifies as ``ClassMixture`` over the same encoded training
    images held as a categorical table (weights: own label smoothed by eps, uniform over n): the same label
    NLL and accuracy, from full images and with half the pixels hidden. With ``--shifts 1`` the table holds
    every decoded feature map shifted by each of the 9 offsets (rows clamped: borders repeated)."""
    splits = load_dataset("digits", None, seed=0)
    arch = {"latent_hw": (2, 2), "K": 8, "D": 4, "hidden": 8, "res_blocks": 0}
    cfg = VQVAEConfig(image_shape=splits.image_shape, levels=splits.levels, leaf="categorical", **arch)
    vq = VQVAE(cfg).eval()
    vq.save(tmp_path / "vqvae.pt")
    n, v, eps = 60, 40, 0.1
    args = ["--dataset", "digits", "--data-dir", str(tmp_path), "--N", str(n), "--limit", str(v)]
    args += ["--fractions", "0.5", "--regions", "--eps", str(eps), "--figure", str(tmp_path / "acc.png")]
    args += ["--shifts", str(shifts), "--save", str(tmp_path / "classes.pt")]
    row = json.loads(_benchmark("class_data_components.py", str(tmp_path / "vqvae.pt"), *args).stdout)
    assert (tmp_path / "acc.png").stat().st_size > 0
    idx = torch.randperm(len(splits.train_x), generator=torch.Generator().manual_seed(0))[:n]
    codes = encode_images(vq, splits.train_x[idx])
    if shifts:
        head = decode_head_leaf(vq, codes)
        rows, cols = torch.arange(8), torch.arange(8)
        offsets = [(0, 0)] + [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx]
        maps = [head.features[:, :, (rows - dy).clamp(0, 7)][..., (cols - dx).clamp(0, 7)] for dy, dx in offsets]
        leaf = HeadCategorical(torch.cat(maps), head.weight, head.bias).categorical()
    else:
        leaf = decode_leaf(vq, codes)
    labels = splits.train_y[idx].repeat(9 if shifts else 1)
    m = labels.shape[0]
    assert row["components"] == m
    w = torch.full((m, 10), eps / 9, dtype=torch.float64)
    w[torch.arange(m), labels] = 1 - eps
    mix = ClassMixture(MixtureCircuit(leaf, torch.full((m,), -math.log(m))), w.log() - math.log(m))
    xv, yv = splits.val_x[:v].flatten(1), splits.val_y[:v]
    masks = classification_masks(splits.image_shape, v, (0.5,), (), torch.Generator().manual_seed(1))
    for pixels, mask in masks.items():
        log_post = mix.class_posterior(xv, mask=mask)
        got = row["results"]["circuit"][f"eps={eps}"][pixels]
        assert got["nll"] == pytest.approx(-log_post[torch.arange(v), yv].mean().item(), abs=2e-4)
        assert got["accuracy"] == pytest.approx((log_post.argmax(1) == yv).double().mean().item(), abs=1e-4)
    # the saved circuit answers `vq2pc classify` with the same posteriors (half the pixels hidden)
    np.save(tmp_path / "x.npy", xv.reshape(v, *splits.image_shape).numpy())
    np.save(tmp_path / "mask.npy", mask.numpy())
    cmd = [sys.executable, "-m", "vq2pc", "classify", str(tmp_path / "classes.pt"), "--images", str(tmp_path / "x.npy")]
    out = subprocess.run([*cmd, "--mask", str(tmp_path / "mask.npy")], capture_output=True, text=True, check=True)
    probs = torch.tensor(json.loads(out.stdout)["probabilities"], dtype=torch.float64)
    torch.testing.assert_close(probs, log_post.double().exp(), atol=2e-5, rtol=0)
