"""The ``vq2pc`` command line: a thin layer over the Python API.

Each module of this package registers a group of verbs with ``register(subparsers)``.

The last stage of the flow: may import every other package of vq2pc.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import NoReturn

import torch

from vq2pc.core.devices import check_device
from vq2pc.core.distributed import init_from_env, shutdown
from vq2pc.core.files import check_writable
from vq2pc.core.settings import ConfigError

# Modules that define verbs, in the order their verbs appear in --help.
_VERB_MODULES = ["run", "train", "baseline", "finetune", "circuit", "classes", "refine", "tree", "export", "codec"]


def version() -> str:
    """The installed distribution's version, else (running from a source tree) the package's ``__version__``."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("vq2pc")
    except PackageNotFoundError:
        from vq2pc import __version__

        return __version__


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: the problem and where to look, not the whole usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="vq2pc",
        description=(
            "Distill a VQ-VAE into a tractable probabilistic circuit (a mixture over selected latents) "
            "and answer exact queries with it: likelihood/BPD, marginals, inpainting, samples, MAP."
        ),
        epilog="Start with `vq2pc run` (embedded digits data, a few minutes on a laptop CPU). "
        "Every verb has its own --help.",
    )
    parser.add_argument("--debug", action="store_true", help="show the Python traceback of an error")
    parser.add_argument("--version", action="version", version=f"vq2pc {version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _VERB_MODULES:
        try:
            module = importlib.import_module(f"vq2pc.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"vq2pc.cli.{name}":
                raise
            continue
        module.register(sub)
    for verb in sub.choices.values():  # `vq2pc VERB ... --debug` works too
        verb.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


# What to lower when a verb runs out of memory.
_OOM_HINT = {
    "run": "lower batch_size in the config's *_train sections, the largest N, or max_materialize / max_exhaustive",
    "train-vqvae": "lower --batch-size, --hidden or --K",
    "train-prior": "lower --batch-size or --hidden",
    "distill": "lower --components or --max-space",
    "finetune": "lower --batch-size, --top-k or --components",
    "evaluate": "use a smaller circuit or --limit",
    "usage": "lower --max-space",
    "sample": "lower --num-samples",
    "inpaint": "pass fewer images",
    "classify": "pass fewer images",
    "refine": "lower --batch-size or --limit",
    "distill-tree": "lower --batch-size or --limit",
    "export": "use a smaller circuit",
    "compress": "lower --rows",
    "decompress": "lower --threads",
}


def _check_arguments(args: argparse.Namespace) -> None:
    """Checks that need no data: the device exists, every output location is writable (nothing is created)."""
    seed = getattr(args, "seed", None)
    if seed is not None and seed < 0:
        raise ValueError(f"--seed must be >= 0, got {seed}")
    device = getattr(args, "device", None)
    if device is not None:
        check_device(device)
    for flag in ("out", "npy"):
        path = getattr(args, flag, None)
        if path is not None:
            check_writable(path, directory=args.command in ("run", "train-baseline") and flag == "out")


def _one_line(exc: BaseException, command: str) -> str:
    """The message of ``exc`` on one line, for the user."""
    if _is_oom(exc):
        return f"out of memory: {_OOM_HINT.get(command, 'use smaller settings')} (or use --device cpu)"
    if isinstance(exc, OSError) and exc.strerror:
        where = f": {exc.filename}" if exc.filename else ""
        text = f"{exc.strerror}{where}"
    elif isinstance(exc, ConfigError):
        text = "; ".join(exc.problems)
    elif isinstance(exc, (ValueError, FileNotFoundError, FloatingPointError, ModuleNotFoundError)):
        text = str(exc)
    else:
        text = f"unexpected {type(exc).__name__}: {exc} (re-run with --debug for the traceback)"
    return " ".join(text.split())


def _is_oom(exc: BaseException) -> bool:
    oom = getattr(torch, "OutOfMemoryError", None)
    return (oom is not None and isinstance(exc, oom)) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        _check_arguments(args)
        if getattr(args, "device", None):  # under torchrun: the process group, and this rank's cuda:<LOCAL_RANK>
            args.device = init_from_env(args.device)
        code = int(args.func(args) or 0)
        shutdown(wait=True)
        return code
    except KeyboardInterrupt:
        print(
            f"vq2pc {args.command}: interrupted (checkpoints written so far are kept; re-run to resume)",
            file=sys.stderr,
        )
        return 130
    except Exception as exc:
        if args.debug:
            raise
        # One clear line for every failure; no stack trace from deep inside torch.
        print(f"vq2pc {args.command}: error: {_one_line(exc, args.command)}", file=sys.stderr)
        return 1
    finally:
        shutdown()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
