"""Seconds of ``ClassMixture.class_posterior`` against ``MixtureCircuit.log_prob`` on the same images.

One JSON line: N, B, S, C, leaf, threads, log_prob_s, class_posterior_s, ratio (target ≤ 1.2), and
recomputed_rows (rows whose unlikely classes fell below the float64 product's range and were summed
explicitly). Random Gaussian leaves (means U[0,1], stds U[0.05, 0.3]; images U[0, 1)) or, with
``--leaf categorical``, random categorical leaves over ``--levels`` levels (logits N(0, 2²); images
uniform levels); random class log-weights ``log p(c | n)`` (softmax of N(0, 3²) logits). Times are the
best of ``--repeat`` runs.

    python benchmarks/class_posterior.py                       # N = 16384, B = 10000, S = 784, C = 10
    python benchmarks/class_posterior.py --B 1000 --threads 2
    python benchmarks/class_posterior.py --leaf categorical --N 4096 --B 1000
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from vq2pc.circuit import class_weights as cw
from vq2pc.circuit.classes import ClassMixture
from vq2pc.circuit.mixture import MixtureCircuit
from vq2pc.core.leaves import Categorical, Gaussian


def _best(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--N", type=int, default=16384)
    ap.add_argument("--B", type=int, default=10000)
    ap.add_argument("--S", type=int, default=784)
    ap.add_argument("--C", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--memory-mib", type=float, default=1024)
    ap.add_argument("--leaf", choices=("gaussian", "categorical"), default="gaussian")
    ap.add_argument("--levels", type=int, default=256, help="categorical levels L")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    if args.leaf == "gaussian":
        leaf = Gaussian(torch.rand(args.N, args.S, generator=g), 0.05 + 0.25 * torch.rand(args.N, args.S, generator=g))
        x = torch.rand(args.B, args.S, generator=g)
    else:
        leaf = Categorical(2 * torch.randn(args.N, args.S, args.levels, generator=g))
        x = torch.randint(0, args.levels, (args.B, args.S), generator=g).float()
    circuit = MixtureCircuit(leaf, torch.zeros(args.N), memory_budget_mib=args.memory_mib)
    cond = torch.log_softmax(3 * torch.randn(args.N, args.C, generator=g), 1)
    model = ClassMixture(circuit, cond - torch.log(torch.tensor(float(args.N))))
    recomputed = [0]
    explicit = cw._explicit

    def counting(L: torch.Tensor, *rest):  # count the rows the exact recomputation takes
        recomputed[0] += L.shape[0]
        return explicit(L, *rest)

    cw._explicit = counting
    lp = _best(lambda: model.model.log_prob(x), args.repeat)
    recomputed[0] = 0
    cp = _best(lambda: model.class_posterior(x), args.repeat)
    print(
        json.dumps(
            {
                "N": args.N,
                "B": args.B,
                "S": args.S,
                "C": args.C,
                "leaf": args.leaf,
                "threads": args.threads,
                "log_prob_s": float(f"{lp:.4g}"),
                "class_posterior_s": float(f"{cp:.4g}"),
                "ratio": round(cp / lp, 3),
                "recomputed_rows": recomputed[0] // args.repeat,
            }
        )
    )


if __name__ == "__main__":
    main()
