"""Classification with missing pixels: class-aware circuits against a CNN given imputed images.

A class-aware circuit (:class:`~vq2pc.circuit.classes.ClassMixture`) classifies by exact Bayes,
``p(c | x_o)``, marginalizing the hidden pixels; a CNN needs the hidden pixels filled in. For every mask
(full images, random pixels hidden at several rates, the inpainting regions of :mod:`vq2pc.data.masks`)
this measures, on the same test images:

* the circuit's accuracy, expected calibration error (15 equal-width confidence bins) and label NLL
  ``-log p(y | x_o)`` (nats, mean over images);
* the CNN (:mod:`vq2pc.evaluate.classifier`) on the images with the hidden pixels set to the training
  mean ("mean imputation") and to the circuit's own exact conditional mean ``E[x_u | x_o]``.

Figures: accuracy versus missing pixels (curves) and per region (bars); reliability diagrams and
confusion matrices of the full images; class-conditional samples and class-forced completions.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from vq2pc.circuit.classes import ClassMixture
from vq2pc.core.random import uniform
from vq2pc.data.masks import make_mask
from vq2pc.evaluate.classifier import SmallCNN
from vq2pc.evaluate.common import to_unit
from vq2pc.evaluate.plots import clean_axes, hidden_pixels, new_figure, save_figure, styled, tile_rgb, to_rgb

__all__ = [
    "MISSING_FRACTIONS",
    "REGIONS",
    "calibration",
    "circuit_log_posteriors",
    "class_panels",
    "classification_masks",
    "classification_metrics",
    "cnn_log_posteriors",
    "plot_calibration",
    "plot_class_samples",
    "plot_classification",
]

MISSING_FRACTIONS = (0.1, 0.3, 0.5, 0.7, 0.9)
REGIONS = ("top", "bottom", "left", "right", "center")
BINS = 15


def classification_masks(
    image_shape: tuple[int, int, int],
    n: int,
    fractions: tuple[float, ...] = MISSING_FRACTIONS,
    regions: tuple[str, ...] = REGIONS,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor | None]:
    """``{"full": None, "random 10%": [n, S], ..., "top": [n, S], ...}`` observed-masks (True = observed);
    a random mask hides each pixel (all its channels) independently with the given probability."""
    c, h, w = image_shape
    masks: dict[str, Tensor | None] = {"full": None}
    for f in fractions:
        if not 0.0 < f < 1.0:
            raise ValueError(f"missing fractions must lie in (0, 1), got {f}")
        hidden = uniform((n, 1, h, w), generator, "cpu") < f
        masks[f"random {round(100 * f)}%"] = (~hidden).expand(n, c, h, w).reshape(n, c * h * w)
    for region in regions:
        masks[region] = make_mask(region, image_shape, n)
    return masks


def calibration(log_post: Tensor, labels: Tensor, bins: int = BINS) -> dict[str, Any]:
    """Accuracy, ECE (``bins`` equal-width confidence bins), label NLL (nats) and the reliability curve
    (per bin: mean confidence, accuracy, count) of log-posteriors ``[B, C]`` against ``labels [B]``."""
    log_post, labels = log_post.double().cpu(), labels.long().cpu()
    conf, pred = log_post.exp().max(1)
    correct = (pred == labels).double()
    which = (conf * bins).long().clamp_(0, bins - 1)
    count = torch.bincount(which, minlength=bins).double()
    conf_sum = torch.bincount(which, conf, minlength=bins)
    acc_sum = torch.bincount(which, correct, minlength=bins)
    ece = float((conf_sum - acc_sum).abs().sum() / max(len(labels), 1))
    nll = -log_post.gather(1, labels[:, None]).squeeze(1)
    seen = count > 0
    return {
        "accuracy": float(correct.mean()),
        "ece": ece,
        "nll": float(nll.mean()),
        "nll_median": float(nll.median()),
        "reliability": {
            "confidence": (conf_sum[seen] / count[seen]).tolist(),
            "accuracy": (acc_sum[seen] / count[seen]).tolist(),
            "count": count[seen].long().tolist(),
        },
    }


@torch.no_grad()
def circuit_log_posteriors(model: ClassMixture, x: Tensor, mask: Tensor | None, batch_size: int = 500) -> Tensor:
    """``[B, C]`` float64 log p(c | x_o) on the model's device, in batches, returned on the CPU."""
    dev = model.device
    parts = [
        model.log_joint(x[i : i + batch_size].to(dev), None if mask is None else mask[i : i + batch_size].to(dev))
        for i in range(0, x.shape[0], batch_size)
    ]
    joint = torch.cat(parts).cpu()
    return joint - torch.logsumexp(joint, 1, keepdim=True)


