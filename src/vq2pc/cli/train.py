"""Stage verbs: `train-vqvae`, `train-prior`, `distill`, `evaluate`, `usage` — one step of the pipeline each."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
import yaml

from vq2pc.circuit.distill import check_std_floor, distill
from vq2pc.circuit.mixture import MixtureCircuit
from vq2pc.cli.options import (
    EXPERIMENTS,
    MODEL,
    RUN,
    add_parser,
    beam_options,
    components_option,
    data_options,
    out_option,
    seed_device_options,
    setting,
    train_config,
    train_options,
)
from vq2pc.core.distributed import is_main
from vq2pc.core.leaves import LEAF_KINDS
from vq2pc.data.datasets import DataSplits, load_dataset
from vq2pc.latents.selection import STRATEGIES, Selection, select
from vq2pc.models.priors import load_prior, prior_config, train_prior
from vq2pc.models.quantizers import make_quantizer
from vq2pc.models.vqvae import VQVAE, encode_images, train_vqvae
from vq2pc.pipeline.model_spec import VQVAE_KEYS
from vq2pc.pipeline.models import vqvae_config

_FLAG_KEYS = tuple(k for k in VQVAE_KEYS if k not in ("latent_hw", "quantizer_opts"))
"""The VQ-VAE settings that are one plain flag each of ``train-vqvae`` (``--grid`` and ``--quantizer-opt`` are not)."""


def _splits(a: argparse.Namespace) -> DataSplits:
    return load_dataset(a.dataset, a.data_dir, seed=a.seed, limit=a.limit)


def register(sub: argparse._SubParsersAction) -> None:
    _register_training(sub)
    p = add_parser(
        sub,
        "distill",
        help="select latents and distill a circuit",
        description="Select N latents with a strategy and decode them into a MixtureCircuit.",
    )
    p.add_argument("--vqvae", required=True, help="VQ-VAE checkpoint")
    p.add_argument("--prior", required=True, help="prior checkpoint")
    p.add_argument("--strategy", default="beam", choices=[s for s in STRATEGIES if s != "data"], help="selection")
    components_option(p, " (ignored by exhaustive)")
    setting(
        p,
        MODEL,
        "weights",
        default=None,
        help=f"mixture weights (default: prior for exhaustive, {MODEL.weights} otherwise)",
    )
    beam_options(p)
    setting(p, RUN, "max_exhaustive", "--max-space", help="refuse exhaustive selection above this size")
    setting(p, MODEL, "std_floor", concept="std_min")
    p.add_argument(
        "--discretized",
        action="store_true",
        help="Gaussian VQ-VAE: discretized Gaussian leaves over the pixel levels (an exact discrete "
        "likelihood of integer images, no retraining)",
    )
    seed_device_options(p, "sample and beam selection")
    out_option(p, "circuit file to write (.safetensors)", default="circuit.safetensors")
    p.add_argument(
        "--classes",
        action="store_true",
        help="class-aware circuit: keep the class weights w_{n,c} (same --weights rule, per class) "
        "for `vq2pc classify` and `--class`",
    )
    p.set_defaults(func=_distill)
    _register_inspection(sub)


def _register_inspection(sub: argparse._SubParsersAction) -> None:
    """``evaluate`` (a circuit's test BPD) and ``usage`` (a prior's latent-space usage)."""
    p = add_parser(
        sub,
        "evaluate",
        help="test BPD of a saved circuit",
        description="Print the test BPD of a circuit (JSON), averaged over dequantization draws.",
    )
    data_options(p)
    p.add_argument("circuit", help="circuit file (.safetensors)")
    setting(p, EXPERIMENTS, "bpd_draws", "--draws")
    p.set_defaults(func=_evaluate)

    p = add_parser(
        sub,
        "usage",
        help="latent-space usage of a prior (paper Fig. 1)",
        description="Enumerate p(z) over the whole latent space and plot its sorted CDF.",
    )
    p.add_argument("--prior", required=True, help="prior checkpoint")
    setting(p, RUN, "device")
    setting(p, RUN, "max_usage_space", "--max-space", help="refuse spaces larger than this")
    out_option(p, "figure file to write (.png)", default="usage.png")
    p.set_defaults(func=_usage)


def _register_training(sub: argparse._SubParsersAction) -> None:
    """``train-vqvae`` and ``train-prior``: defaults are those of ``vq2pc run``'s first model and its stages."""
    p = add_parser(
        sub,
        "train-vqvae",
        help="train a VQ-VAE (checkpoint = resume point)",
        description="Train a VQ-VAE with a per-pixel leaf head. Re-running with the same --out resumes.",
    )
    data_options(p), train_options(p, RUN.vqvae_train)
    p.add_argument("--leaf", default=RUN.leaves[0], choices=list(LEAF_KINDS), help="pixel model")
    setting(p, MODEL, "latent_hw", "--grid", metavar=("H", "W"))
    for name in _FLAG_KEYS:
        setting(p, MODEL, name)
    default_opts = " ".join(f"{k}={str(v).lower()}" for k, v in MODEL.quantizer_opts.items())
    p.add_argument(
        "--quantizer-opt",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a quantizer option, repeatable (VALUE parsed as YAML), e.g. kmeans_init=true alpha=1.0 "
        f"(default: {default_opts} with --quantizer {MODEL.quantizer}, none with the others)",
    )
    out_option(p, "checkpoint file to write (and to resume from)", default="vqvae.pt")
    p.set_defaults(func=_train_vqvae)

    p = add_parser(
        sub,
        "train-prior",
        help="train a class-conditional prior (PixelCNN or Transformer) over a VQ-VAE's codes",
        description="Encode the dataset with --vqvae and fit the prior.",
    )
    data_options(p), train_options(p, RUN.prior_train)
    p.add_argument("--vqvae", required=True, help="VQ-VAE checkpoint")
    setting(p, MODEL, "prior")
    for name, flag in (("prior_hidden", "--hidden"), ("prior_layers", "--layers"), ("prior_heads", "--heads")):
        setting(p, MODEL, name, flag)
    p.add_argument("--unlabeled", action="store_true", help="ignore labels (C = 1)")
    out_option(p, "checkpoint file to write (and to resume from)", default="prior.pt")
    p.set_defaults(func=_train_prior)


