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
from vq2pc.core.distributed import is_main
from vq2pc.core.leaves import LEAF_KINDS
from vq2pc.data.datasets import DATASET_NAMES, DataSplits, load_dataset
from vq2pc.latents.selection import BEAM_SCORES, BEAM_SEARCHES, STRATEGIES, WEIGHTS, select
from vq2pc.models.priors import PRIOR_NAMES, load_prior, prior_config, train_prior
from vq2pc.models.quantizers import QUANTIZER_NAMES, make_quantizer
from vq2pc.models.train import TrainConfig
from vq2pc.models.vqvae import VQVAE, VQVAEConfig, encode_images, train_vqvae

_FMT = argparse.ArgumentDefaultsHelpFormatter


def _beam_args(p: argparse.ArgumentParser) -> None:
    """DMBS options shared by the commands that select latents."""
    p.add_argument("--starts", type=int, default=10, help="beam: starting tokens per class")
    p.add_argument("--beam-score", default="class", choices=list(BEAM_SCORES),
                   help="beam: rank a class's searches by p(z|c) (Algorithm 1) or by the class marginal p(z)")
    p.add_argument("--beam-search", default="deterministic", choices=list(BEAM_SEARCHES),
                   help="beam: keep the best B beams per position (Algorithm 2) or sample them without "
                        "replacement (Gumbel-top-k: more diverse latents within a class)")


def _data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="digits", choices=DATASET_NAMES, help="dataset")
    p.add_argument("--data-dir", help="directory with the dataset files (else $VQ2PC_DATA, else ~/.cache/vq2pc)")
    p.add_argument("--limit", type=int, help="cap every split at this many images")
    p.add_argument("--seed", type=int, default=0, help="random seed (split, init, noise)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")


def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--epochs", type=int, default=40, help="maximum epochs")
    p.add_argument("--patience", type=int, default=8, help="early-stopping patience (epochs without improvement)")
    p.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate")
    p.add_argument("--batch-size", type=int, default=64, help="mini-batch size")
    p.add_argument("--amp", choices=["bf16", "fp16"], help="mixed-precision training (autocast) on CUDA; refused on CPU")
    p.add_argument("--compile", action="store_true", help="torch.compile the training step")


def _train_cfg(a: argparse.Namespace) -> TrainConfig:
    return TrainConfig(epochs=a.epochs, patience=a.patience, lr=a.lr, batch_size=a.batch_size, seed=a.seed,
                       device=a.device, amp=a.amp, compile=a.compile)


