"""A deep distilled circuit on discrete MNIST: a tree over a latent grid with patch-local leaves.

Builds a :class:`~vq2pc.circuit.tree.TreeCircuit` by latent variable distillation and fine-tunes it by EM
(:mod:`vq2pc.circuit.tree_fit`), then prints ONE JSON line: source, K, grid, train/val/test sizes, the
chosen leaf pseudo-count, val BPD at distillation and after EM, test BPD (8-bit levels, −log2 p(x) / 784),
free parameters, distill_seconds, fit_seconds, EM iterations, threads and the load average.

Latent sources (``--source``): ``encoded`` (the run folder's VQ-VAE codes of the training images),
``prior`` (codes from the run folder's prior, images from the decoder: ``--prior-samples`` pairs),
``mixed`` (both), ``kmeans`` (k-means per patch position on a ``--grid`` of its own, ``--K`` centroids;
no run folder needed). The leaf pseudo-count is picked on validation among ``--alpha-leaf`` values.

    python benchmarks/mnist_tree_circuit.py RUN/categorical/4x4 --data-dir DIR --train-limit 10000 \\
        --val-limit 2000
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from vq2pc.circuit.tree import TreeCircuit
from vq2pc.circuit.tree_fit import (
    Smoothing,
    bpd,
    complete_counts,
    distill_tree,
    em_fit,
    encoded_pairs,
    m_step,
    prior_pairs,
    smoothing,
)
from vq2pc.circuit.tree_kmeans import patch_kmeans_codes
from vq2pc.circuit.tree_structure import patch_owner
from vq2pc.data.datasets import load_dataset
from vq2pc.models.priors import load_prior
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
    p.add_argument("--prior-samples", type=int, default=20000)
    p.add_argument("--train-limit", type=int, default=None)
    p.add_argument("--val-limit", type=int, default=None)
    p.add_argument("--test-limit", type=int, default=None)
    p.add_argument("--alpha-leaf", type=float, nargs="+", default=[0.01, 0.1, 1.0])
    p.add_argument("--alpha-edge", type=float, default=0.1)
    p.add_argument("--em-iterations", type=int, default=10)
    p.add_argument("--patience", type=int, default=1)
    p.add_argument("--max-seconds", type=float, default=None, help="EM time cap")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="save the fitted circuit here (.safetensors)")
    return p.parse_args()


def _pairs(
    a: argparse.Namespace, train_x: Tensor, levels: int, gen: torch.Generator
) -> tuple[Tensor, Tensor, int, tuple]:
    """``(codes [n, M], images [n, S], K, grid)`` from the chosen latent source."""
    if a.source == "kmeans":
        owner = patch_owner(tuple(train_x.shape[1:]), tuple(a.grid))
        codes, _ = patch_kmeans_codes(train_x, owner, a.K, levels, a.kmeans_iterations, gen)
        return codes, train_x.reshape(len(train_x), -1).long(), a.K, tuple(a.grid)
    if a.run is None:
        raise SystemExit(f"--source {a.source} needs a run folder with vqvae.pt")
    vqvae = VQVAE.load(Path(a.run) / "vqvae.pt")
    parts = []
    if a.source in ("encoded", "mixed"):
        parts.append(encoded_pairs(vqvae, train_x))
    if a.source in ("prior", "mixed"):
        priors = sorted(Path(a.run).glob("prior*.pt"))
        if not priors:
            raise SystemExit(f"no prior*.pt in {a.run}")
        parts.append(prior_pairs(vqvae, load_prior(priors[0]), a.prior_samples, gen))
    codes, images = (torch.cat(t) for t in zip(*parts))
    return codes, images, vqvae.cfg.K, tuple(vqvae.cfg.latent_hw)


def _pick_alpha(
    a: argparse.Namespace,
    c: TreeCircuit,
    pairs: tuple[Tensor, Tensor],
    val: Tensor,
    prior: Callable[[float], Smoothing],
) -> float:
    """The leaf pseudo-count with the best validation BPD at distillation; ``c`` is left with it."""
    counts, scores = complete_counts(c, *pairs), {}
    for alpha in a.alpha_leaf:
        c.set_log_params(m_step(counts, prior(alpha)))
        scores[alpha] = bpd(c, val)
    best = min(scores, key=scores.__getitem__)
    c.set_log_params(m_step(counts, prior(best)))
    return best


def main() -> None:
    a = _args()
    torch.manual_seed(a.seed)
    gen = torch.Generator().manual_seed(a.seed)
    d = load_dataset(a.dataset, a.data_dir, seed=a.seed)
    train, val, test = d.train_x[: a.train_limit], d.val_x[: a.val_limit], d.test_x[: a.test_limit]
    start = time.perf_counter()
    codes, images, K, grid = _pairs(a, train, d.levels, gen)

    def prior(alpha: float) -> Smoothing:  # pseudo-counts centred on the training pixels' marginals
        return smoothing(train, d.levels, alpha, a.alpha_edge)

    c = distill_tree(codes, images, K, d.levels, d.image_shape, grid, prior(a.alpha_leaf[0]), {"source": a.source})
    alpha = _pick_alpha(a, c, (codes, images), val, prior)
    distill_seconds = time.perf_counter() - start
    val_init = bpd(c, val)
    result = em_fit(
        c, train, val, prior(alpha), a.em_iterations, a.patience, a.batch_size,
        a.max_seconds,
    )  # fmt: skip
    if a.out:
        c.save(a.out)
    row = {
        "source": a.source, "K": K, "grid": list(grid), "n_train": len(train), "n_pairs": len(codes),
        "n_val": len(val), "n_test": len(test), "alpha_leaf": alpha, "alpha_edge": a.alpha_edge,
        "val_bpd_init": round(val_init, 4), "val_bpd": round(result.best_val_bpd, 4),
        "test_bpd": round(bpd(c, test), 4), "train_bpd": round(result.history[result.best_iteration]["train_bpd"], 4),
        "params": c.num_params, "distill_seconds": round(distill_seconds, 1), "fit_seconds": round(result.seconds, 1),
        "em_iterations": len(result.history) - 1, "best_iteration": result.best_iteration,
        "depth": len(c.tree.levels) - 1, "threads": torch.get_num_threads(),
        "load_avg": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else math.nan,
    }  # fmt: skip
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
