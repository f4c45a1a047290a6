"""The ``vq2pc`` command line: a thin layer over the Python API.

Each module of this package registers a group of verbs with ``register(subparsers)``.

The last stage of the flow: may import every other package of vq2pc.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from vq2pc.core.distributed import init_from_env, shutdown

# Modules that define verbs, in the order their verbs appear in --help.
_VERB_MODULES = ["run", "train", "finetune", "circuit", "refine", "export"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vq2pc",
        description=(
            "Distill a VQ-VAE into a tractable probabilistic circuit (a mixture over selected latents) "
            "and answer exact queries with it: likelihood/BPD, marginals, inpainting, samples, MAP."
        ),
        epilog="Start with `vq2pc run` (embedded digits data, a few minutes on a laptop CPU). "
        "Every verb has its own --help.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _VERB_MODULES:
        try:
            module = importlib.import_module(f"vq2pc.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"vq2pc.cli.{name}":
                raise
            continue
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if getattr(args, "device", None):  # under torchrun: the process group, and this rank's cuda:<LOCAL_RANK>
        args.device = init_from_env(args.device)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, FloatingPointError) as exc:
        # One clear line for bad input; no stack trace from deep inside torch.
        print(f"vq2pc {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"vq2pc {args.command}: interrupted (checkpoints written so far are kept; re-run to resume)", file=sys.stderr)
        return 130
    finally:
        shutdown()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
