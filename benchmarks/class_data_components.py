"""Classification by a class-aware mixture whose components are the VQ-VAE codes of labelled training images.

Each of ``N`` training images is encoded and decoded into a categorical leaf (one component); its class
weight is its own label, smoothed by ``eps`` (``w_{n,c} = (1 - eps)·1[c = y_n] + eps/(C-1)·1[c ≠ y_n]``,
uniform over ``n``). Validation images are classified by exact Bayes, ``p(c | x_o) ∝ Σ_n w_{n,c} p(x_o | n)``,
from full images and with half the pixels hidden at random. The components are decoded in chunks and
their log-likelihoods reduced per class on the fly, so ``N`` = 50,000 needs no ``[N, S, L]`` table (40 GB
on MNIST). ``--temperatures`` also scores the leaves ``p(x_i | n)^(1/T)`` renormalized over the levels.
Prints ONE JSON line: accuracy and label NLL (nats) per temperature, ``eps`` and mask.

    python benchmarks/class_data_components.py RUN/categorical/4x4/vqvae.pt --data-dir DIR --N 50000
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

from vq2pc.data.datasets import load_dataset
from vq2pc.models.vqvae import VQVAE, encode_images


def class_scores(vq: VQVAE, train_x, train_y, xv, observed, temperatures, chunk: int) -> torch.Tensor:
    """``[T, 2, V, C]`` float64 ``log Σ_{n: y_n = c} p(x_o | n)`` (mask 0: every pixel, 1: ``observed``)."""
    V, S = xv.shape
    C = int(train_y.max()) + 1
    out = torch.full((len(temperatures), 2, V, C), -math.inf, dtype=torch.float64)
    pixels = torch.arange(S)
    for n0 in range(0, len(train_x), chunk):
        with torch.no_grad():
            log_p = vq.decode(encode_images(vq, train_x[n0 : n0 + chunk])).logits  # [n, S, L]
        member = torch.nn.functional.one_hot(train_y[n0 : n0 + chunk], C).bool()  # [n, C]
        for t, temp in enumerate(temperatures):
            table = log_p if temp == 1 else torch.log_softmax(log_p / temp, -1)
            for v0 in range(0, V, 500):
                g = table[:, pixels, xv[v0 : v0 + 500]]  # [n, v, S]
                for m, ll in enumerate((g.sum(-1), (g * observed[v0 : v0 + 500]).sum(-1))):
                    per_class = ll.double().T.unsqueeze(-1).masked_fill(~member, -math.inf).logsumexp(1)
                    out[t, m, v0 : v0 + 500] = torch.logaddexp(out[t, m, v0 : v0 + 500], per_class)
    return out


def posterior(log_class: torch.Tensor, eps: float) -> torch.Tensor:
    """``[V, C]`` p(c | x) from per-class sums, labels smoothed by ``eps``."""
    s = (log_class - log_class.max(1, keepdim=True).values).exp()
    s = (1 - eps) * s + eps / (s.shape[1] - 1) * (s.sum(1, keepdim=True) - s)
    return s / s.sum(1, keepdim=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("vqvae", help="a categorical VQ-VAE (vqvae.pt)")
    p.add_argument("--data-dir", required=True)
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--N", type=int, default=50000, help="training images used as components (random subset)")
    p.add_argument("--val-limit", type=int, default=1000, help="validation images scored (the first ones)")
    p.add_argument("--temperatures", type=float, nargs="+", default=[1.0])
    p.add_argument("--eps", type=float, nargs="+", default=[0.01, 0.1])
    p.add_argument("--chunk", type=int, default=250, help="components decoded at once")
    a = p.parse_args()
    t0 = time.time()
    splits = load_dataset(a.dataset, a.data_dir, seed=0)
    vq = VQVAE.load(a.vqvae).eval()
    idx = torch.randperm(len(splits.train_x), generator=torch.Generator().manual_seed(0))[: a.N]
    xv, yv = splits.val_x[: a.val_limit].flatten(1).long(), splits.val_y[: a.val_limit]
    observed = torch.rand(xv.shape, generator=torch.Generator().manual_seed(1)) >= 0.5
    scores = class_scores(vq, splits.train_x[idx], splits.train_y[idx], xv, observed, a.temperatures, a.chunk)
    rows = []
    for t, temp in enumerate(a.temperatures):
        for m, mask in enumerate(("full", "random 50%")):
            for eps in a.eps:
                post = posterior(scores[t, m], eps)
                nll = -post[torch.arange(len(yv)), yv].clamp_min(1e-300).log().mean().item()
                acc = (post.argmax(1) == yv).double().mean().item()
                rows.append({"T": temp, "pixels": mask, "eps": eps, "accuracy": round(acc, 4), "nll": round(nll, 4)})
    print(json.dumps({"N": a.N, "val_images": len(yv), "rows": rows, "seconds": round(time.time() - t0, 1)}))


if __name__ == "__main__":
    main()