def _quantizer_opts(a: argparse.Namespace) -> dict[str, Any]:
    """``--quantizer-opt`` values; none given: the run config's options for its quantizer, none for another."""
    if not a.quantizer_opt:
        return dict(MODEL.quantizer_opts) if a.quantizer == MODEL.quantizer else {}
    return _key_values(a.quantizer_opt, "--quantizer-opt")


def _train_vqvae(a: argparse.Namespace) -> int:
    train_cfg = train_config(a)  # impossible settings fail before any data work
    splits = _splits(a)
    flags = {key: getattr(a, key) for key in _FLAG_KEYS}
    spec = dataclasses.replace(MODEL, latent_hw=tuple(a.latent_hw), quantizer_opts=_quantizer_opts(a), **flags)
    cfg = vqvae_config(splits, a.leaf, spec)
    make_quantizer(cfg.quantizer, cfg.K, cfg.D, cfg.beta, **cfg.quantizer_opts)  # bad options fail before any data work
    model, res = train_vqvae(splits, cfg, train_cfg, checkpoint=a.out)
    if is_main():
        print(
            json.dumps(
                {
                    "checkpoint": a.out,
                    "best_val_loss": res.best_val_loss,
                    "epochs": res.epochs_run,
                    "num_params": model.num_params,
                }
            )
        )
    return 0


