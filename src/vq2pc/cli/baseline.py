"""``vq2pc train-baseline``: one of the field's circuits (QuadGraph, HCLT, ...) on a dataset, outside a run."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vq2pc.baselines.einet_config import EiNetConfig
from vq2pc.cli.options import (
    EXPERIMENTS,
    RUN,
    add_parser,
    data_options,
    out_option,
    setting,
    train_config,
    train_options,
)
from vq2pc.data.datasets import load_dataset
from vq2pc.pipeline.baselines import fit_circuit
from vq2pc.pipeline.config import CircuitSpec

_SPEC = CircuitSpec()


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``train-baseline`` verb."""
    p = add_parser(
        subparsers,
        "train-baseline",
        help="train a libcirkit circuit baseline (QuadGraph, HCLT, EiNet structures) and score its BPD",
        description=(
            "Train one libcirkit circuit by maximum likelihood on the same splits as `vq2pc run` and score "
            "its validation and test BPD the way the report does. The training resumes from OUT/<key>.pt "
            "after an interruption; the result row is written to OUT/<key>.json and printed as JSON (the key names "
            "the structure, with a suffix for Gaussian leaves and one for a seed other than 0). Gaussian leaves "
            "also report the exact discrete BPD of their discretized twin. "
            "Categorical pixels give a discrete BPD comparable with the published MNIST circuits."
        ),
    )
    data_options(p)
    train_options(p, RUN.baseline_train)
    for name in ("region_graph", "sum_product", "units", "pic_net_dim"):
        setting(p, _SPEC, name)
    # categorical by default, not the EiNet's gaussian: its discrete BPD compares with the published circuits
    setting(p, EiNetConfig, "leaf", default="categorical", help="pixel leaves")
    setting(p, RUN.baseline_train, "max_seconds")
    setting(p, EXPERIMENTS, "bpd_draws")
    out_option(p, "directory to write the checkpoint and the result row into", default="runs/baselines")
    p.set_defaults(func=cmd_train_baseline)


def cmd_train_baseline(args: argparse.Namespace) -> int:
    """Train, score and print the result row (without its training history) as JSON."""
    spec = CircuitSpec(
        region_graph=args.region_graph, sum_product=args.sum_product, units=args.units, pic_net_dim=args.pic_net_dim
    )
    train = train_config(args, max_seconds=args.max_seconds)
    splits = load_dataset(args.dataset, args.data_dir, seed=args.seed, limit=args.limit)
    row = fit_circuit(splits, spec, args.leaf, train, Path(args.out), bpd_draws=args.bpd_draws)
    print(json.dumps({k: v for k, v in row.items() if k not in ("history", "test_bpd_quantiles")}))
    return 0
