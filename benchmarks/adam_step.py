"""Seconds of one training step, fused Adam (``vq2pc.core.optim.adam``) against torch's default Adam.

Prints one JSON line per model and optimizer: model, params, optimizer, forward_backward_s and
optimizer_s (medians over --repeat steps after 2 warm-up steps), threads. The models are the ones whose
steps dominate the MNIST configs: the categorical continuous mixture of
``configs/mnist-categorical-ft-cpu.yaml`` (hidden 128, 64 points: a 256 x (784·256) output layer, 51M
parameters) and that config's 4x4 VQ-VAE.

    python benchmarks/adam_step.py                 # both models, one thread
    python benchmarks/adam_step.py --threads 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Callable

import torch
from torch import nn

from vq2pc.baselines.cm import CMConfig, ContinuousMixture, sobol_normal
from vq2pc.core.optim import adam
from vq2pc.models.vqvae import VQVAE, VQVAEConfig


def _cases(batch: int) -> dict[str, tuple[nn.Module, Callable[[nn.Module], torch.Tensor]]]:
    torch.manual_seed(0)
    cm = ContinuousMixture(
        CMConfig(image_shape=(1, 28, 28), leaf="categorical", levels=256, hidden=128, train_points=64)
    )
    x_cat, z = torch.randint(0, 256, (batch, 784)).float(), sobol_normal(64, 16, 0)
    vq = VQVAE(
        VQVAEConfig(
            image_shape=(1, 28, 28),
            leaf="categorical",
            levels=256,
            latent_hw=(4, 4),
            K=512,
            D=64,
            hidden=32,
            res_blocks=2,
        )
    )
    x_img = torch.randint(0, 256, (batch, 1, 28, 28)).float()
    return {
        "cm-categorical": (cm, lambda m: -m.log_prob(x_cat, z).mean()),
        "vqvae-4x4-categorical": (vq, lambda m: m.loss(x_img)[0]),
    }


def _time(
    model: nn.Module, loss_fn: Callable[[nn.Module], torch.Tensor], opt: torch.optim.Optimizer, repeat: int
) -> tuple[float, float]:
    fb, st = [], []
    for _ in range(repeat + 2):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss_fn(model).backward()
        t1 = time.perf_counter()
        opt.step()
        fb.append(t1 - t0)
        st.append(time.perf_counter() - t1)
    return statistics.median(fb[2:]), statistics.median(st[2:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for name, (model, loss_fn) in _cases(args.batch).items():
        for label, opt in (
            ("fused", adam(model.parameters(), 1e-4)),
            ("default", torch.optim.Adam(model.parameters(), lr=1e-4)),
        ):
            fb, st = _time(model, loss_fn, opt, args.repeat)
            print(
                json.dumps(
                    {
                        "model": name,
                        "params": sum(p.numel() for p in model.parameters()),
                        "optimizer": label,
                        "forward_backward_s": round(fb, 4),
                        "optimizer_s": round(st, 4),
                        "threads": args.threads,
                    }
                ),
                flush=True,
            )


if __name__ == "__main__":
    main()
