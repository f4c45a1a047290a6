"""`vq2pc run`: the whole pipeline in one command."""

from __future__ import annotations

import argparse
from dataclasses import replace

from vq2pc.cli.options import RUN, add_parser, out_option, setting
from vq2pc.core.devices import check_device
from vq2pc.core.distributed import init_from_env
from vq2pc.pipeline import STAGES, run_pipeline
from vq2pc.pipeline.config import load_config

_TRAIN_CONFIGS = ("vqvae_train", "prior_train", "baseline_train")


def _speed_args(p: argparse.ArgumentParser) -> None:
    """``--amp`` and ``--compile`` for every training stage of the run (the config's when not given)."""
    setting(p, RUN.vqvae_train, "amp", default=None)
    setting(p, RUN.vqvae_train, "compile", default=False)


def _help(name: str) -> str:
    """The help of a flag that overrides ``RunConfig`` field ``name``: its description and the config's default."""
    text = type(RUN).__pydantic_fields__[name].description or name
    value = getattr(RUN, name)
    return text if "default" in text or value is None else f"{text} (default: the config's, {value})"


def register(sub: argparse._SubParsersAction) -> None:
    p = add_parser(
        sub,
        "run",
        help="train VQ-VAE + prior, distill circuits, run every experiment, write a report",
        description=(
            "Run the whole pipeline into a run directory: train the VQ-VAE and its prior (PixelCNN or Transformer), distill "
            "circuits with every selection strategy and N of the config, train the baselines (EiNet, continuous "
            "mixture), run the experiments (latent usage, BPD vs size, inpainting, samples + class balance, latent "
            "correlation) and write report.md / report.json with PNG figures. Without --config it runs the quick "
            "default on the embedded digits data (a few minutes on 2 CPU cores). On a re-run, stages whose outputs exist "
            "and whose inputs and settings are unchanged are skipped; an interrupted training resumes."
        ),
    )
    p.add_argument("--config", help="YAML config (see configs/); default: the quick digits run")
    for name in ("dataset", "data_dir", "device", "seed", "limit"):  # overrides of the config's settings
        setting(p, RUN, name, default=None, help=_help(name))
    out_option(p, "run directory to write (and to resume)", default="runs/latest")
    p.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        metavar="SEED",
        help="also train the latent-usage model with these seeds: Fig. 1 as mean ± std over models",
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        choices=[1, 2],
        help="2: train the baselines (EiNet, continuous mixture) in a second process beside the VQ-VAE, "
        "prior and circuit stages, with half of the CPU threads; once they are done, that process "
        "shares the +FT rows with the first, row by row, largest N first (log: RUN/helper.log). Each "
        "stage runs with fewer threads, so its numbers can differ from a --jobs 1 run by float "
        "noise (which k-means initialisation amplifies); the same --jobs gives the same numbers. "
        "Not under torchrun",
    )
    _speed_args(p)
    p.add_argument(
        "--force",
        nargs="+",
        default=[],
        choices=STAGES,
        metavar="STAGE",
        help=f"redo these stages even if their outputs exist: {', '.join(STAGES)}",
    )
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    overrides = {
        "dataset": args.dataset,
        "data_dir": args.data_dir,
        "device": args.device,
        "seed": args.seed,
        "limit": args.limit,
    }
    cfg = load_config(args.config, overrides)
    if args.seeds:  # checked like the config's own value
        cfg = replace(cfg, experiments=replace(cfg.experiments, usage_seeds=list(args.seeds)))
    check_device(cfg.device)  # the config's device too, before a run folder exists
    if args.amp and not cfg.device.startswith("cuda"):
        raise ValueError(f"--amp {args.amp} needs a CUDA device (--device cuda); the run is on {cfg.device!r}")
    for name in _TRAIN_CONFIGS:
        train = getattr(cfg, name)
        train.amp, train.compile = args.amp or train.amp, args.compile or train.compile
    cfg.device = init_from_env(cfg.device)  # under torchrun: the process group, cuda:<LOCAL_RANK>
    run_pipeline(cfg, args.out, force=args.force, jobs=args.jobs)
    return 0
