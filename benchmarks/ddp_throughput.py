"""Data-parallel training throughput: VQ-VAE training images per second with P = 1, 2, ... ranks.

P = 1 is the default single-process path (no process group). P > 1 spawns P processes joined
by :func:`vq2pc.core.distributed.init_from_env` (gloo on CPU, nccl with ``--device cuda``: one
GPU per rank), exactly as under ``torchrun``; each rank computes its slice of every global batch
(:func:`vq2pc.models.train.fit`). On CPU the machine's cores are split between the ranks
(``--threads`` in all), so P = 2 on 2 cores measures DDP's overhead more than any speed-up.

Prints one JSON line per P: P, device, images_per_s (training images of one epoch / its wall
seconds, validation included), seconds, images, batch_size, threads_per_rank, load_avg (1-minute
load average at the start: other jobs on the machine slow every figure).

    python benchmarks/ddp_throughput.py --data-dir DIR --P 1 2
    python benchmarks/ddp_throughput.py --data-dir DATA --device cuda --P 1 2 4 8
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.multiprocessing as mp

from vq2pc.core.distributed import init_from_env, is_main, shutdown
from vq2pc.data.datasets import load_dataset
from vq2pc.models.train import TrainConfig
from vq2pc.models.vqvae import VQVAEConfig, train_vqvae


def _train(args: argparse.Namespace, device: str) -> tuple[float, int]:
    """Wall seconds of one training epoch (+ validation) and the number of training images."""
    d = load_dataset(args.dataset, args.data_dir, seed=0, download=False)
    d = replace(d, train_x=d.train_x[: args.images], val_x=d.val_x[:256])
    cfg = VQVAEConfig(
        image_shape=d.image_shape,
        levels=d.levels,
        leaf="gaussian",
        latent_hw=(2, 2),
        K=16,
        D=1,
        hidden=args.hidden,
        res_blocks=2,
    )
    tcfg = TrainConfig(epochs=1, batch_size=args.batch_size, device=device, progress=False)
    start = time.perf_counter()
    train_vqvae(d, cfg, tcfg)
    return time.perf_counter() - start, len(d.train_x)


def _rank(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(max(1, args.threads // world))
    try:
        seconds, images = _train(args, init_from_env(args.device))
        if is_main():
            Path(out).write_text(json.dumps([seconds, images]))
    finally:
        shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _measure(P: int, args: argparse.Namespace) -> tuple[float, int]:
    if P == 1:
        torch.set_num_threads(args.threads)
        return _train(args, args.device)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rank0.json")
        mp.start_processes(_rank, args=(P, _free_port(), args, out), nprocs=P, start_method="spawn")
        return tuple(json.loads(Path(out).read_text()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", required=True, help="directory with the dataset files")
    ap.add_argument("--dataset", default="mnist")
    ap.add_argument("--P", type=int, nargs="+", default=[1, 2], help="numbers of ranks")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda (one GPU per rank)")
    ap.add_argument("--images", type=int, default=2048, help="training images (one epoch)")
    ap.add_argument("--batch-size", type=int, default=128, help="global batch size")
    ap.add_argument("--hidden", type=int, default=32, help="VQ-VAE channels")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads in all (split over ranks)")
    args = ap.parse_args()
    for P in args.P:
        load = os.getloadavg()[0]
        seconds, images = _measure(P, args)
        print(
            json.dumps(
                {
                    "P": P,
                    "device": args.device,
                    "images_per_s": round(images / seconds, 1),
                    "seconds": round(seconds, 2),
                    "images": images,
                    "batch_size": args.batch_size,
                    "threads_per_rank": max(1, args.threads // P),
                    "load_avg": round(load, 2),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
