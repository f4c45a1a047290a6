"""Stage verbs: `train-vqvae`, `train-prior`, `distill`, `evaluate`, `usage` — one step of the pipeline each."""

from __future__ import annotations

import argparse
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
    option,
    out_option,
    seed_device_options,
    train_config,
    train_options,
)
from vq2pc.core.distributed import is_main
from vq2pc.core.leaves import LEAF_KINDS
from vq2pc.data.datasets import DataSplits, load_dataset
from vq2pc.latents.selection import STRATEGIES, WEIGHTS, select
from vq2pc.models.priors import PRIOR_NAMES, load_prior, prior_config, train_prior
from vq2pc.models.quantizers import QUANTIZER_NAMES, make_quantizer
from vq2pc.models.vqvae import VQVAE, VQVAEConfig, encode_images, train_vqvae


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
    p.add_argument(
        "--weights",
        default=None,
        choices=WEIGHTS,
        help=f"mixture weights (default: prior for exhaustive, {MODEL.weights} otherwise)",
    )
    beam_options(p)
    p.add_argument(
        "--max-space", type=int, default=RUN.max_exhaustive, help="refuse exhaustive selection above this size"
    )
    option(
        p,
        "std_min",
        type=float,
        default=MODEL.std_floor,
        help="Gaussian leaves: raise decoded stds below this to it (bounds the cost of unseen strokes)",
    )
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

    p = add_parser(
        sub,
        "evaluate",
        help="test BPD of a saved circuit",
        description="Print the test BPD of a circuit (JSON), averaged over dequantization draws.",
    )
    data_options(p)
    p.add_argument("circuit", help="circuit file (.safetensors)")
    p.add_argument("--draws", type=int, default=EXPERIMENTS.bpd_draws, help="dequantization draws (continuous leaves)")
    p.set_defaults(func=_evaluate)

    p = add_parser(
        sub,
        "usage",
        help="latent-space usage of a prior (paper Fig. 1)",
        description="Enumerate p(z) over the whole latent space and plot its sorted CDF.",
    )
    p.add_argument("--prior", required=True, help="prior checkpoint")
    option(p, "device", default=RUN.device, help="torch device, e.g. cpu or cuda")
    p.add_argument("--max-space", type=int, default=RUN.max_usage_space, help="refuse spaces larger than this")
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
    p.add_argument("--grid", type=int, nargs=2, default=list(MODEL.latent_hw), metavar=("H", "W"), help="latent grid")
    p.add_argument("--K", type=int, default=MODEL.K, help="codebook size")
    p.add_argument("--D", type=int, default=MODEL.D, help="codeword length")
    p.add_argument("--hidden", type=int, default=MODEL.hidden, help="channels of the conv nets")
    p.add_argument("--res-blocks", type=int, default=MODEL.res_blocks, help="residual blocks at the latent level")
    p.add_argument(
        "--quantizer",
        default=MODEL.quantizer,
        choices=list(QUANTIZER_NAMES),
        help="vq (paper Eq. 6), ema, gumbel or gmvq (GM-VQ with the ALBO); see README 'Quantizers'",
    )
    p.add_argument(
        "--beta",
        type=float,
        default=MODEL.beta,
        help="commitment weight (vq, ema); KL weight (gumbel); latent-alignment weight (gmvq)",
    )
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
    p.add_argument(
        "--prior",
        default=MODEL.prior,
        choices=list(PRIOR_NAMES),
        help="gated PixelCNN, or causal Transformer with a key/value cache",
    )
    p.add_argument("--hidden", type=int, default=MODEL.prior_hidden, help="PixelCNN channels / Transformer width")
    p.add_argument("--layers", type=int, default=MODEL.prior_layers, help="gated PixelCNN layers / Transformer blocks")
    p.add_argument(
        "--heads", type=int, default=MODEL.prior_heads, help="Transformer attention heads (--hidden must be a multiple)"
    )
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
    cfg = VQVAEConfig(
        image_shape=splits.image_shape,
        levels=splits.levels,
        leaf=a.leaf,
        latent_hw=tuple(a.grid),
        K=a.K,
        D=a.D,
        hidden=a.hidden,
        res_blocks=a.res_blocks,
        beta=a.beta,
        quantizer=a.quantizer,
        quantizer_opts=_quantizer_opts(a),
    )
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
        a.prior, vqvae.K, vqvae.latent_hw, splits.num_classes if labeled else 1, a.hidden, a.layers, a.heads
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
    if (vqvae.cfg.K, tuple(vqvae.cfg.latent_hw)) != (prior.K, tuple(prior.latent_hw)):
        raise ValueError(
            f"--prior (K={prior.K}, grid {prior.latent_hw}) does not match --vqvae "
            f"(K={vqvae.cfg.K}, grid {vqvae.cfg.latent_hw})"
        )
    sel = select(
        prior,
        a.strategy,
        a.N,
        starts=a.starts,
        beam_score=a.beam_score,
        beam_search=a.beam_search,
        generator=torch.Generator().manual_seed(a.seed),
        max_space=a.max_space,
        device=a.device,
        classes=a.classes,
    )
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
        draws=a.draws,
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
    res = latent_usage(enumerate_log_prior(prior, device=a.device, max_space=a.max_space), Path(a.out))
    print(json.dumps({k: v for k, v in res.items() if not isinstance(v, (list, dict))}))
    return 0
