"""Class-aware circuit whose components are the VQ-VAE codes of labelled training images, scored by the product.

Each of ``N`` training images is encoded, and its code decoded into a categorical leaf held as a decoder-head
leaf (:class:`~vq2pc.core.head_leaf.HeadCategorical`: the decoder's features before its head convolution, 32
numbers per pixel and component instead of 256, so N = 50,000 takes 5 GB instead of the 40 GB of a table).
Its class weight is its own label, smoothed by ``eps`` (``w_{n,c} ∝ (1 - eps)·1[c = y_n] + eps/(C-1)·1[c ≠
y_n]``, uniform over ``n``): a :class:`~vq2pc.circuit.ClassMixture`. ``--shifts R`` (``--ball``) and ``--rotations A ...`` give
every component warped copies (:mod:`vq2pc.core.warps`: each integer shift within R pixels, each rotation by
A degrees about the centre; the copies keep the label), D·N components from the same N stored maps. Images are
classified by its exact
``class_posterior`` from full images and under the report's masks (random pixels missing, structured
regions), beside the run's CNN with mean imputation (``--classifier``); ``--save`` keeps the circuit for
``vq2pc classify``. Prints ONE JSON line: accuracy, ECE
and label NLL per mask, and the wall time.

    python benchmarks/class_data_components.py RUN/categorical/4x4/vqvae.pt --data-dir DIR --N 50000 \\
        --split val --limit 1000 --eps 0.01 0.1
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from vq2pc import ClassMixture, MixtureCircuit
from vq2pc.circuit.distill import decode_head_leaf
from vq2pc.core.warps import shift_warps
from vq2pc.data.datasets import load_dataset
from vq2pc.evaluate.classification import (
    MISSING_FRACTIONS,
    REGIONS,
    classification_masks,
    classification_metrics,
    plot_classification,
)
from vq2pc.evaluate.classifier import load_classifier
from vq2pc.models.vqvae import VQVAE, encode_images


def label_weights(labels: torch.Tensor, classes: int, eps: float) -> torch.Tensor:
    """``[N, C]`` log class weights: each component's own label, smoothed by ``eps``."""
    own = torch.nn.functional.one_hot(labels, classes).double()
    return torch.log((1 - eps) * own + eps / (classes - 1) * (1 - own))


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("vqvae", help="a one-channel categorical VQ-VAE (vqvae.pt)")
    p.add_argument("--data-dir", required=True)
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--N", type=int, default=50000, help="training images used as components (random subset)")
    p.add_argument("--split", choices=("val", "test"), default="val", help="images classified")
    p.add_argument("--limit", type=int, default=None, help="only the first LIMIT images of the split")
    p.add_argument("--eps", type=float, nargs="+", default=[0.01])
    p.add_argument("--shifts", type=int, default=0, help="warped copies: every shift up to this many pixels")
    p.add_argument("--ball", choices=("square", "diamond"), default="square", help="--shifts: |dy|,|dx| or |dy|+|dx|")
    p.add_argument("--rotations", type=float, nargs="*", default=[], help="warped copies: rotations (degrees)")
    p.add_argument("--fractions", type=float, nargs="*", default=list(MISSING_FRACTIONS), help="random masks")
    p.add_argument("--regions", nargs="*", default=list(REGIONS), help="structured masks")
    p.add_argument("--classifier", default=None, help="the run's CNN (classifier.pt): mean imputation beside")
    p.add_argument("--figure", default=None, help="also plot accuracy per mask into this .png")
    p.add_argument("--save", default=None, help="also save the circuit of the first --eps here (`vq2pc classify`)")
    return p.parse_args()


def main() -> None:
    a = parse_args()
    t0 = time.time()
    splits = load_dataset(a.dataset, a.data_dir, seed=0)
    vq = VQVAE.load(a.vqvae).eval()
    idx = torch.randperm(len(splits.train_x), generator=torch.Generator().manual_seed(0))[: a.N]
    warps = shift_warps(a.shifts, a.ball) + [(angle, 1.0, 0.0, 0.0) for angle in a.rotations]
    with torch.no_grad():
        leaf = decode_head_leaf(vq, encode_images(vq, splits.train_x[idx]), warps=warps if len(warps) > 1 else None)
    built = time.time() - t0
    x, y = (splits.val_x, splits.val_y) if a.split == "val" else (splits.test_x, splits.test_y)
    x, y = x[: a.limit].flatten(1).long(), y[: a.limit]
    masks = classification_masks(
        splits.image_shape, len(y), tuple(a.fractions), tuple(a.regions), torch.Generator().manual_seed(1)
    )
    classes = int(splits.num_classes)
    circuit = MixtureCircuit(leaf, torch.zeros(leaf.num_components))
    labels = splits.train_y[idx].repeat(leaf.num_warps)  # warp-major: copy d of image n is component d·N + n
    models = {f"eps={e}": ClassMixture(circuit, label_weights(labels, classes, e)) for e in a.eps}
    if a.save:
        models[f"eps={a.eps[0]}"].save(a.save)
    cnn = load_classifier(a.classifier) if a.classifier else None
    out, _ = classification_metrics(
        models, x.float(), y, masks, "categorical", splits.levels, splits.image_shape, cnn, impute=False
    )
    for per_mask in out["circuit"].values():
        for metrics in per_mask.values():
            metrics.pop("reliability")
    if a.figure:
        copies = f", {leaf.num_warps} warped copies each" if leaf.num_warps > 1 else ""
        title = f"{len(idx):,} labelled training images as components{copies} ({a.split})"
        plot_classification(out, a.figure, title)
    print(
        json.dumps(
            {
                "N": len(idx),
                "warps": warps,
                "components": leaf.num_components,
                "split": a.split,
                "images": len(y),
                "features_gb": round(leaf.features.numel() * 4 / 2**30, 2),
                "params": sum(t.numel() for t in leaf.tensors().values()) + leaf.num_components,
                "results": out,
                "build_seconds": round(built, 1),
                "seconds": round(time.time() - t0, 1),
                "threads": torch.get_num_threads(),
            }
        )
    )


if __name__ == "__main__":
    main()
