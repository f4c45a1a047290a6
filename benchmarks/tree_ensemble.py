"""Tree circuits of several seeds, their mixture, and paired differences, on the MNIST test set.

Loads tree circuits (``.safetensors`` from ``mnist_tree_circuit.py --out``), scores every validation
(the first ``--val-limit``) and test image with each, and prints ONE JSON line: each tree's validation
and test BPD, their mean ± std over seeds, the BPDs of their mixture ``p(x) = Σ_t π_t p_t(x)``
(:class:`~vq2pc.circuit.tree_mixture.TreeMixture`: a sum node over the trees, still a smooth, decomposable
circuit, with the trees' parameters added up; ``π`` uniform, or with ``--fit-weights`` fitted on the
validation images), and, with ``--against FILE.npy`` (a baseline's per-image test BPDs, e.g.
``vq2pc train-baseline``'s ``OUT/<key>.test_bpd.npy``), the paired difference of every tree and of the
mixture against it with its 95% interval. ``--out`` writes the mixture (one file).

    python benchmarks/tree_ensemble.py seed0.safetensors seed1.safetensors seed2.safetensors \\
        --data-dir DIR --against runs/field/quad-graph-cp-64.test_bpd.npy
"""

from __future__ import annotations

import argparse
import json
import math
import statistics

import numpy as np
import torch

from vq2pc.circuit.tree import TreeCircuit
from vq2pc.circuit.tree_mixture import TreeMixture, fit_weights
from vq2pc.data.datasets import load_dataset
from vq2pc.evaluate.density import paired_difference


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("trees", nargs="+", help="tree circuit files")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--against", default=None, help="per-image test BPDs of a baseline (.npy)")
    p.add_argument("--val-limit", type=int, default=2000, help="validation images scored (the first ones)")
    p.add_argument("--fit-weights", action="store_true", help="fit the mixture weights on those validation images")
    p.add_argument("--out", default=None, help="write the mixture here (.safetensors)")
    a = p.parse_args()
    d = load_dataset(a.dataset, a.data_dir)
    x, val = (v.reshape(len(v), -1).float() for v in (d.test_x, d.val_x[: a.val_limit]))
    circuits = [TreeCircuit.load(path) for path in a.trees]
    val_lls = TreeMixture(circuits).component_log_probs(val).double()  # [T, n_val] nats, scored once
    mix = TreeMixture(circuits, fit_weights(val_lls) if a.fit_weights else None)
    lls = mix.component_log_probs(x).double()  # [T, n] nats
    scale = x.shape[1] * math.log(2)
    per_tree = -lls / scale  # [T, n] BPD
    log_w = mix.log_weights.double()[:, None]
    mixture = -torch.logsumexp(log_w + lls, 0) / scale
    val_bpd = -val_lls.mean(1) / scale
    means = [float(b.mean()) for b in per_tree]
    row = {
        "trees": len(circuits),
        "test_bpd": [round(m, 4) for m in means],
        "val_bpd": [round(float(v), 4) for v in val_bpd],
        "test_bpd_mean": round(statistics.mean(means), 4),
        "test_bpd_std": round(statistics.stdev(means), 4) if len(means) > 1 else 0.0,
        "weights": [round(float(w), 4) for w in mix.log_weights.exp()],
        "mixture_val_bpd": round(float(-torch.logsumexp(log_w + val_lls, 0).mean() / scale), 4),
        "mixture_test_bpd": round(float(mixture.mean()), 4),
        "params_each": [c.num_params for c in circuits],
        "params_mixture": mix.num_params,
    }
    if a.out:
        mix.save(a.out)
    if a.against:
        base = torch.from_numpy(np.load(a.against))
        row["paired_vs_baseline"] = [_paired(b, base) for b in per_tree]
        row["mixture_paired_vs_baseline"] = _paired(mixture, base)
    print(json.dumps(row))


def _paired(a: torch.Tensor, b: torch.Tensor) -> dict[str, object]:
    d = paired_difference(a, b)
    return {"difference": round(d["difference"], 4), "ci95": [round(v, 4) for v in d["ci95"]],
            "lower_fraction": round(d["a_lower_fraction"], 4)}  # fmt: skip


if __name__ == "__main__":
    main()