def _splits(a: argparse.Namespace) -> DataSplits:
    return load_dataset(a.dataset, a.data_dir, seed=a.seed, limit=a.limit)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train-vqvae", help="train a VQ-VAE (checkpoint = resume point)", formatter_class=_FMT,
                       description="Train a VQ-VAE with a per-pixel leaf head. Re-running with the same --out resumes.")
    _data_args(p), _train_args(p)
    p.add_argument("--leaf", default="gaussian", choices=list(LEAF_KINDS), help="pixel model")
    p.add_argument("--grid", type=int, nargs=2, default=[2, 2], metavar=("H", "W"), help="latent grid")
    p.add_argument("--K", type=int, default=16, help="codebook size")
    p.add_argument("--D", type=int, default=16, help="codeword length")
    p.add_argument("--hidden", type=int, default=32, help="channels of the conv nets")
    p.add_argument("--res-blocks", type=int, default=1, help="residual blocks at the latent level")
    p.add_argument("--quantizer", default="vq", choices=list(QUANTIZER_NAMES),
                   help="vq (paper Eq. 6), ema, gumbel or gmvq (GM-VQ with the ALBO); see README 'Quantizers'")
    p.add_argument("--beta", type=float, default=0.25,
                   help="commitment weight (vq, ema); KL weight (gumbel); latent-alignment weight (gmvq)")
    p.add_argument("--quantizer-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="a quantizer option, repeatable (VALUE parsed as YAML), e.g. kmeans_init=true alpha=1.0")
    p.add_argument("--out", default="vqvae.pt", help="checkpoint to write")
    p.set_defaults(func=_train_vqvae)

    p = sub.add_parser("train-prior", help="train a class-conditional prior (PixelCNN or Transformer) over a VQ-VAE's codes",
                       formatter_class=_FMT, description="Encode the dataset with --vqvae and fit the prior.")
    _data_args(p), _train_args(p)
    p.add_argument("--vqvae", required=True, help="VQ-VAE checkpoint")
    p.add_argument("--prior", default="pixelcnn", choices=list(PRIOR_NAMES),
                   help="gated PixelCNN, or causal Transformer with a key/value cache")
    p.add_argument("--hidden", type=int, default=64, help="PixelCNN channels / Transformer width")
    p.add_argument("--layers", type=int, default=4, help="gated PixelCNN layers / Transformer blocks")
    p.add_argument("--heads", type=int, default=4, help="Transformer attention heads (--hidden must be a multiple)")
    p.add_argument("--unlabeled", action="store_true", help="ignore labels (C = 1)")
    p.add_argument("--out", default="prior.pt", help="checkpoint to write")
    p.set_defaults(func=_train_prior)

    p = sub.add_parser("distill", help="select latents and distill a circuit", formatter_class=_FMT,
                       description="Select N latents with a strategy and decode them into a MixtureCircuit.")
    p.add_argument("--vqvae", required=True, help="VQ-VAE checkpoint")
    p.add_argument("--prior", required=True, help="prior checkpoint")
    p.add_argument("--strategy", default="beam", choices=[s for s in STRATEGIES if s != "data"])
    p.add_argument("--N", type=int, default=256, help="number of components (ignored by exhaustive)")
    p.add_argument("--weights", default=None, choices=WEIGHTS,
                   help="mixture weights (default: prior for exhaustive, uniform otherwise)")
    _beam_args(p)
    p.add_argument("--max-space", type=int, default=2**24, help="refuse exhaustive selection above this size")
    p.add_argument("--std-floor", type=float, default=None,
                   help="Gaussian leaves: raise decoded stds below this to it (bounds the cost of unseen strokes)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--device", default="cpu", help="torch device")
    p.add_argument("--out", default="circuit.safetensors", help="circuit file to write")
    p.add_argument("--classes", action="store_true",
                   help="class-aware circuit: keep the class weights w_{n,c} (same --weights rule, per class) "
                   "for `vq2pc classify` and `--class`")
    p.set_defaults(func=_distill)

    p = sub.add_parser("evaluate", help="test BPD of a saved circuit", formatter_class=_FMT,
                       description="Print the test BPD of a circuit (JSON), averaged over dequantization draws.")
    _data_args(p)
    p.add_argument("circuit", help="circuit file (.safetensors)")
    p.add_argument("--draws", type=int, default=3, help="dequantization draws (continuous leaves)")
    p.set_defaults(func=_evaluate)

    p = sub.add_parser("usage", help="latent-space usage of a prior (paper Fig. 1)", formatter_class=_FMT,
                       description="Enumerate p(z) over the whole latent space and plot its sorted CDF.")
    p.add_argument("--prior", required=True, help="prior checkpoint")
    p.add_argument("--device", default="cpu", help="torch device")
    p.add_argument("--max-space", type=int, default=2**27, help="refuse spaces larger than this")
    p.add_argument("--out", default="usage.png", help="figure to write")
    p.set_defaults(func=_usage)


def _train_vqvae(a: argparse.Namespace) -> int:
    train_cfg = _train_cfg(a)  # impossible settings fail before any data work
    splits = _splits(a)
    cfg = VQVAEConfig(image_shape=splits.image_shape, levels=splits.levels, leaf=a.leaf, latent_hw=tuple(a.grid),
                      K=a.K, D=a.D, hidden=a.hidden, res_blocks=a.res_blocks, beta=a.beta, quantizer=a.quantizer,
                      quantizer_opts=_key_values(a.quantizer_opt, "--quantizer-opt"))
    make_quantizer(cfg.quantizer, cfg.K, cfg.D, cfg.beta, **cfg.quantizer_opts)  # bad options fail before any data work
    model, res = train_vqvae(splits, cfg, train_cfg, checkpoint=a.out)
    if is_main():
        print(json.dumps({"checkpoint": a.out, "best_val_loss": res.best_val_loss, "epochs": res.epochs_run,
                          "num_params": model.num_params}))
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
    train_cfg = _train_cfg(a)
    splits = _splits(a)
    vqvae = VQVAE.load(a.vqvae, device=a.device)
    labeled = splits.num_classes > 1 and not a.unlabeled
    cfg = prior_config(a.prior, vqvae.K, vqvae.latent_hw, splits.num_classes if labeled else 1, a.hidden, a.layers,
                       a.heads)
    prior, res = train_prior(encode_images(vqvae, splits.train_x, a.seed), splits.train_y if labeled else None, cfg,
                             train_cfg, encode_images(vqvae, splits.val_x, a.seed), splits.val_y if labeled else None,
                             checkpoint=a.out)
    if is_main():
        print(json.dumps({"checkpoint": a.out, "prior": a.prior, "best_val_nll_per_latent": res.best_val_loss,
                          "epochs": res.epochs_run, "num_params": prior.num_params}))
    return 0


def _distill(a: argparse.Namespace) -> int:
    vqvae, prior = VQVAE.load(a.vqvae, device=a.device), load_prior(a.prior, device=a.device)
    check_std_floor(a.std_floor, vqvae.cfg.leaf)
    if (vqvae.cfg.K, tuple(vqvae.cfg.latent_hw)) != (prior.K, tuple(prior.latent_hw)):
        raise ValueError(f"--prior (K={prior.K}, grid {prior.latent_hw}) does not match --vqvae "
                         f"(K={vqvae.cfg.K}, grid {vqvae.cfg.latent_hw})")
    sel = select(prior, a.strategy, a.N, starts=a.starts, beam_score=a.beam_score, beam_search=a.beam_search,
                 generator=torch.Generator().manual_seed(a.seed),
                 max_space=a.max_space, device=a.device, classes=a.classes)
    weights = a.weights or ("prior" if a.strategy == "exhaustive" else "uniform")
    meta = {"image_shape": list(vqvae.cfg.image_shape), "levels": vqvae.cfg.levels, "leaf": vqvae.cfg.leaf}
    circuit = distill(vqvae, sel, weights=weights, meta=meta, std_floor=a.std_floor, classes=a.classes, prior=prior)
    circuit.save(a.out)
    print(json.dumps({"circuit": a.out, "N": len(circuit), "num_params": circuit.num_params, "strategy": a.strategy,
                      "classes": getattr(circuit, "num_classes", None)}))
    return 0


def _evaluate(a: argparse.Namespace) -> int:
    from vq2pc.evaluate.density import test_bpd

    circuit = MixtureCircuit.load(a.circuit, device=a.device)
    splits = _splits(a)
    if circuit.num_variables != splits.num_variables:
        raise ValueError(f"circuit has S={circuit.num_variables} variables but {a.dataset} images have "
                         f"S={splits.num_variables}")
    bpd = test_bpd(circuit, splits.test_x, circuit.leaf.kind, splits.levels, draws=a.draws,
                   generator=torch.Generator().manual_seed(a.seed))
    print(json.dumps({"circuit": a.circuit, "N": len(circuit), "test_bpd": bpd["mean"], "test_bpd_std": bpd["std"]}))
    return 0


def _usage(a: argparse.Namespace) -> int:
    from vq2pc.evaluate.usage import latent_usage
    from vq2pc.latents.enumerate import enumerate_log_prior

    prior = load_prior(a.prior, device=a.device)
    res = latent_usage(enumerate_log_prior(prior, device=a.device, max_space=a.max_space), Path(a.out))
    print(json.dumps({k: v for k, v in res.items() if not isinstance(v, (list, dict))}))
    return 0
