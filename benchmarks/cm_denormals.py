"""Seconds per continuous-mixture training step on MNIST, denormal floats kept vs flushed to zero.

The CM's posterior over its integration points is mostly ``exp(−hundreds of nats)``; its gradients fill the
decoder's backward matrix products with float32 denormals, which x86 CPUs multiply several times slower.
``train_cm`` flushes them (``vq2pc.core.devices.flush_denormals``). Prints one JSON line per setting:
denormals, train_points, batch_size, seconds_per_step, threads. The same initialised CM (the configs'
latent 16, hidden 256) and the same first MNIST training batch for both.

    python benchmarks/cm_denormals.py --data-dir ../shared/data          # MNIST IDX files in DIR/mnist
    python benchmarks/cm_denormals.py --data-dir DIR --threads 2 --steps 40
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import sys
import time

import torch

from vq2pc.baselines.cm import CMConfig, ContinuousMixture, _cm_loss
from vq2pc.core.devices import flush_denormals
from vq2pc.core.optim import adam
from vq2pc.data.datasets import load_dataset, to_model_space


def _seconds_per_step(model: ContinuousMixture, x: torch.Tensor, steps: int) -> float:
    model = copy.deepcopy(model).train()
    opt, loss_fn = adam(list(model.parameters()), 2e-3), _cm_loss(model.cfg, 0, 0)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(model, (x,)).backward()
        opt.step()

    for _ in range(3):  # warm-up
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default="../shared/data", help="folder with mnist/ IDX files")
    ap.add_argument("--train-points", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    try:
        splits = load_dataset("mnist", args.data_dir, seed=0, download=False)
    except FileNotFoundError as exc:
        sys.exit(f"{exc} (pass --data-dir; this benchmark does not download)")
    x = to_model_space(splits.train_x[: args.batch_size], "gaussian", splits.levels, torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    model = ContinuousMixture(CMConfig(splits.image_shape, latent_dim=16, hidden=256, train_points=args.train_points))
    for denormals in ("kept", "flushed"):
        with flush_denormals("cpu") if denormals == "flushed" else contextlib.nullcontext():
            seconds = _seconds_per_step(model, x, args.steps)
        print(
            json.dumps(
                {
                    "denormals": denormals,
                    "train_points": args.train_points,
                    "batch_size": args.batch_size,
                    "seconds_per_step": round(seconds, 4),
                    "threads": args.threads,
                }
            )
        )


if __name__ == "__main__":
    main()
