"""``vq2pc train-baseline``: one of the field's circuits (QuadGraph, HCLT, ...) on a dataset, outside a run."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vq2pc.baselines.einet import SUM_PRODUCT_LAYERS
from vq2pc.baselines.regions import REGION_GRAPHS
from vq2pc.cli.train import _data_args, _splits, _train_args, _train_cfg
from vq2pc.pipeline.baselines import fit_circuit
from vq2pc.pipeline.config import CircuitSpec


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``train-baseline`` verb."""
    p = subparsers.add_parser(
        "train-baseline",
        help="train a libcirkit circuit baseline (QuadGraph, HCLT, EiNet structures) and score its BPD",
        description=(
            "Train one libcirkit circuit by maximum likelihood on the same splits as `vq2pc run` and score "
            "its validation and test BPD the way the report does. The training resumes from OUT/<key>.pt "
            "after an interruption; the result row is written to OUT/<key>.json and printed as JSON. "
            "Categorical pixels give a discrete BPD comparable with the published MNIST circuits."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _data_args(p)
    _train_args(p)
    p.add_argument("--region-graph", default="quad-graph", choices=REGION_GRAPHS,
                   help="structure: quad-graph / quad-tree-N (libcirkit's image templates), chow-liu-tree (HCLT, "
                        "learned from the training images), poon-domingos (EiNet)")
    p.add_argument("--sum-product", default="cp", choices=SUM_PRODUCT_LAYERS, help="sum-product layer kind")
    p.add_argument("--units", type=int, default=64, help="input units per pixel and sum units per layer")
    p.add_argument("--leaf", default="categorical", choices=("categorical", "gaussian"), help="pixel leaves")
    p.add_argument("--max-seconds", type=float, help="stop training after this wall time, keeping the best weights")
    p.add_argument("--bpd-draws", type=int, default=1, help="dequantization draws of the Gaussian test BPD")
    p.add_argument("--out", default="runs/baselines", help="directory of the checkpoint and the result row")
    p.set_defaults(func=cmd_train_baseline)


def cmd_train_baseline(args: argparse.Namespace) -> int:
    """Train, score and print the result row (without its training history) as JSON."""
    spec = CircuitSpec(region_graph=args.region_graph, sum_product=args.sum_product, units=args.units)
    train = _train_cfg(args)
    if args.max_seconds is not None:
        train = type(train)(**{**train.__dict__, "max_seconds": args.max_seconds})
    row = fit_circuit(_splits(args), spec, args.leaf, train, Path(args.out), bpd_draws=args.bpd_draws)
    print(json.dumps({k: v for k, v in row.items() if k not in ("history", "test_bpd_quantiles")}))
    return 0
