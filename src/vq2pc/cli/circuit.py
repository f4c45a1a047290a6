"""``vq2pc sample`` and ``vq2pc inpaint``: queries over a saved circuit."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from vq2pc.circuit.classes import ClassMixture, load_circuit
from vq2pc.circuit.mixture import MixtureCircuit
from vq2pc.cli.options import add_parser, option, out_option, seed_device_options
from vq2pc.core.files import atomic_write
from vq2pc.data.masks import MASK_KINDS, make_mask


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``sample`` and ``inpaint`` verbs."""
    p = add_parser(
        subparsers,
        "sample",
        help="draw exact samples from a saved circuit (grid PNG, optional .npy)",
        description="Draw exact samples from a saved circuit: a component from the mixture weights, then its "
        "pixels from their leaves. Writes a grid PNG and optionally the samples as .npy.",
    )
    _common(p)
    option(p, "num_samples", type=int, default=64, metavar="n", help="number of samples")
    out_option(p, "grid image file to write (.png)", required=True)
    p.add_argument("--npy", help="also write the samples [n, C, H, W] (model space) to this .npy file")
    _class_flag(p, "draw from p(x | class) (class-aware circuits)")
    p.set_defaults(func=cmd_sample)

    p = add_parser(
        subparsers,
        "inpaint",
        help="exact conditional mean and samples of hidden pixels; prints conditional BPD and MSE as JSON",
        description="Hide a region of each image (--mask names the HIDDEN region) and complete it exactly from "
        "p(x_hidden | x_observed): conditional mean and a conditional sample per image. Writes a figure and "
        "prints the conditional BPD of the hidden pixels and the MSE of the conditional mean as JSON.",
    )
    _common(p)
    p.add_argument("--images", required=True, help=".npy of images [n, C, H, W]: integer levels or model-space floats")
    p.add_argument("--mask", choices=MASK_KINDS, default="left", help="region that is HIDDEN")
    out_option(p, "figure file to write (.png; rows: original / masked / mean / sample)", required=True)
    p.add_argument("--show", type=int, default=8, help="images shown in the figure")
    _class_flag(p, "complete from p(x_hidden | x_observed, class) (class-aware circuits)")
    p.set_defaults(func=cmd_inpaint)


