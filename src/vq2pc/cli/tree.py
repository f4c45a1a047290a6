"""``vq2pc distill-tree``: a deep distilled circuit (a tree over a latent grid with patch-local leaves)."""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from vq2pc.circuit.tree import TreeCircuit
from vq2pc.circuit.tree_fit import SOURCES, bpd, distill_tree, em_fit, image_bpd, smoothing, source_pairs
from vq2pc.circuit.tree_kmeans import kmeans_pairs
from vq2pc.circuit.tree_mixture import TreeMixture, fit_weights
from vq2pc.circuit.tree_structure import grid_shift
from vq2pc.cli.options import add_parser, data_options, out_option
from vq2pc.data.datasets import DataSplits, check_fits, load_dataset
from vq2pc.models.priors import load_prior
from vq2pc.models.vqvae import VQVAE

ALL_SOURCES = (*SOURCES, "kmeans")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``distill-tree`` verb."""
    p = add_parser(
        subparsers,
        "distill-tree",
        help="a tree circuit over a latent grid with patch-local leaves (latent variable distillation + EM); "
        "prints JSON",
        description="Latent variable distillation: latents for the training images — a VQ-VAE's codes, the prior's "
        "samples, or k-means codes of each patch (no VQ-VAE needed) — make the data complete; a Chow-Liu tree over "
        "the latent positions and categorical leaves for each patch are counted in closed form, then fine-tuned by EM on "
        "the training images, early-stopped on validation BPD. The result is an exact circuit over all K^{HW} latent "
        "grids (vq2pc.TreeCircuit). With --leaf gaussian the leaves are Gaussians on dequantized pixels: its BPDs are "
        "continuous (the paper's metric, test over 3 dequantization draws) and the report adds the exact discrete "
        "BPD of its discretized twin.",
    )
    p.add_argument("run", nargs="?", help="folder with vqvae.pt (and prior*.pt for --source prior / mixed)")
    data_options(p)
    p.add_argument("--source", choices=ALL_SOURCES, default="encoded", help="where the latents come from")
    p.add_argument(
        "--prior-samples", type=int, default=20000, help="pairs drawn from the prior (--source prior / mixed)"
    )
    p.add_argument("--grid", type=int, nargs=2, default=(7, 7), help="latent grid h w (--source kmeans)")
    p.add_argument("--K", type=int, default=128, help="states per latent (--source kmeans)")
    p.add_argument("--context", type=int, default=0, help="k-means windows: pixels around each patch (kmeans)")
    p.add_argument("--context-weight", type=float, default=1.0, help="scale of those context pixels (kmeans)")
    p.add_argument(
        "--shift",
        type=int,
        nargs="+",
        default=[0],
        metavar="S",
        help="lay the k-means grid over the image padded "
        "by SY [SX] pixels at the top and left: --grid 15 15 --shift 1 gives 2x2 patches whose borders fall between "
        "those of --grid 14 14 (kmeans)",
    )
    p.add_argument("--alpha-leaf", type=float, default=0.1, help="leaf pseudo-count (× L × the pixel's marginal)")
    p.add_argument("--alpha-edge", type=float, default=0.1, help="pseudo-count per root / edge table entry")
    p.add_argument(
        "--leaf-bins", type=int, default=0, help="tied leaves: level bins per state, the split inside a bin per "
        "pixel (0: one categorical per pixel and state)",
    )  # fmt: skip
    p.add_argument("--leaf", choices=("categorical", "gaussian"), default="categorical", help="pixel leaves")
    p.add_argument("--std-min", type=float, default=1e-3, help="std floor of Gaussian leaves (pixels scaled to [0, 1))")
    p.add_argument(
        "--leaf-floor", type=float, default=0.0, help="share of a uniform density mixed into each Gaussian leaf "
        "(caps the cost of a pixel no state expects)",
    )  # fmt: skip
    p.add_argument("--iterations", type=int, default=10, help="maximum EM iterations (0: the distilled circuit)")
    p.add_argument("--patience", type=int, default=1, help="EM iterations without a better validation BPD")
    p.add_argument("--batch-size", type=int, default=512, help="rows per E-step batch")
    out_option(p, "tree circuit file to write (.safetensors)", required=True)
    p.set_defaults(func=cmd_distill_tree)
    _register_mix(subparsers)


def _register_mix(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``mix-trees`` verb."""
    m = add_parser(
        subparsers,
        "mix-trees",
        help="a mixture of tree circuits (a sum node over them), weights uniform or fitted on validation; prints JSON",
        description="Mix tree circuits written by distill-tree into one exact circuit (vq2pc.TreeMixture): "
        "p(x) = sum_t w_t p_t(x). Trees fitted independently (seeds, shifted grids, pixel-level and patch "
        "grids) mix well; --fit-weights fits w on the validation images with the trees fixed (a concave "
        "problem). Prints each tree's and the mixture's validation and test BPD.",
    )
    m.add_argument("trees", nargs="+", help="tree circuit files (.safetensors from distill-tree)")
    data_options(m)
    m.add_argument("--fit-weights", action="store_true", help="fit the weights on the validation images")
    m.add_argument("--val-limit", type=int, default=None, help="score only the first this many validation images")
    out_option(m, "tree mixture file to write (.safetensors)", required=True)
    m.set_defaults(func=cmd_mix_trees)


