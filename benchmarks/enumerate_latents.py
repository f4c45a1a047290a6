"""Benchmark: exact enumeration of log p(z) over all K^{HW} latents with an untrained prior.

Default: the paper's DM 2×2 setting (K = 96, 2×2 grid, C = 10 classes, hidden 64,
4 layers). Prints one JSON line. ``--K 32`` is a quick run; the full K = 96
space (85M latents, ≈ 8.8M prior rows) is a long one on a small CPU.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch

from vq2pc.latents.enumerate import enumerate_log_prior, latent_space_size
from vq2pc.models.priors.pixelcnn import PixelCNNPrior, PriorConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--K", type=int, default=96)
    ap.add_argument("--grid", type=int, nargs=2, default=(2, 2), metavar=("H", "W"))
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=16384, help="prefix x class rows per prior call")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--progress", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = PriorConfig(
        K=args.K, latent_hw=tuple(args.grid), num_classes=args.classes, hidden=args.hidden, layers=args.layers
    )
    prior = PixelCNNPrior(cfg).to(args.device).eval()
    space = latent_space_size(args.K, *args.grid)
    start = time.perf_counter()
    log_p = enumerate_log_prior(prior, batch_size=args.batch_size, progress=args.progress, max_space=space)
    if log_p.is_cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    total = float(torch.logsumexp(log_p.double(), 0))
    print(
        json.dumps(
            {
                "benchmark": "enumerate_latents",
                "K": args.K,
                "grid": list(args.grid),
                "classes": args.classes,
                "hidden": args.hidden,
                "layers": args.layers,
                "space": space,
                "device": args.device,
                "threads": torch.get_num_threads(),
                "batch_size": args.batch_size,
                "seconds": round(seconds, 3),
                "latents_per_second": round(space / seconds),
                "prior_rows_per_second": round(
                    args.classes * sum(args.K**d for d in range(args.grid[0] * args.grid[1])) / seconds
                ),
                "log_total_probability": total,
                "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
