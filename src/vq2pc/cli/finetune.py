"""The `finetune` verb: fine-tuned distillation of a selection (decoder + weights trained on the mixture)."""

from __future__ import annotations

import argparse
import dataclasses
import json

import torch

from vq2pc.circuit.finetune import COMPONENT_MODES, SCHEDULES, FineTuneConfig, finetune_distill
from vq2pc.cli.options import MODEL, add_parser, beam_options, components_option, data_options, option, out_option
from vq2pc.cli.train import _splits
from vq2pc.core.distributed import is_main
from vq2pc.data.datasets import check_fits
from vq2pc.latents.selection import select
from vq2pc.models.priors import load_prior
from vq2pc.models.vqvae import VQVAE

_DEFAULTS = FineTuneConfig()


def register(sub: argparse._SubParsersAction) -> None:
    p = add_parser(
        sub,
        "finetune",
        help="select latents and distill a circuit whose decoder is fine-tuned on the mixture",
        description="Select N latents (as `distill`), then train a copy of the decoder, its codebook and the "
        "mixture weights to maximize the mixture's own log-likelihood on the training split, early-stopped on the "
        "validation split, and decode again: an exact mixture over the same latents that covers test images the "
        "plain distillation misses (beyond the paper).",
    )
    data_options(p)
    p.add_argument("--vqvae", required=True, help="VQ-VAE checkpoint")
    p.add_argument("--prior", required=True, help="prior checkpoint")
    p.add_argument("--strategy", default="sample", choices=["sample", "gumbel", "beam", "topk"], help="selection")
    components_option(p)
    beam_options(p)
    p.add_argument("--weights", default=MODEL.weights, choices=["uniform", "prior"], help="initial mixture weights")
    p.add_argument("--epochs", type=int, default=_DEFAULTS.epochs, help="maximum fine-tuning epochs")
    p.add_argument(
        "--patience",
        type=int,
        default=_DEFAULTS.patience,
        help="stop after this many epochs without a better validation likelihood",
    )
    p.add_argument("--lr", type=float, default=_DEFAULTS.lr, help="Adam learning rate")
    p.add_argument(
        "--schedule",
        default=_DEFAULTS.schedule,
        choices=list(SCHEDULES),
        help="learning rate: constant, or cosine decay to 0 over --epochs (per step)",
    )
    p.add_argument("--batch-size", type=int, default=_DEFAULTS.batch_size, help="training images per step")
    p.add_argument(
        "--grad-components",
        default=_DEFAULTS.components,
        choices=list(COMPONENT_MODES),
        help="which components get gradients each step: each image's top-k by posterior, or a random subset",
    )
    p.add_argument("--top-k", type=int, default=_DEFAULTS.top_k, help="posterior: components per image")
    p.add_argument(
        "--refresh", type=int, default=_DEFAULTS.refresh, help="posterior: steps between re-decodes of all N components"
    )
    p.add_argument(
        "--refresh-N",
        type=int,
        default=_DEFAULTS.refresh_N,
        help="posterior: above this N, re-decode every refresh·N/refresh-N steps instead (the same "
        "decoding cost per step as at this N; at N = 16384 on MNIST, 4x less often gave a better "
        "circuit in 30%% less time)" + _unset("every --refresh steps at any N", _DEFAULTS.refresh_N),
    )
    p.add_argument("--subset", type=int, default=_DEFAULTS.subset, help="random: components per step")
    p.add_argument(
        "--clip",
        type=float,
        default=_DEFAULTS.clip,
        help="clip each step's gradient to this global norm (images no component covers give rare "
        "huge gradients; 300 suits MNIST Gaussian pixels)" + _unset("no clipping", _DEFAULTS.clip),
    )
    option(
        p,
        "std_max",
        type=float,
        default=_DEFAULTS.std_max,
        help="Gaussian leaves: cap every std smoothly below this, in training and in the circuit "
        "(sharper, class-balanced samples at a cost in BPD; 0.125 on MNIST pixels in [0, 1])"
        + _unset("no cap", _DEFAULTS.std_max),
    )
    p.add_argument(
        "--discretized",
        action="store_true",
        help="Gaussian VQ-VAE: fine-tune the exact discrete likelihood (discretized Gaussian leaves "
        "over the pixel levels, integer images, no dequantization)",
    )
    p.add_argument("--fixed-weights", action="store_true", help="keep the selection's mixture weights")
    p.add_argument("--train-limit", type=int, help="use only the first images of the training split")
    out_option(p, "circuit file to write (.safetensors)", default="circuit-ft.safetensors")
    p.set_defaults(func=_finetune)


def _unset(meaning: str, default: object) -> str:
    """Help text naming what an unset (None) default means."""
    return f" (default: {meaning})" if default is None else ""


def finetune_config(a: argparse.Namespace) -> FineTuneConfig:
    """The fine-tuning settings of the parsed ``finetune`` arguments (their defaults: ``FineTuneConfig()``)."""
    return FineTuneConfig(
        epochs=a.epochs,
        patience=a.patience,
        lr=a.lr,
        schedule=a.schedule,
        batch_size=a.batch_size,
        components=a.grad_components,
        top_k=a.top_k,
        refresh=a.refresh,
        refresh_N=a.refresh_N,
        subset=a.subset,
        clip=a.clip,
        std_max=a.std_max,
        learn_weights=not a.fixed_weights,
        train_limit=a.train_limit,
        seed=a.seed,
        device=a.device,
    )


def _finetune(a: argparse.Namespace) -> int:
    cfg = finetune_config(a)
    vqvae, prior = VQVAE.load(a.vqvae, device=a.device), load_prior(a.prior, device=a.device)
    if (vqvae.cfg.K, tuple(vqvae.cfg.latent_hw)) != (prior.K, tuple(prior.latent_hw)):
        raise ValueError(
            f"--prior (K={prior.K}, grid {prior.latent_hw}) does not match --vqvae "
            f"(K={vqvae.cfg.K}, grid {vqvae.cfg.latent_hw})"
        )
    if a.discretized:
        if vqvae.cfg.leaf != "gaussian":
            raise ValueError(f"--discretized needs a Gaussian VQ-VAE; this one has {vqvae.cfg.leaf} leaves")
        cfg = dataclasses.replace(cfg, discretized=vqvae.cfg.levels)
    splits = _splits(a)
    check_fits(vqvae.cfg.image_shape, vqvae.cfg.levels, splits, "--vqvae")
    sel = select(
        prior,
        a.strategy,
        a.N,
        starts=a.starts,
        beam_score=a.beam_score,
        beam_search=a.beam_search,
        generator=torch.Generator().manual_seed(a.seed),
        device=a.device,
    )
    meta = {"image_shape": list(vqvae.cfg.image_shape), "levels": vqvae.cfg.levels, "leaf": vqvae.cfg.leaf}
    circuit, res = finetune_distill(vqvae, sel, splits, cfg, weights=a.weights, meta=meta)
    circuit.save(a.out)
    S = splits.num_variables
    if is_main():  # under torchrun: rank 0 speaks for all
        print(
            json.dumps(
                {
                    "circuit": a.out,
                    "N": len(circuit),
                    "strategy": a.strategy,
                    **circuit.meta["finetune"],
                    "val_nats_per_dim": [res.start_val_log_prob / S, res.best_val_log_prob / S],
                    "settings": {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("progress", "device")},
                }
            )
        )
    return 0