def _key_values(items: list[str], flag: str) -> dict[str, Any]:
    """``["a=1", "b=true"]`` -> ``{"a": 1, "b": True}`` (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{flag} expects KEY=VALUE, got {item!r}")
        out[key.strip()] = yaml.safe_load(value)
    return out


def _train_prior(a: argparse.Namespace) -> int:
    train_cfg = train_config(a)
    splits = _splits(a)
    vqvae = VQVAE.load(a.vqvae, device=a.device)
    labeled = splits.num_classes > 1 and not a.unlabeled
    cfg = prior_config(
        a.prior,
        vqvae.K,
        vqvae.latent_hw,
        splits.num_classes if labeled else 1,
        a.prior_hidden,
        a.prior_layers,
        a.prior_heads,
    )
    prior, res = train_prior(
        encode_images(vqvae, splits.train_x, a.seed),
        splits.train_y if labeled else None,
        cfg,
        train_cfg,
        encode_images(vqvae, splits.val_x, a.seed),
        splits.val_y if labeled else None,
        checkpoint=a.out,
    )
    if is_main():
        print(
            json.dumps(
                {
                    "checkpoint": a.out,
                    "prior": a.prior,
                    "best_val_nll_per_latent": res.best_val_loss,
                    "epochs": res.epochs_run,
                    "num_params": prior.num_params,
                }
            )
        )
    return 0


def _distill(a: argparse.Namespace) -> int:
    vqvae, prior = VQVAE.load(a.vqvae, device=a.device), load_prior(a.prior, device=a.device)
    check_std_floor(a.std_min, vqvae.cfg.leaf)
    if a.discretized and vqvae.cfg.leaf != "gaussian":
        raise ValueError(f"--discretized needs a Gaussian VQ-VAE; this one has {vqvae.cfg.leaf} leaves")
    _check_pair(prior, vqvae)
    sel = _selection(prior, a, max_space=a.max_exhaustive, classes=a.classes)
    weights = a.weights or ("prior" if a.strategy == "exhaustive" else MODEL.weights)
    meta = {"image_shape": list(vqvae.cfg.image_shape), "levels": vqvae.cfg.levels, "leaf": vqvae.cfg.leaf}
    circuit = distill(
        vqvae,
        sel,
        weights=weights,
        meta=meta,
        std_floor=a.std_min,
        discretized=vqvae.cfg.levels if a.discretized else None,
        classes=a.classes,
        prior=prior,
    )
    circuit.save(a.out)
    print(
        json.dumps(
            {
                "circuit": a.out,
                "N": len(circuit),
                "num_params": circuit.num_params,
                "strategy": a.strategy,
                "classes": getattr(circuit, "num_classes", None),
            }
        )
    )
    return 0


def _evaluate(a: argparse.Namespace) -> int:
    from vq2pc.evaluate.density import test_bpd

    circuit = MixtureCircuit.load(a.circuit, device=a.device)
    splits = _splits(a)
    if circuit.num_variables != splits.num_variables:
        raise ValueError(
            f"circuit has S={circuit.num_variables} variables but {a.dataset} images have S={splits.num_variables}"
        )
    bpd = test_bpd(
        circuit,
        splits.test_x,
        circuit.leaf.data_kind,
        splits.levels,
        draws=a.bpd_draws,
        generator=torch.Generator().manual_seed(a.seed),
    )
    discrete = {"test_bpd_discrete": bpd["discrete"]} if "discrete" in bpd else {}
    print(
        json.dumps(
            {"circuit": a.circuit, "N": len(circuit), "test_bpd": bpd["mean"], "test_bpd_std": bpd["std"], **discrete}
        )
    )
    return 0


def _usage(a: argparse.Namespace) -> int:
    from vq2pc.evaluate.usage import latent_usage
    from vq2pc.latents.enumerate import enumerate_log_prior

    prior = load_prior(a.prior, device=a.device)
    res = latent_usage(enumerate_log_prior(prior, device=a.device, max_space=a.max_usage_space), Path(a.out))
    print(json.dumps({k: v for k, v in res.items() if not isinstance(v, (list, dict))}))
    return 0


def _check_pair(prior: Any, vqvae: VQVAE) -> None:
    """One clear error when ``--prior`` was trained over another codebook or grid than ``--vqvae``."""
    if (vqvae.cfg.K, tuple(vqvae.cfg.latent_hw)) != (prior.K, tuple(prior.latent_hw)):
        raise ValueError(
            f"--prior (K={prior.K}, grid {prior.latent_hw}) does not match --vqvae "
            f"(K={vqvae.cfg.K}, grid {vqvae.cfg.latent_hw})"
        )


def _selection(prior: Any, a: argparse.Namespace, **extra: Any) -> Selection:
    """The latents a verb's selection flags ask for (``extra``: further ``select`` options, e.g. ``max_space``)."""
    return select(
        prior,
        a.strategy,
        a.N,
        starts=a.starts,
        beam_score=a.beam_score,
        beam_search=a.beam_search,
        generator=torch.Generator().manual_seed(a.seed),
        device=a.device,
        **extra,
    )
