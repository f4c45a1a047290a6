"""``vq2pc refine``: EM refinement of a saved circuit on a dataset's training split."""

from __future__ import annotations

import argparse
import json
import math

import torch
from torch import Tensor

from vq2pc.circuit.mixture import MixtureCircuit
from vq2pc.circuit.refine import EMConfig, em_refine
from vq2pc.cli.options import MODEL, add_parser, data_options, out_option, setting
from vq2pc.data.datasets import DataSplits, bpd, load_dataset, to_model_space

_EM = EMConfig()


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``refine`` verb."""
    p = add_parser(
        subparsers,
        "refine",
        help="refine a circuit's weights (and leaves) by EM on training data; prints JSON with the history",
        description="Expectation-maximization on the training split; the result is still an exact mixture.",
    )
    p.add_argument("circuit", help="circuit file written by MixtureCircuit.save (.safetensors)")
    data_options(p)
    setting(p, MODEL, "em_iterations", "--iterations")
    setting(p, MODEL, "em_leaves", "--leaves", action=argparse.BooleanOptionalAction)
    setting(p, _EM, "weights", "--no-weights", help="keep the mixture weights fixed")
    setting(p, MODEL, "em_prior_strength", "--prior-strength")
    setting(p, _EM, "smoothing")
    setting(p, _EM, "min_std", concept="std_min")
    setting(p, _EM, "max_std", concept="std_max")
    for name in ("batch_size", "tol"):
        setting(p, _EM, name)
    p.add_argument("--progress", action="store_true", help="print every iteration to stderr")
    out_option(p, "refined circuit file to write (.safetensors)", required=True)
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
        iterations=args.em_iterations,
        weights=args.weights,
        leaves=args.em_leaves,
        prior_strength=args.em_prior_strength,
        smoothing=args.smoothing,
        min_std=args.std_min,
        max_std=args.std_max,
        batch_size=args.batch_size,
        tol=args.tol,
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
