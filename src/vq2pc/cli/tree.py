"""``vq2pc distill-tree``: a deep distilled circuit (a tree over the latent grid) from a run folder's VQ-VAE."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from vq2pc.circuit.tree_fit import SOURCES, bpd, distill_tree, em_fit, smoothing, source_pairs
from vq2pc.cli.options import add_parser, data_options, out_option
from vq2pc.data.datasets import check_fits, load_dataset
from vq2pc.models.priors import load_prior
from vq2pc.models.vqvae import VQVAE


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``distill-tree`` verb."""
    p = add_parser(
        subparsers,
        "distill-tree",
        help="a tree circuit over a VQ-VAE's latent grid with patch-local leaves (latent variable distillation + EM); "
        "prints JSON",
        description="Latent variable distillation: the VQ-VAE's codes (or the prior's samples) make the data complete; "
        "a Chow-Liu tree over the latent positions and per-patch categorical leaves are counted in closed form, then "
        "fine-tuned by EM on the training images, early-stopped on validation BPD. The result is an exact circuit over "
        "all K^{HW} latent grids (vq2pc.TreeCircuit).",
    )
    p.add_argument(
        "run", help="folder with vqvae.pt (and prior*.pt for --source prior / mixed), e.g. RUN/categorical/4x4"
    )
    data_options(p)
    p.add_argument("--source", choices=SOURCES, default="encoded", help="where the latents come from")
    p.add_argument(
        "--prior-samples", type=int, default=20000, help="pairs drawn from the prior (--source prior / mixed)"
    )
    p.add_argument("--alpha-leaf", type=float, default=0.1, help="leaf pseudo-count (× L × the pixel's marginal)")
    p.add_argument("--alpha-edge", type=float, default=0.1, help="pseudo-count per root / edge table entry")
    p.add_argument("--iterations", type=int, default=10, help="maximum EM iterations (0: the distilled circuit)")
    p.add_argument("--patience", type=int, default=1, help="EM iterations without a better validation BPD")
    p.add_argument("--batch-size", type=int, default=512, help="rows per E-step batch")
    out_option(p, "tree circuit file to write (.safetensors)", required=True)
    p.set_defaults(func=cmd_distill_tree)


def _prior(run: Path, device: str) -> Any:
    found = sorted(run.glob("prior*.pt"))
    if not found:
        raise ValueError(f"no prior (prior*.pt) in {run}: --source prior / mixed needs one")
    return load_prior(found[0], device=device)


def cmd_distill_tree(a: argparse.Namespace) -> int:
    run = Path(a.run)
    vqvae = VQVAE.load(run / "vqvae.pt", device=a.device)
    splits = load_dataset(a.dataset, a.data_dir, seed=a.seed, limit=a.limit)
    check_fits(vqvae.cfg.image_shape, vqvae.cfg.levels, splits, f"the VQ-VAE of {run}")
    start = time.perf_counter()
    prior = _prior(run, a.device) if a.source != "encoded" else None
    gen = torch.Generator().manual_seed(a.seed)
    codes, images = source_pairs(a.source, vqvae, splits.train_x, prior, a.prior_samples, gen)
    smooth = smoothing(splits.train_x, splits.levels, a.alpha_leaf, a.alpha_edge)
    meta = {"source": a.source, "dataset": splits.name}
    c = distill_tree(codes, images, vqvae.K, splits.levels, splits.image_shape, vqvae.latent_hw, smooth, meta)
    c = c.to(a.device)
    val_init = bpd(c, splits.val_x)
    fitted = em_fit(c, splits.train_x, splits.val_x, smooth, a.iterations, a.patience, a.batch_size)
    path = c.save(a.out)
    report = {
        "out": str(path),
        "source": a.source,
        "K": c.K,
        "grid": list(vqvae.latent_hw),
        "params": c.num_params,
        "val_bpd_distilled": val_init,
        "val_bpd": fitted.best_val_bpd,
        "test_bpd": bpd(c, splits.test_x),
        "em_iterations": len(fitted.history) - 1,
        "best_iteration": fitted.best_iteration,
        "seconds": round(time.perf_counter() - start, 2),
    }
    print(json.dumps(report))
    return 0
