"""The `finetune` verb: fine-tuned distillation of a selection (decoder + weights trained on the mixture)."""

from __future__ import annotations

import argparse
import dataclasses
import json

from vq2pc.circuit.finetune import FineTuneConfig, finetune_distill
from vq2pc.cli.options import MODEL, add_parser, beam_options, components_option, data_options, out_option, setting
from vq2pc.cli.train import _check_pair, _selection, _splits
from vq2pc.core.distributed import is_main
from vq2pc.data.datasets import check_fits
from vq2pc.models.priors import load_prior
from vq2pc.models.vqvae import VQVAE

_DEFAULTS = FineTuneConfig()
FT_FLAGS: dict[str, tuple[str, ...]] = {
    "epochs": (),
    "patience": (),
    "lr": (),
    "schedule": (),
    "batch_size": (),
    "components": ("--grad-components",),
    "top_k": (),
    "refresh": (),
    "refresh_N": ("--refresh-N",),
    "subset": (),
    "clip": (),
    "std_max": (),  # the std_max concept's flags
    "learn_weights": ("--fixed-weights",),
    "train_limit": (),
}
"""The ``FineTuneConfig`` fields the verb takes as flags (their flags where not ``--field-name``)."""
_SWITCH_HELP = {"learn_weights": {"help": "keep the selection's mixture weights"}}  # the switch turns the field off


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
    setting(p, MODEL, "weights", help="initial mixture weights")
    for name, flags in FT_FLAGS.items():
        setting(p, _DEFAULTS, name, *flags, **_SWITCH_HELP.get(name, {}))
    p.add_argument(
        "--discretized",
        action="store_true",
        help="Gaussian VQ-VAE: fine-tune the exact discrete likelihood (discretized Gaussian leaves "
        "over the pixel levels, integer images, no dequantization)",
    )
    out_option(p, "circuit file to write (.safetensors)", default="circuit-ft.safetensors")
    p.set_defaults(func=_finetune)


def finetune_config(a: argparse.Namespace) -> FineTuneConfig:
    """The fine-tuning settings of the parsed ``finetune`` arguments (their defaults: ``FineTuneConfig()``)."""
    return FineTuneConfig(**{name: getattr(a, name) for name in FT_FLAGS}, seed=a.seed, device=a.device)


def _finetune(a: argparse.Namespace) -> int:
    cfg = finetune_config(a)
    vqvae, prior = VQVAE.load(a.vqvae, device=a.device), load_prior(a.prior, device=a.device)
    _check_pair(prior, vqvae)
    if a.discretized:
        if vqvae.cfg.leaf != "gaussian":
            raise ValueError(f"--discretized needs a Gaussian VQ-VAE; this one has {vqvae.cfg.leaf} leaves")
        cfg = dataclasses.replace(cfg, discretized=vqvae.cfg.levels)
    splits = _splits(a)
    check_fits(vqvae.cfg.image_shape, vqvae.cfg.levels, splits, "--vqvae")
    sel = _selection(prior, a)
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