@torch.no_grad()
def cnn_log_posteriors(classifier: SmallCNN, images: Tensor, batch_size: int = 1000) -> Tensor:
    """``[B, C]`` float64 log-softmax of the CNN on images ``[B, C, H, W]`` in ``[0, 1]`` (CPU result)."""
    classifier.eval()
    dev = next(classifier.parameters()).device
    parts = [
        torch.log_softmax(classifier(images[i : i + batch_size].to(dev)).double(), 1).cpu()
        for i in range(0, images.shape[0], batch_size)
    ]
    return torch.cat(parts)


def _imputed(model: ClassMixture, x: Tensor, mask: Tensor, batch_size: int) -> Tensor:
    """``[B, S]`` x with hidden entries set to the circuit's exact E[x_u | x_o] (model space, CPU)."""
    dev = model.device
    return torch.cat(
        [
            model.conditional_mean(x[i : i + batch_size].to(dev), mask[i : i + batch_size].to(dev)).cpu()
            for i in range(0, x.shape[0], batch_size)
        ]
    )


def classification_metrics(
    models: Mapping[str, ClassMixture],
    x_model: Tensor,
    labels: Tensor,
    masks: Mapping[str, Tensor | None],
    leaf_kind: str,
    levels: int,
    image_shape: tuple[int, int, int],
    classifier: SmallCNN | None = None,
    fill_unit: Tensor | None = None,
    batch_size: int = 500,
    impute: bool = True,
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Numbers of every model (and of the CNN) per mask, and the full-image log-posteriors ``[B, C]`` by name.

    ``x_model [B, S]``: test images in model space; ``labels [B]``; ``masks``: name -> ``[B, S]`` or None;
    ``fill_unit [S]``: the CNN's mean imputation in ``[0, 1]`` (default: the test images' mean); ``impute``:
    also the CNN on each circuit's conditional-mean imputation (one more pass per model and mask).
    Returns ``({"circuit": {model: {mask: metrics}}, "cnn_mean": {mask: metrics},
    "cnn_circuit": {model: {mask: metrics}}, "hidden_fraction": {mask: f}}, posteriors)``.
    """
    x_unit = to_unit(x_model, leaf_kind, levels)
    fill = x_unit.mean(0) if fill_unit is None else fill_unit.reshape(-1).float()
    out: dict[str, Any] = {
        "circuit": {},
        "cnn_mean": {},
        "cnn_circuit": {},
        "hidden_fraction": {k: 0.0 if m is None else float((~m).float().mean()) for k, m in masks.items()},
    }
    full: dict[str, Tensor] = {}

    def as_img(u):
        return u.reshape(-1, *image_shape)

    if classifier is not None:
        for key, mask in masks.items():
            filled = x_unit if mask is None else torch.where(mask, x_unit, fill)
            post = cnn_log_posteriors(classifier, as_img(filled))
            out["cnn_mean"][key] = _summary(post, labels)
            if key == "full":
                full["CNN"] = post
    for name, model in models.items():
        out["circuit"][name], out["cnn_circuit"][name] = {}, {}
        for key, mask in masks.items():
            post = circuit_log_posteriors(model, x_model, mask, batch_size)
            out["circuit"][name][key] = calibration(post, labels)
            if key == "full":
                full[name] = post
            if classifier is None or not impute:
                continue
            if mask is None:  # nothing to impute: the CNN on the full images
                out["cnn_circuit"][name][key] = out["cnn_mean"][key]
                continue
            filled = to_unit(_imputed(model, x_model, mask, batch_size), leaf_kind, levels)
            out["cnn_circuit"][name][key] = _summary(cnn_log_posteriors(classifier, as_img(filled)), labels)
    return out, full


def _summary(post: Tensor, labels: Tensor) -> dict[str, Any]:
    return {k: v for k, v in calibration(post, labels).items() if k != "reliability"}


def _series(results: dict[str, Any]) -> list[tuple[str, dict[str, Any], str, str, str, float]]:
    """(label, metrics by mask, color, line style, marker, bar alpha) of every curve."""
    out = []
    for i, name in enumerate(results["circuit"]):
        out.append((f"{name}: exact p(c | x_o)", results["circuit"][name], f"C{i}", "-", "o", 1.0))
        if results["cnn_circuit"].get(name):
            out.append((f"CNN, {name} imputation", results["cnn_circuit"][name], f"C{i}", ":", "s", 0.45))
    if results["cnn_mean"]:
        out.append(("CNN, mean imputation", results["cnn_mean"], "black", "--", "x", 0.45))
    return out


@styled
def plot_classification(results: dict[str, Any], out_png: str | Path, title: str = "") -> Path:
    """Accuracy versus the fraction of random missing pixels (left) and per hidden region (right; left out
    where no region was measured)."""
    frac = results["hidden_fraction"]
    curves = [k for k in frac if k == "full" or k.startswith("random")]
    regions = [k for k in frac if k not in curves]
    fig = new_figure(11 if regions else 6.4, 4.2)
    ax, bx = fig.subplots(1, 2, width_ratios=(1.3, 1)) if regions else (fig.subplots(), None)
    series = _series(results)
    width = 0.8 / max(1, len(series))
    for j, (label, per, color, style, marker, alpha) in enumerate(series):
        ax.plot(
            [frac[k] for k in curves],
            [per[k]["accuracy"] for k in curves],
            style,
            marker=marker,
            color=color,
            label=label,
            ms=4,
        )
        if bx is None:
            continue
        bars = [per[k]["accuracy"] for k in regions]
        bx.bar(np.arange(len(regions)) + (j - len(series) / 2 + 0.5) * width, bars, width, color=color, alpha=alpha)
    ax.set(xlabel="fraction of pixels missing (random)", ylabel="test accuracy", ylim=(0, 1.02), title=title)
    ax.legend(fontsize=7)
    if bx is None:
        return save_figure(fig, out_png)
    bx.set_xticks(range(len(regions)), [f"{r} hidden" for r in regions], rotation=20)
    bx.set(ylabel="test accuracy", ylim=(0, 1.02), title="inpainting regions hidden")
    return save_figure(fig, out_png)


@styled
def plot_calibration(posteriors: Mapping[str, Tensor], labels: Tensor, out_png: str | Path) -> Path:
    """Per model (columns): reliability diagram (top) and confusion matrix (bottom) on full images."""
    names = list(posteriors)
    fig = new_figure(3.2 * len(names), 6.4)
    axes = np.asarray(fig.subplots(2, len(names), squeeze=False))
    for j, name in enumerate(names):
        post, y = posteriors[name], labels.long().cpu()
        rel = calibration(post, y)
        top, bottom = axes[0, j], axes[1, j]
        top.plot([0, 1], [0, 1], ":", color="gray")
        top.plot(rel["reliability"]["confidence"], rel["reliability"]["accuracy"], "o-", ms=3)
        top.set(
            title=f"{name}\nacc {rel['accuracy']:.3f}, ECE {rel['ece']:.3f}",
            xlabel="confidence",
            ylabel="accuracy",
            xlim=(0, 1),
            ylim=(0, 1),
        )
        C = post.shape[1]
        conf = torch.zeros(C, C).index_put_((y, post.argmax(1)), torch.ones(len(y)), accumulate=True)
        bottom.imshow((conf / conf.sum(1, keepdim=True).clamp_min(1)).numpy(), cmap="Blues", vmin=0, vmax=1)
        bottom.set(xlabel="predicted", ylabel="true", xticks=range(C), yticks=range(C))
        bottom.tick_params(labelsize=6)
        bottom.grid(False)
    return save_figure(fig, out_png)


@torch.no_grad()
def class_panels(
    model: ClassMixture,
    x: Tensor,
    mask: Tensor,
    leaf_kind: str,
    levels: int,
    image_shape: tuple[int, int, int],
    per_class: int = 6,
    generator: torch.Generator | None = None,
) -> list[np.ndarray]:
    """Thumbnails, a row per class: ``per_class`` samples of p(x | c), a gap, each image of ``x [k, S]`` with
    its hidden part painted, and E[x_u | x_o, c] of each (the completion forced to class c)."""
    C, k, dev = model.num_classes, x.shape[0], model.device
    cls = torch.arange(C, device=dev).repeat_interleave(per_class)
    samples = to_unit(model.sample(C * per_class, c=cls, generator=generator).cpu(), leaf_kind, levels)
    forced = model.conditional_mean(
        x.repeat(C, 1).to(dev), mask.repeat(C, 1).to(dev), torch.arange(C, device=dev).repeat_interleave(k)
    ).cpu()
    forced, shown = to_unit(forced, leaf_kind, levels), to_unit(x, leaf_kind, levels)
    panels = []
    for c in range(C):  # a few thumbnails per class for a picture
        panels += [to_rgb(s.reshape(image_shape)) for s in samples[c * per_class : (c + 1) * per_class]]
        panels.append(np.ones((image_shape[1], image_shape[2], 3), np.float32))
        panels += [to_rgb(shown[i].reshape(image_shape), hidden_pixels(mask[i], image_shape)) for i in range(k)]
        panels += [to_rgb(f.reshape(image_shape)) for f in forced[c * k : (c + 1) * k]]
    return panels


@styled
def plot_class_samples(panels: Mapping[str, list[np.ndarray]], cols: int, rows: int, out_png: str | Path) -> Path:
    """Per model, the :func:`class_panels` mosaic (``cols`` thumbnails a row, ``rows`` classes)."""
    fig = new_figure(0.45 * cols * len(panels) + 0.5, 0.45 * rows + 0.8)
    axes = np.atleast_1d(fig.subplots(1, len(panels), squeeze=False)[0])
    for ax, (name, tiles) in zip(axes, panels.items()):
        ax.imshow(tile_rgb(tiles, cols), interpolation="nearest")
        clean_axes(ax)
        ax.set_title(f"{name}: p(x | c) | x_o | E[x_u | x_o, c]", fontsize=8)
    return save_figure(fig, out_png)
