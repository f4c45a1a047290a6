"""Sample class balance of a run's circuits over several independent sample draws.

The label histogram's KL from uniform, estimated from ``n`` samples, has a sampling noise of about
``sqrt(Var_p[log p_c] / n)`` (0.0015 nats at ``n = 10,000`` on MNIST): two circuits whose KLs differ by
less than that are not told apart by one draw. This draws ``--samples`` samples per ``--seeds`` entry
from each circuit file of a ``vq2pc run`` folder, classifies them with the run's classifier
(``<run>/classifier.pt``, trained by the samples experiment), and prints one JSON line per circuit:
the KL of every draw, their mean and spread, and the KL of all draws pooled (``± kl_std``, the
bootstrap noise of :func:`vq2pc.evaluate.kl_std`).

    python benchmarks/class_balance_seeds.py --run runs/mnist-ft-cpu \\
        --circuits sample-N4096 sample-N4096-ft-cap0.125 --seeds 3 5 7 11 13
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from vq2pc.circuit import MixtureCircuit
from vq2pc.evaluate import classify, draw_samples, label_histogram, load_classifier


def _circuit_file(run: Path, name: str) -> Path:
    found = sorted(run.glob(f"*/*/circuits/{name}.safetensors"))
    if len(found) != 1:
        raise SystemExit(
            f"{name}: expected one circuit file <leaf>/<model>/circuits/{name}.safetensors "
            f"under {run}, found {len(found)}"
        )
    return found[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True, help="a vq2pc run folder with classifier.pt")
    ap.add_argument("--circuits", nargs="+", required=True, help="circuit file stems, e.g. sample-N4096")
    ap.add_argument("--seeds", type=int, nargs="+", default=[3, 5, 7, 11, 13])
    ap.add_argument("--samples", type=int, default=10_000, help="samples per seed")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not (args.run / "classifier.pt").exists():
        raise SystemExit(f"{args.run}/classifier.pt not found: run the samples experiment first")
    classifier = load_classifier(args.run / "classifier.pt")
    for name in args.circuits:
        start = time.perf_counter()
        circuit = MixtureCircuit.load(_circuit_file(args.run, name))
        shape, levels = tuple(circuit.meta["image_shape"]), int(circuit.meta["levels"])
        labels = [
            classify(
                classifier,
                draw_samples(
                    circuit,
                    args.samples,
                    circuit.leaf.kind,
                    levels,
                    shape,
                    batch_size=250,
                    generator=torch.Generator().manual_seed(s),
                ),
            )
            for s in args.seeds
        ]
        C = int(classifier.cfg.num_classes)
        per_seed = [label_histogram(lab, C)["kl_from_uniform"] for lab in labels]
        pooled = label_histogram(torch.cat(labels), C)
        print(
            json.dumps(
                {
                    "circuit": name,
                    "seeds": args.seeds,
                    "samples_per_seed": args.samples,
                    "kl_per_seed": [round(k, 5) for k in per_seed],
                    "kl_mean": round(statistics.mean(per_seed), 5),
                    "kl_sd_over_seeds": round(statistics.stdev(per_seed), 5) if len(per_seed) > 1 else None,
                    "kl_pooled": round(pooled["kl_from_uniform"], 5),
                    "kl_pooled_std": round(pooled["kl_std"], 5),
                    "hist_pooled": pooled["hist"],
                    "seconds": round(time.perf_counter() - start, 1),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
