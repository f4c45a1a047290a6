"""The command line's shared vocabulary: one flag per concept across verbs, defaults from the run config.

A concept has one spelling in every verb that takes it: ``--components/-N`` (mixture size),
``--num-samples/-n`` (samples), ``--std-min/--std-max`` (Gaussian std bounds), ``--out`` (the path the
verb writes: a run directory for ``run``, the one file other verbs write), ``--seed``, ``--device``,
``--dataset``, ``--data-dir``, ``--limit``. Their defaults are read from the dataclasses of
:mod:`vq2pc.pipeline.config` (``RunConfig``, ``ModelSpec``, the ``TrainConfig`` s), so a verb and
``vq2pc run`` start from the same settings. Older spellings still parse, hidden from ``--help``.
"""

from __future__ import annotations

import argparse
from typing import Any

from vq2pc.data.datasets import DATASET_NAMES
from vq2pc.latents.selection import BEAM_SCORES, BEAM_SEARCHES
from vq2pc.models.train import TrainConfig
from vq2pc.pipeline.config import ExperimentSpec, ModelSpec, RunConfig

RUN = RunConfig()
MODEL = ModelSpec()
EXPERIMENTS = ExperimentSpec()

# concept -> (flags shown in --help, older spellings that still parse); tests/cli/test_help.py checks every verb
FLAGS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "N": (("--components", "-N"), ("--N",)),
    "num_samples": (("--num-samples", "-n"), ("--n",)),
    "std_min": (("--std-min",), ("--std-floor", "--min-std")),
    "std_max": (("--std-max",), ("--max-std",)),
    "out": (("--out",), ()),
    "seed": (("--seed",), ()),
    "device": (("--device",), ()),
    "dataset": (("--dataset",), ()),
    "data_dir": (("--data-dir",), ()),
    "limit": (("--limit",), ()),
}


class HelpFormatter(argparse.HelpFormatter):
    """Appends ``(default: X)`` to an option's help once: not when the help already names its default,
    and not for defaults that say nothing (None, False, a suppressed option)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text.lower() or not action.option_strings or action.required:
            return text
        if any(action.default is v for v in (None, False, argparse.SUPPRESS)) or action.default == []:
            return text
        return f"{text} (default: %(default)s)"


def add_parser(sub: argparse._SubParsersAction, name: str, **kwargs: Any) -> argparse.ArgumentParser:
    """A verb's parser with the shared help formatter."""
    return sub.add_parser(name, formatter_class=HelpFormatter, **kwargs)


def option(p: argparse.ArgumentParser, concept: str, **kwargs: Any) -> argparse.Action:
    """Add ``concept``'s option (its flags in :data:`FLAGS`), with its older spellings hidden."""
    shown, old = FLAGS[concept]
    action = p.add_argument(*shown, dest=concept, **kwargs)
    hidden = {k: v for k, v in kwargs.items() if k in ("type", "choices", "action", "nargs", "metavar")}
    for flag in old:
        p.add_argument(flag, dest=concept, default=argparse.SUPPRESS, help=argparse.SUPPRESS, **hidden)
    return action


def out_option(p: argparse.ArgumentParser, what: str, **kwargs: Any) -> argparse.Action:
    """``--out``: the path the verb writes, ``what`` says which (a file, or the run directory)."""
    return option(p, "out", help=what, **kwargs)


def components_option(p: argparse.ArgumentParser, extra: str = "") -> argparse.Action:
    """``--components/-N``: the number N of mixture components (default: the default run's largest N)."""
    return option(p, "N", type=int, default=max(MODEL.N), metavar="N", help=f"mixture components N{extra}")


def data_options(p: argparse.ArgumentParser) -> None:
    """Dataset, its directory, a cap on the splits, the seed and the device (defaults: ``RunConfig``'s)."""
    option(p, "dataset", default=RUN.dataset, choices=DATASET_NAMES, help="dataset")
    option(p, "data_dir", help="directory with the dataset files (default: $VQ2PC_DATA, else ~/.cache/vq2pc)")
    option(p, "limit", type=int, help="cap every split at this many images")
    seed_device_options(p)


def seed_device_options(p: argparse.ArgumentParser, seeds: str = "split, initialization, noise") -> None:
    """``--seed`` (``seeds``: what it seeds) and ``--device``."""
    option(p, "seed", type=int, default=RUN.seed, help=f"random seed ({seeds})")
    option(p, "device", default=RUN.device, help="torch device, e.g. cpu or cuda")


def train_options(p: argparse.ArgumentParser, defaults: TrainConfig) -> None:
    """A trainer's settings; ``defaults`` is the ``RunConfig`` section this verb's stage reads in ``vq2pc run``."""
    p.add_argument("--epochs", type=int, default=defaults.epochs, help="maximum epochs")
    p.add_argument(
        "--patience", type=int, default=defaults.patience, help="early-stopping patience (epochs without improvement)"
    )
    p.add_argument("--lr", type=float, default=defaults.lr, help="Adam learning rate")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size, help="mini-batch size")
    p.add_argument(
        "--amp", choices=["bf16", "fp16"], help="mixed-precision training (autocast) on CUDA; refused on CPU"
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the training step")


def train_config(a: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        epochs=a.epochs,
        patience=a.patience,
        lr=a.lr,
        batch_size=a.batch_size,
        seed=a.seed,
        device=a.device,
        amp=a.amp,
        compile=a.compile,
    )


def beam_options(p: argparse.ArgumentParser) -> None:
    """DMBS options shared by the verbs that select latents (defaults: ``ModelSpec``'s)."""
    p.add_argument("--starts", type=int, default=MODEL.starts, help="beam: starting tokens per class")
    p.add_argument(
        "--beam-score",
        default=MODEL.beam_score,
        choices=list(BEAM_SCORES),
        help="beam: rank a class's searches by p(z|c) (Algorithm 1) or by the class marginal p(z)",
    )
    p.add_argument(
        "--beam-search",
        default=MODEL.beam_search,
        choices=list(BEAM_SEARCHES),
        help="beam: keep the best B beams per position (Algorithm 2) or sample them without "
        "replacement (Gumbel-top-k: more diverse latents within a class)",
    )
