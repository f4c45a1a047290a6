"""``vq2pc refine``: EM refinement of a saved circuit on a dataset's training split."""

from __future__ import annotations

import argparse
import json
import math

import torch
from torch import Tensor

from vq2pc.circuit.mixture import MixtureCircuit
from vq2pc.circuit.refine import EMConfig, em_refine
from vq2pc.data.datasets import (
    DATASET_NAMES,
    DataSplits,
    bpd,
    load_dataset,
    to_model_space,
)

_FMT = argparse.ArgumentDefaultsHelpFormatter


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``refine`` verb."""
    p = subparsers.add_parser(
        "refine",
        help="refine a circuit's weights (and leaves) by EM on training data; prints JSON with the history",
        formatter_class=_FMT,
        description="Expectation-maximization on the training split; the result is still an exact mixture.",
    )
    p.add_argument("circuit", help="circuit file written by MixtureCircuit.save (.safetensors)")
    p.add_argument("--dataset", default="digits", choices=DATASET_NAMES, help="dataset")
    p.add_argument("--data-dir", help="directory with the dataset files (else $VQ2PC_DATA, else ~/.cache/vq2pc)")
    p.add_argument("--limit", type=int, help="cap every split at this many images")
    p.add_argument("--iterations", type=int, default=10, help="maximum EM iterations")
    p.add_argument("--leaves", action="store_true", help="also refine the leaf parameters")
    p.add_argument("--no-weights", action="store_true", help="keep the mixture weights fixed")
    p.add_argument("--prior-strength", type=float, default=1.0, help="Dirichlet pseudo-count per component (1 = ML)")
    p.add_argument("--smoothing", type=float, default=1e-2, help="pseudo-count per level of categorical/Bernoulli leaves")
    p.add_argument("--min-std", type=float, default=1e-3, help="Gaussian std floor")
    p.add_argument("--max-std", type=float, default=1.0, help="Gaussian std ceiling")
    p.add_argument("--batch-size", type=int, default=1024, help="rows per E-step batch")
    p.add_argument("--tol", type=float, default=1e-6, help="stop when the mean objective improves by less")
    p.add_argument("--seed", type=int, default=0, help="random seed (data split, dequantization noise)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--progress", action="store_true", help="print every iteration to stderr")
    p.add_argument("--out", required=True, help="refined circuit to write (.safetensors)")
    p.set_defaults(func=cmd_refine)


def _levels(circuit: MixtureCircuit, splits: DataSplits) -> int:
    """The circuit's ``meta["levels"]`` (checked against the dataset) or the dataset's levels."""
    levels = int(circuit.meta.get("levels", splits.levels))
    if levels != splits.levels:
        raise ValueError(f"the circuit was built for {levels} levels but dataset {splits.name!r} has {splits.levels}")
    return levels


def _model_space(v: Tensor, kind: str, levels: int, g: torch.Generator, device: str) -> Tensor:
    return to_model_space(v, kind, levels, g).reshape(v.shape[0], -1).to(device)


def cmd_refine(args: argparse.Namespace) -> int:
    cfg = EMConfig(
        iterations=args.iterations, weights=not args.no_weights, leaves=args.leaves,
        prior_strength=args.prior_strength, smoothing=args.smoothing, min_std=args.min_std,
        max_std=args.max_std, batch_size=args.batch_size, tol=args.tol,
    )
    circuit = MixtureCircuit.load(args.circuit, device=args.device)
    splits = load_dataset(args.dataset, args.data_dir, seed=args.seed, limit=args.limit)
    levels = _levels(circuit, splits)
    kind = circuit.leaf.data_kind
    g = torch.Generator().manual_seed(args.seed)
    train = _model_space(splits.train_x, kind, levels, g, args.device)
    test = _model_space(splits.test_x, kind, levels, g, args.device)
    refined, history = em_refine(circuit, train, cfg, progress=args.progress)
    path = refined.save(args.out)

    def test_ll(c: MixtureCircuit) -> float:
        return float(c.log_prob(test).double().mean())

    before, after = test_ll(circuit), test_ll(refined)
    s = circuit.num_variables

    def to_bpd(ll: float) -> float | None:  # None for a zero-probability test set (JSON has no inf)
        return float(bpd(torch.tensor(ll), s, levels, kind)) if math.isfinite(ll) else None

    report = {
        "out": str(path),
        "leaf": kind,
        "N": len(circuit),
        "train_rows": int(train.shape[0]),
        "updates": len(history) - 1,
        "history": history,
        "objective": refined.meta["em"]["objective"],
        "train_ll_before": history[0],
        "train_ll_after": history[-1],
        "test_ll_before": before if math.isfinite(before) else None,
        "test_ll_after": after if math.isfinite(after) else None,
        "train_bpd_before": to_bpd(history[0]),
        "train_bpd_after": to_bpd(history[-1]),
        "test_bpd_before": to_bpd(before),
        "test_bpd_after": to_bpd(after),
    }
    print(json.dumps(report))
    return 0
