"""Seconds per 1,000 exact EiNet samples (``EiNet.sample``) on the MNIST EiNet of the configs.

Prints one JSON line per input-unit count: num_input_units, leaf, samples, seconds, seconds_per_1000, threads.
The cost depends on the structure, not on trained weights, so an initialised EiNet (PD 4 on 28×28) is timed.
libcirkit 0.3.1's ``SamplingQuery``, which it replaced, took 72.6 s per 1,000 on the trained I = 10 EiNet
of ``docs/results/mnist-ft-2h-cpu/`` (2 threads).

    python benchmarks/einet_sampling.py                  # I = 10, 10,000 samples
    python benchmarks/einet_sampling.py --inputs 10 40 --threads 1
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from vq2pc.baselines.einet import EiNet, EiNetConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--inputs", type=int, nargs="+", default=[10], help="num_input_units = num_sum_units")
    ap.add_argument("--leaf", choices=["gaussian", "categorical"], default="gaussian")
    ap.add_argument("--samples", type=int, default=10000)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for units in args.inputs:
        model = EiNet(EiNetConfig((1, 28, 28), leaf=args.leaf, pieces=(4,), num_input_units=units, num_sum_units=units))
        model.sample(100, generator=torch.Generator().manual_seed(1))  # warm-up
        start = time.perf_counter()
        model.sample(args.samples, generator=torch.Generator().manual_seed(0))
        seconds = time.perf_counter() - start
        print(
            json.dumps(
                {
                    "num_input_units": units,
                    "leaf": args.leaf,
                    "samples": args.samples,
                    "seconds": round(seconds, 3),
                    "seconds_per_1000": round(1000 * seconds / args.samples, 4),
                    "threads": args.threads,
                }
            )
        )


if __name__ == "__main__":
    main()