def _prior(run: Path, device: str) -> Any:
    found = sorted(run.glob("prior*.pt"))
    if not found:
        raise ValueError(f"no prior (prior*.pt) in {run}: --source prior / mixed needs one")
    return load_prior(found[0], device=device)


def _pairs(a: argparse.Namespace, splits: DataSplits) -> tuple[Tensor, Tensor, int, tuple[int, int]]:
    """``(codes [n, M], levels [n, S], K, grid)`` of the chosen latent source."""
    gen = torch.Generator().manual_seed(a.seed)
    if a.source == "kmeans":
        grid = (int(a.grid[0]), int(a.grid[1]))
        codes, images = kmeans_pairs(
            splits.train_x, grid, a.K, splits.levels, gen, context=a.context, context_weight=a.context_weight,
            shift=a.shift,
        )  # fmt: skip
        return codes, images, a.K, grid
    if a.run is None:
        raise ValueError(f"--source {a.source} needs a run folder with vqvae.pt (or use --source kmeans)")
    run = Path(a.run)
    vqvae = VQVAE.load(run / "vqvae.pt", device=a.device)
    check_fits(vqvae.cfg.image_shape, vqvae.cfg.levels, splits, f"the VQ-VAE of {run}")
    prior = _prior(run, a.device) if a.source != "encoded" else None
    codes, images = source_pairs(a.source, vqvae, splits.train_x, prior, a.prior_samples, gen)
    return codes, images, vqvae.K, vqvae.latent_hw