def _class_flag(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--class", dest="cls", type=int, metavar="C", help=f"class index: {what}")


def load_for_class(path: str, device: str, cls: int | None) -> tuple[MixtureCircuit | ClassMixture, MixtureCircuit]:
    """The circuit of ``path`` (class-aware when the file holds class weights) and its plain circuit;
    ``ValueError`` when a class is asked of a circuit without class weights."""
    c = load_circuit(path, device=device)
    if cls is not None and not isinstance(c, ClassMixture):
        raise ValueError(f"--class needs a class-aware circuit; {path} has no class weights")
    if cls is not None:
        c.check_classes(cls, 1)
    return c, (c.model if isinstance(c, ClassMixture) else c)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("circuit", help="circuit file written by MixtureCircuit.save (.safetensors)")
    p.add_argument("--image-shape", type=int, nargs=3, metavar=("C", "H", "W"), help="override the stored image shape")
    seed_device_options(p, "draws of components, pixels and masks")


def _image_shape(c: MixtureCircuit, override: list[int] | None) -> tuple[int, int, int]:
    shape = override or c.meta.get("image_shape")
    if shape is None:
        side = math.isqrt(c.num_variables)
        if side * side != c.num_variables:
            raise ValueError(f"circuit has S={c.num_variables} and no stored image shape; pass --image-shape C H W")
        shape = (1, side, side)
    shape = tuple(int(v) for v in shape)
    if len(shape) != 3 or math.prod(shape) != c.num_variables:
        raise ValueError(f"image shape {shape} does not have S={c.num_variables} entries")
    return shape  # type: ignore[return-value]


def _display(c: MixtureCircuit, x: Tensor) -> Tensor:
    """Model-space values -> [0, 1] for display."""
    if c.leaf.data_kind == "categorical":
        return x / max(c.leaf.num_levels - 1, 1)
    return x.clamp(0, 1)


def _save_grid(rows: list[Tensor], shape: tuple[int, int, int], titles: list[str], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_rows, n_cols = len(rows), rows[0].shape[0]
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(1.2 * n_cols, 1.2 * n_rows + 0.3), squeeze=False)
    for r, (row, title) in enumerate(zip(rows, titles)):
        for j in range(n_cols):
            img = row[j].reshape(shape).permute(1, 2, 0).cpu().numpy()
            ax = axes[r][j]
            ax.imshow(img[..., 0] if shape[0] == 1 else img, cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0 and title:
                ax.set_ylabel(title, fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=100))
    plt.close(fig)


def cmd_sample(args: argparse.Namespace) -> int:
    model, c = load_for_class(args.circuit, args.device, args.cls)
    shape = _image_shape(c, args.image_shape)
    g = torch.Generator(device=args.device).manual_seed(args.seed)
    x = (
        c.sample(args.num_samples, generator=g)
        if args.cls is None
        else model.sample(args.num_samples, c=args.cls, generator=g)
    )
    cols = math.ceil(math.sqrt(args.num_samples))
    shown = torch.cat([_display(c, x), torch.zeros(cols * cols - args.num_samples, x.shape[1], device=x.device)])
    _save_grid(list(shown.view(cols, cols, -1)), shape, [""] * cols, args.out)
    if args.npy:
        arr = x.reshape(args.num_samples, *shape).cpu().numpy()

        def write(p: Path) -> None:  # closed (so flushed) before atomic_write moves it into place
            with open(p, "wb") as f:
                np.save(f, arr)

        atomic_write(args.npy, write)
    print(json.dumps({"samples": args.num_samples, "out": args.out, "npy": args.npy, "class": args.cls}))
    return 0


def _load_images(path: str, c: MixtureCircuit, shape: tuple[int, int, int], g: torch.Generator) -> Tensor:
    if not Path(path).is_file():
        raise FileNotFoundError(f"images file not found: {path}")
    try:
        arr = torch.from_numpy(np.load(path, allow_pickle=False))
    except (ValueError, OSError, TypeError) as exc:  # not .npy, pickled objects, truncated
        raise ValueError(f"cannot read images file {path}: not a numeric .npy array ({exc})") from None
    if arr.dim() == 3 and shape[0] == 1:
        arr = arr[:, None]
    if tuple(arr.shape[1:]) != shape:
        raise ValueError(f"images have shape {tuple(arr.shape)}; expected [n, {shape[0]}, {shape[1]}, {shape[2]}]")
    if arr.is_floating_point():
        return arr.float()
    from vq2pc.data.datasets import (
        to_model_space,  # integer levels: the data module's conventions
    )

    return to_model_space(arr, c.leaf.data_kind, int(c.meta.get("levels", 256)), g).float()


def cmd_inpaint(args: argparse.Namespace) -> int:
    if args.show < 1:
        raise ValueError(f"--show must be >= 1 (images in the figure), got {args.show}")
    model, c = load_for_class(args.circuit, args.device, args.cls)
    shape = _image_shape(c, args.image_shape)
    g = torch.Generator(device=args.device).manual_seed(args.seed)
    x = _load_images(args.images, c, shape, g).to(args.device).reshape(-1, c.num_variables)
    given = {} if args.cls is None else {"c": args.cls}  # every query of p(. | class)
    q = c if args.cls is None else model
    mask = make_mask(args.mask, shape, x.shape[0], g, device=args.device)
    hidden = (~mask).sum(1)
    if (hidden == 0).any():
        raise ValueError("the mask hides no pixel")
    cond_nats = q.log_prob(x, **given) - q.log_prob(x, mask=mask, **given)  # -log p(x_u | x_o) with a minus sign
    bpd = -cond_nats / (hidden * math.log(2))
    if c.leaf.kind == "gaussian":
        bpd = bpd + math.log2(int(c.meta.get("levels", 256)))
    mean = q.conditional_mean(x, mask=mask, **given)
    mse = (((mean - x) ** 2) * (~mask)).sum(1) / hidden
    k = min(args.show, x.shape[0])
    sample = q.sample(x=x[:k], mask=mask[:k], generator=g, **given)
    masked = torch.where(mask[:k], _display(c, x[:k]), torch.full_like(x[:k], 0.5))
    rows = [_display(c, x[:k]), masked, _display(c, mean[:k]), _display(c, sample)]
    _save_grid(rows, shape, ["original", "masked", "cond. mean", "cond. sample"], args.out)
    report = {
        "mask": args.mask,
        "class": args.cls,
        "images": int(x.shape[0]),
        "conditional_bpd_hidden": float(bpd.mean()),
        "mse_conditional_mean_model_space": float(mse.mean()),
        "out": args.out,
    }
    print(json.dumps(report))
    return 0
