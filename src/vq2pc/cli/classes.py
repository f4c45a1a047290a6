"""``vq2pc classify``: exact class posteriors p(c | x_observed) of a class-aware circuit."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from vq2pc.cli.circuit import _image_shape, _load_images, load_for_class
from vq2pc.cli.options import add_parser, seed_device_options


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``classify`` verb."""
    p = add_parser(
        subparsers,
        "classify",
        help="classify images with a class-aware circuit, exactly, also with pixels missing (JSON)",
        description="Exact Bayes classification with a class-aware circuit: p(c | x_observed) by marginalizing "
        "the missing pixels (no imputation). Prints the predicted classes and the class probabilities as JSON.",
    )
    p.add_argument("circuit", help="class-aware circuit file (ClassMixture.save or `distill --classes`)")
    p.add_argument("--images", required=True, help=".npy of images [n, C, H, W]: integer levels or model-space floats")
    p.add_argument("--mask", help=".npy of OBSERVED pixels (True/1 = observed): [n, C, H, W], [C, H, W], [n, S] or [S]")
    p.add_argument("--image-shape", type=int, nargs=3, metavar=("C", "H", "W"), help="override the stored image shape")
    seed_device_options(p, "the dequantization of integer images")
    p.set_defaults(func=cmd_classify)


def _load_mask(path: str, n: int, s: int) -> torch.Tensor:
    """A bool mask ``[n, S]`` or ``[S]`` from a .npy of bools or 0/1 values (``ValueError`` naming the problem)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"mask file not found: {path}")
    try:
        arr = torch.from_numpy(np.load(path, allow_pickle=False))
    except (ValueError, OSError, TypeError) as exc:
        raise ValueError(f"cannot read mask file {path}: not a numeric .npy array ({exc})") from None
    if arr.dtype != torch.bool:
        if arr.is_complex() or not bool(((arr == 0) | (arr == 1)).all()):
            raise ValueError(f"mask {path} must hold booleans or 0/1 values (True = observed)")
        arr = arr != 0
    if arr.numel() == s:
        return arr.reshape(s)
    if arr.shape[0] == n and arr[0].numel() == s:
        return arr.reshape(n, s)
    raise ValueError(
        f"mask has shape {tuple(arr.shape)}; expected {s} entries per image (one image's shape, "
        f"or [{n}, ...] for the {n} images)"
    )


def cmd_classify(args: argparse.Namespace) -> int:
    """Print ``{"classes", "images", "observed_fraction", "predictions", "probabilities"}`` as JSON."""
    model, c = load_for_class(args.circuit, args.device, None)
    if model is c:
        raise ValueError(f"{args.circuit} has no class weights: classify needs a class-aware circuit")
    shape = _image_shape(c, args.image_shape)
    g = torch.Generator(device=args.device).manual_seed(args.seed)
    x = _load_images(args.images, c, shape, g).to(args.device).reshape(-1, c.num_variables)
    mask = None if args.mask is None else _load_mask(args.mask, x.shape[0], c.num_variables).to(args.device)
    post = model.class_posterior(x, mask).double().exp()
    observed = 1.0 if mask is None else float(mask.float().mean())
    print(
        json.dumps(
            {
                "classes": model.num_classes,
                "images": int(x.shape[0]),
                "observed_fraction": observed,
                "predictions": post.argmax(1).tolist(),
                "probabilities": [[round(p, 6) for p in row] for row in post.tolist()],
            }
        )
    )
    return 0
