"""``vq2pc export``: write a saved circuit for other PC libraries (libcirkit, or a plain NumPy archive)."""

from __future__ import annotations

import argparse
import json
import sys

import torch

from vq2pc.circuit.export import export_cirkit, export_npz
from vq2pc.circuit.mixture import MixtureCircuit
from vq2pc.cli.options import add_parser, out_option


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``export`` verb."""
    p = add_parser(
        subparsers,
        "export",
        help="export a saved circuit to libcirkit (--format cirkit) or to a plain NumPy archive (--format npz)",
        description=(
            "cirkit: the compiled libcirkit circuit (input layers -> Hadamard -> sum), reload it with "
            "vq2pc.circuit.export.load_cirkit (needs libcirkit==0.3.1). npz: log_weights [N] and the leaf arrays with a "
            "JSON header, readable from any language with an npz reader (e.g. for SPFlow or ProbabilisticCircuits.jl)."
        ),
    )
    p.add_argument("circuit", help="circuit file written by MixtureCircuit.save (.safetensors)")
    p.add_argument("--format", choices=("cirkit", "npz"), required=True, help="output format")
    out_option(p, "file to write (cirkit: the compiled circuit, a torch file; npz: a NumPy archive)", required=True)
    p.add_argument(
        "--dtype",
        choices=("float32", "float64"),
        help="cirkit only: dtype of the compiled circuit (default: the circuit's; float64 when categorical "
        "log-probabilities fall below -87)",
    )
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    """Load the circuit, export it, and print ``{"out", "format", "N", "S", "kind"}`` as JSON."""
    circuit = MixtureCircuit.load(args.circuit)
    try:
        if args.format == "cirkit":
            out = export_cirkit(circuit, args.out, getattr(torch, args.dtype) if args.dtype else None)
        else:
            out = export_npz(circuit, args.out)
    except ModuleNotFoundError as exc:  # libcirkit missing: one line, no trace
        print(f"vq2pc export: error: {exc}", file=sys.stderr)
        return 1
    summary = {
        "out": str(out),
        "format": args.format,
        "N": len(circuit),
        "S": circuit.num_variables,
        "kind": circuit.leaf.kind,
    }
    print(json.dumps(summary))
    return 0
