"""A deep distilled circuit on discrete MNIST: a tree over a latent grid with patch-local leaves.

Builds a :class:`~vq2pc.circuit.tree.TreeCircuit` by latent variable distillation and fine-tunes it by EM
(:mod:`vq2pc.circuit.tree_fit`), then prints ONE JSON line: source, K, grid, train/val/test sizes, the
chosen leaf pseudo-count, val BPD at distillation and after EM, test BPD (8-bit levels, −log2 p(x) / 784),
free parameters, distill_seconds, fit_seconds (wall), cpu_seconds (this process's CPU time for the whole
build, fit and scoring: comparable across loads), EM iterations, threads and the load average.

Latent sources (``--source``): ``encoded`` (the run folder's VQ-VAE codes of the training images),
``prior`` (codes from the run folder's prior, images from the decoder: ``--prior-samples`` pairs),
``mixed`` (both), ``kmeans`` (k-means per patch position on a ``--grid`` of its own, ``--K`` centroids;
no run folder needed). The leaf pseudo-count is picked on validation among ``--alpha-leaf`` values.
``--leaf gaussian`` fits Gaussian leaves on dequantized pixels (:class:`~vq2pc.circuit.tree.GaussianTreeCircuit`): its BPDs are
the paper's continuous metric (``−log2 p(x) / 784 + 8``, test: 3 dequantization draws) and the line adds
``test_bpd_discrete``, the exact BPD of its discretized twin.

    python benchmarks/mnist_tree_circuit.py RUN/categorical/4x4 --data-dir DIR --train-limit 10000 \\
        --val-limit 2000
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from vq2pc.circuit.tree import TreeCircuit
from vq2pc.circuit.tree_fit import (
    Smoothing,
    TreeFitResult,
    adam_fit,
    bpd,
    complete_counts,
    distill_tree,
    em_fit,
    image_bpd,
    m_step,
    smoothing,
    source_pairs,
)
from vq2pc.circuit.tree_kmeans import kmeans_pairs
from vq2pc.circuit.tree_structure import grid_shift
from vq2pc.data.datasets import load_dataset
from vq2pc.evaluate.density import save_per_image
from vq2pc.models.priors import load_prior
from vq2pc.models.train import TrainConfig
from vq2pc.models.vqvae import VQVAE


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", nargs="?", help="folder with vqvae.pt (and prior*.pt for --source prior/mixed)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--source", choices=("encoded", "prior", "mixed", "kmeans"), default="encoded")
    p.add_argument("--K", type=int, default=256, help="k-means centroids per position (--source kmeans)")
    p.add_argument("--grid", type=int, nargs=2, default=(7, 7), help="latent grid (--source kmeans)")
    p.add_argument("--kmeans-iterations", type=int, default=10)
    p.add_argument("--context", type=int, default=0, help="k-means windows: pixels around each patch (--source kmeans)")
    p.add_argument("--context-weight", type=float, default=1.0, help="scale of the context pixels in k-means")
    p.add_argument(
        "--shift",
        type=int,
        nargs="+",
        default=[0],
        help="grid shifted by SY [SX] pixels (--source kmeans; patch_owner)",
    )
    p.add_argument("--prior-samples", type=int, default=20000)
    p.add_argument("--train-limit", type=int, default=None)
    p.add_argument("--val-limit", type=int, default=None)
    p.add_argument("--test-limit", type=int, default=None)
    p.add_argument("--alpha-leaf", type=float, nargs="+", default=[0.01, 0.1, 1.0])
    p.add_argument("--alpha-edge", type=float, default=0.1)
    p.add_argument(
        "--leaf-bins",
        type=int,
        nargs="+",
        default=[0],
        help="tied leaves: level bins per state, picked on validation (0: untied)",
    )
    p.add_argument("--leaf", choices=("categorical", "gaussian"), default="categorical", help="pixel leaves")
    p.add_argument("--std-min", type=float, default=1e-3, help="std floor of Gaussian leaves (pixels in [0, 1))")
    p.add_argument("--leaf-floor", type=float, default=0.0, help="uniform share mixed into each Gaussian leaf")
    p.add_argument("--em-iterations", type=int, default=10)
    p.add_argument("--patience", type=int, default=1)
    p.add_argument("--max-seconds", type=float, default=None, help="EM time cap")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--fit", choices=("em", "adam"), default="em", help="fine-tuning: MAP-EM or Adam (train.fit)")
    p.add_argument("--lr", type=float, default=0.03, help="Adam learning rate (--fit adam)")
    p.add_argument("--seed", type=int, default=0, help="seed of k-means and EM")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the train/validation split")
    p.add_argument("--out", default=None, help="save the fitted circuit here (.safetensors)")
    p.add_argument("--per-image", default=None, help="save each test image's BPD here (.npy, paired_bpd.py)")
    return p.parse_args()


def _pairs(
    a: argparse.Namespace, train_x: Tensor, levels: int, gen: torch.Generator
) -> tuple[Tensor, Tensor, int, tuple]:
    """``(codes [n, M], images [n, S], K, grid)`` from the chosen latent source."""
    if a.source == "kmeans":
        grid = (int(a.grid[0]), int(a.grid[1]))
        codes, images = kmeans_pairs(
            train_x,
            grid,
            a.K,
            levels,
            gen,
            a.kmeans_iterations,
            context=a.context,
            context_weight=a.context_weight,
            shift=grid_shift(a.shift),
        )
        return codes, images, a.K, grid
    if a.run is None:
        raise SystemExit(f"--source {a.source} needs a run folder with vqvae.pt")
    vqvae = VQVAE.load(Path(a.run) / "vqvae.pt")
    priors = sorted(Path(a.run).glob("prior*.pt"))
    prior = load_prior(priors[0]) if priors and a.source != "encoded" else None
    codes, images = source_pairs(a.source, vqvae, train_x, prior, a.prior_samples, gen)
    return codes, images, vqvae.cfg.K, tuple(vqvae.cfg.latent_hw)


def _pick_alpha(
    a: argparse.Namespace,
    c: TreeCircuit,
    pairs: tuple[Tensor, Tensor],
    val: Tensor,
    prior: Callable[[float, int], Smoothing],
) -> tuple[float, int]:
    """The leaf pseudo-count and bins with the best validation BPD at distillation; ``c`` is left with them."""
    counts, scores = complete_counts(c, *pairs), {}
    for choice in itertools.product(a.alpha_leaf, a.leaf_bins):
        c.set_log_params(m_step(counts, prior(*choice), c.std_min))
        scores[choice] = bpd(c, val)
        print(json.dumps({"alpha_leaf": choice[0], "leaf_bins": choice[1], "val_bpd": scores[choice]}), file=sys.stderr)
    best = min(scores, key=scores.__getitem__)
    c.set_log_params(m_step(counts, prior(*best), c.std_min))
    return best


def _fine_tune(a: argparse.Namespace, c: TreeCircuit, train: Tensor, val: Tensor, prior: Smoothing) -> TreeFitResult:
    """EM, or Adam for ``--em-iterations`` epochs (its history rewritten as EM's: BPD per epoch)."""
    if a.fit == "em":
        return em_fit(
            c, train, val, prior, a.em_iterations, a.patience, a.batch_size, a.max_seconds,
            log=lambda row: print(json.dumps(row), file=sys.stderr, flush=True), seed=a.seed,
        )  # fmt: skip
    cfg = TrainConfig(
        epochs=a.em_iterations, patience=a.patience, lr=a.lr, batch_size=a.batch_size, max_seconds=a.max_seconds,
        progress=False,
    )  # fmt: skip
    r = adam_fit(c, train, val, cfg)
    to_bpd = 1 / math.log(2)
    rows = [{"train_bpd": math.nan, "val_bpd": r.start_val_loss * to_bpd}]
    rows += [{"train_bpd": h["train"] * to_bpd, "val_bpd": h["val"] * to_bpd} for h in r.history]
    return TreeFitResult(rows, r.best_epoch, r.seconds)


def _rounded(v: float) -> float | None:
    """``v`` to 4 decimals; None (JSON null) for NaN (Adam's start has no training BPD)."""
    return round(v, 4) if math.isfinite(v) else None


def main() -> None:
    a = _args()
    torch.manual_seed(a.seed)
    gen = torch.Generator().manual_seed(a.seed)
    d = load_dataset(a.dataset, a.data_dir, seed=a.data_seed)
    train, val, test = d.train_x[: a.train_limit], d.val_x[: a.val_limit], d.test_x[: a.test_limit]
    start, cpu_start = time.perf_counter(), time.process_time()
    codes, images, K, grid = _pairs(a, train, d.levels, gen)

    def prior(alpha: float, bins: int = 0) -> Smoothing:  # pseudo-counts centred on the pixels' marginals
        return smoothing(train, d.levels, alpha, a.alpha_edge, bins or None)

    if any(a.shift) and a.source != "kmeans":
        raise SystemExit("--shift needs --source kmeans (a VQ-VAE's codes have the VQ-VAE's own grid)")
    gaussian = a.leaf == "gaussian"
    if gaussian and (any(a.leaf_bins) or a.fit != "em"):
        raise SystemExit("--leaf gaussian takes untied leaves (--leaf-bins 0) and --fit em")
    c = distill_tree(
        codes,
        images,
        K,
        d.levels,
        d.image_shape,
        grid,
        prior(a.alpha_leaf[0]),
        {"source": a.source},
        grid_shift(a.shift),
        a.std_min if gaussian else None,
        a.leaf_floor,
    )
    alpha, bins = _pick_alpha(a, c, (codes, images), val, prior)
    if not gaussian:
        c.meta["leaf_bins"] = bins or d.levels
    distill_seconds = time.perf_counter() - start
    val_init = bpd(c, val)
    result = _fine_tune(a, c, train, val, prior(alpha, bins))
    if a.out:
        c.save(a.out)
    test_bpd = image_bpd(c, test, draws=3 if gaussian else 1)
    if a.per_image:
        save_per_image(a.per_image, test_bpd)
    extra = (
        {"std_min": a.std_min, "leaf_floor": a.leaf_floor, "test_bpd_discrete": round(bpd(c.discretized(), test), 4)}
        if gaussian
        else {}
    )
    row = {
        "leaf": a.leaf, "source": a.source, "context": a.context, "context_weight": a.context_weight, "shift": list(grid_shift(a.shift)), "K": K, "grid": list(grid), "n_train": len(train), "n_pairs": len(codes),
        "n_val": len(val), "n_test": len(test), "seed": a.seed, "data_seed": a.data_seed, "alpha_leaf": alpha, "leaf_bins": bins, "alpha_edge": a.alpha_edge,
        "val_bpd_init": round(val_init, 4), "val_bpd": round(result.best_val_bpd, 4),
        "test_bpd": round(float(test_bpd.mean()), 4), "train_bpd": _rounded(result.history[result.best_iteration]["train_bpd"]),
        "params": c.num_params, "distill_seconds": round(distill_seconds, 1), "fit_seconds": round(result.seconds, 1),
        "cpu_seconds": round(time.process_time() - cpu_start, 1),
        "em_iterations": len(result.history) - 1, "best_iteration": result.best_iteration,
        "depth": len(c.tree.levels) - 1, "threads": torch.get_num_threads(),
        "load_avg": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else math.nan, **extra,
    }  # fmt: skip
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