def cmd_distill_tree(a: argparse.Namespace) -> int:
    if min(a.leaf_bins, a.context) < 0:
        raise ValueError(f"--leaf-bins and --context must be >= 0, got {a.leaf_bins} and {a.context}")
    a.shift = grid_shift(a.shift)
    if any(a.shift) and a.source != "kmeans":
        raise ValueError("--shift needs --source kmeans (a VQ-VAE's codes keep the VQ-VAE's own grid)")
    gaussian = a.leaf == "gaussian"
    if gaussian and (a.leaf_bins or not 0 < a.std_min < 1 or not 0 <= a.leaf_floor < 1):
        raise ValueError(
            f"--leaf gaussian needs --leaf-bins 0, --std-min in (0, 1) and --leaf-floor in [0, 1), got "
            f"{a.leaf_bins}, {a.std_min}, {a.leaf_floor}"
        )
    splits = load_dataset(a.dataset, a.data_dir, seed=a.seed, limit=a.limit)
    start = time.perf_counter()
    codes, images, K, grid = _pairs(a, splits)
    smooth = smoothing(splits.train_x, splits.levels, a.alpha_leaf, a.alpha_edge, a.leaf_bins or None)
    meta = {"source": a.source, "dataset": splits.name}
    std_min = a.std_min if gaussian else None
    c = distill_tree(
        codes, images, K, splits.levels, splits.image_shape, grid, smooth, meta, a.shift, std_min, a.leaf_floor
    )
    c = c.to(a.device)
    val_init = bpd(c, splits.val_x)
    fitted = em_fit(c, splits.train_x, splits.val_x, smooth, a.iterations, a.patience, a.batch_size, seed=a.seed)
    path = c.save(a.out)
    report = {
        "out": str(path),
        "leaf": a.leaf,
        "source": a.source,
        "K": c.K,
        "grid": list(grid),
        "leaf_bins": None if gaussian else a.leaf_bins or splits.levels,
        "params": c.num_params,
        "val_bpd_distilled": val_init,
        "val_bpd": fitted.best_val_bpd,
        "test_bpd": float(image_bpd(c, splits.test_x, draws=3 if gaussian else 1).mean()),
        "em_iterations": len(fitted.history) - 1,
        "best_iteration": fitted.best_iteration,
        "seconds": round(time.perf_counter() - start, 2),
    }
    if gaussian:
        report["test_bpd_discrete"] = bpd(c.discretized(), splits.test_x)
    print(json.dumps(report))
    return 0


def cmd_mix_trees(a: argparse.Namespace) -> int:
    """Load the trees, check they fit the data, score validation once ([T, n] log-likelihoods), fit or keep
    uniform weights, write the mixture, print its and each tree's BPDs."""
    for path in a.trees:
        if not Path(path).is_file():
            raise FileNotFoundError(f"tree circuit not found: {path}")
    if a.val_limit is not None and a.val_limit < 1:
        raise ValueError(f"--val-limit must be >= 1, got {a.val_limit}")
    splits = load_dataset(a.dataset, a.data_dir, seed=a.seed, limit=a.limit)
    trees = [TreeCircuit.load(path, a.device) for path in a.trees]
    for path, tree in zip(a.trees, trees):
        if tree.std_min is not None:
            raise ValueError(f"{path}: mix-trees mixes categorical-leaf trees; this one has Gaussian leaves")
    mix = TreeMixture(trees).to(a.device)  # refuses trees of different shapes
    S, L = math.prod(splits.image_shape), splits.levels
    if (mix.num_variables, mix.levels) != (S, L):
        raise ValueError(
            f"{a.trees[0]}: a tree over {mix.num_variables} variables with {mix.levels} levels does not fit the "
            f"data {splits.name!r} ({S} pixels, L={L})"
        )
    val = splits.val_x[: a.val_limit]
    val_lls = mix.component_log_probs(val.reshape(len(val), -1).float().to(a.device)).double()  # [T, n] nats
    if a.fit_weights:
        mix = TreeMixture(trees, fit_weights(val_lls).float()).to(a.device)
    scale = S * math.log(2)
    test_lp = mix.log_prob(splits.test_x.reshape(len(splits.test_x), -1).float().to(a.device))  # [n] nats
    path = mix.save(a.out)
    report = {
        "out": str(path),
        "trees": len(trees),
        "weights": [round(float(w), 4) for w in mix.log_weights.exp()],
        "val_bpd_each": [round(float(v), 4) for v in -val_lls.mean(1) / scale],
        "val_bpd": float(-torch.logsumexp(mix.log_weights.double()[:, None].cpu() + val_lls.cpu(), 0).mean() / scale),
        "test_bpd": float(-test_lp.double().mean() / scale),
        "params": mix.num_params,
    }
    print(json.dumps(report))
    return 0
