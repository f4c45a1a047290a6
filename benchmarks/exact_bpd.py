"""Exact model ExM: test-set log-likelihood cost before and after the loop swap.

``before``: the old loop order — rows outside (one ``log_prob`` call per 500-image batch),
latents inside, so every batch re-decodes all ``K^{HW}`` latents. ``after``: latent chunks
outside, row batches inside (``ExactModel.log_prob`` on the whole set): one pass of decodes per
dequantization draw. ``draws``: the same with every draw's rows in one call (what ``test_bpd``
does now, ``[draws·n, S]`` rows): one pass of decodes for all draws.

Prints one JSON line per (K, path): K, grid, path, n_test, draws, latents (K^{HW}),
decodes (latents passed through the decoder for the whole test BPD: counted, scaled up
when extrapolated), seconds (whole test BPD), extrapolated (bool), measured (what was
timed: rows x latents), enumerate_seconds, bpd (exact test BPD, when every latent was streamed),
model, threads, load_avg (1-minute load average when it started).

Extrapolation, so that a 2-core run stays short: ``--latent-fraction f`` streams only the
first ``f·K^{HW}`` latents (the real code path, restricted to a slice like one rank of a
sharded run) and scales by ``1/f``; ``before`` times ``--before-batches`` batches and scales
to every batch. Cost is linear in both, so the scaled seconds are the full run's up to noise.

The VQ-VAE (2x2 grid, D = 1, hidden 64, 2 residual blocks: configs/mnist-exact-2x2.yaml) and
the class-conditional PixelCNN prior are randomly initialised: the cost does not depend on the weights.

    python benchmarks/exact_bpd.py --data-dir DIR --K 16 32 --latent-fraction 0.25
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch

import vq2pc.circuit.exact as exact_mod
from vq2pc.circuit.exact import ExactModel
from vq2pc.data.datasets import bpd, load_dataset, to_model_space
from vq2pc.models.priors.pixelcnn import PixelCNNPrior, PriorConfig
from vq2pc.models.vqvae import VQVAE, VQVAEConfig


def _models(K: int, splits, seed: int) -> tuple[VQVAE, PixelCNNPrior]:
    torch.manual_seed(seed)
    vqvae = VQVAE(
        VQVAEConfig(
            image_shape=splits.image_shape,
            levels=splits.levels,
            leaf="gaussian",
            latent_hw=(2, 2),
            K=K,
            D=1,
            hidden=64,
            res_blocks=2,
        )
    )
    prior = PixelCNNPrior(PriorConfig(K=K, latent_hw=(2, 2), num_classes=splits.num_classes, hidden=64, layers=4))
    prior.set_class_prior(splits.train_y)
    return vqvae.eval(), prior.eval()


@contextmanager
def _first_latents(model: ExactModel, fraction: float) -> Iterator[int]:
    """Stream only the first ``m = fraction·K^{HW}`` latents (the ``sharded=True`` path: one rank's slice)."""
    m = max(1, round(len(model) * fraction))
    old = exact_mod.shard_range
    exact_mod.shard_range = lambda n: (0, m)
    try:
        yield m
    finally:
        exact_mod.shard_range = old


def _run_path(model: ExactModel, x: list[torch.Tensor], path: str, args, decoded: list[int]) -> dict:
    """The test BPD's log-likelihoods in the ``path`` loop order (``x``: one ``[n, S]`` tensor per draw):
    seconds and decodes measured, and the factor that scales them to every draw, image and latent."""
    bs = args.batch_size
    rows = {"before": x[0][: bs * args.before_batches], "after": x[0], "draws": torch.cat(x)}[path]
    decoded.clear()
    start = time.perf_counter()
    with _first_latents(model, args.latent_fraction) as m:
        if path == "before":  # the old order: one call, i.e. one full stream of the latents, per batch of rows
            lp = torch.cat(
                [model.log_prob(rows[a : a + bs], batch_size=bs, sharded=True) for a in range(0, rows.shape[0], bs)]
            )
        else:
            lp = model.log_prob(rows, batch_size=bs, sharded=True)
    seconds = time.perf_counter() - start
    scale = (len(x) * x[0].shape[0] / rows.shape[0]) * (len(model) / m)
    return {
        "seconds": seconds,
        "decodes": sum(decoded),
        "scale": scale,
        "lp": lp if m == len(model) else None,
        "measured": f"{rows.shape[0]} rows x {m} latents",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", required=True, help="directory with the MNIST IDX files")
    ap.add_argument("--K", type=int, nargs="+", default=[16, 32], help="codebook sizes")
    ap.add_argument("--n-test", type=int, default=None, help="test images (default: all 10k)")
    ap.add_argument("--draws", type=int, default=3, help="dequantization draws of the test BPD (as test_bpd)")
    ap.add_argument("--batch-size", type=int, default=500, help="rows per batch (test_bpd's default)")
    ap.add_argument("--before-batches", type=int, default=1, help="batches timed in the old loop order")
    ap.add_argument("--latent-fraction", type=float, default=1.0, help="stream this fraction of K^(HW), scale up")
    ap.add_argument("--paths", nargs="+", default=["before", "after", "draws"], choices=["before", "after", "draws"])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if not 0 < args.latent_fraction <= 1:
        raise SystemExit("--latent-fraction must lie in (0, 1]")
    splits = load_dataset("mnist", args.data_dir, download=False)
    test_v = splits.test_x[: args.n_test] if args.n_test else splits.test_x
    g = torch.Generator().manual_seed(args.seed)
    x = [to_model_space(test_v, "gaussian", splits.levels, g).flatten(1) for _ in range(args.draws)]
    for K in args.K:
        vqvae, prior = _models(K, splits, args.seed)
        start = time.perf_counter()
        model = ExactModel(vqvae, prior, max_space=2**27)
        enum_seconds = time.perf_counter() - start
        decoded: list[int] = []
        decode = model._decode
        model._decode = lambda idx, decoded=decoded, decode=decode: decoded.append(len(idx)) or decode(idx)
        for path in args.paths:
            load = os.getloadavg()[0]
            r = _run_path(model, x, path, args, decoded)
            line = {
                "K": K,
                "grid": "2x2",
                "path": path,
                "n_test": test_v.shape[0],
                "draws": args.draws,
                "latents": len(model),
                "decodes": round(r["decodes"] * r["scale"]),
                "seconds": round(r["seconds"] * r["scale"], 2),
                "extrapolated": r["scale"] != 1.0,
                "measured": f"{r['measured']}, {r['seconds']:.2f} s, {r['decodes']} decodes",
                "enumerate_seconds": round(enum_seconds, 2),
                "model": "random init",
                "threads": torch.get_num_threads(),
                "load_avg": round(load, 2),
            }
            if r["lp"] is not None and path != "before":  # every latent streamed: the exact BPD
                bits = bpd(r["lp"].double(), x[0].shape[1], splits.levels, "gaussian")
                line["bpd"] = round(float(bits.mean()), 4)  # over the draws the rows hold
            print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
