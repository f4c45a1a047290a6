"""Samples and class balance (paper App. E, Figs. 4–5).

Samples of every model are brought to ``[0, 1]`` intensities the same way
(:func:`vq2pc.evaluate.common.to_unit`: clamp for continuous leaves, ``level/(L-1)``
for categorical ones), classified by the project's small CNN, and the label
histogram is compared with the uniform distribution by KL divergence (nats):
``KL(p || U) = log C - H(p)``, 0 for a perfectly balanced generator.

The estimate from ``n`` samples is noisy: its standard deviation is about
``sqrt(Var_p[log p_c] / n)`` (≈ 0.002 nats at ``n = 10,000`` for MNIST-like
histograms), so every histogram carries ``kl_std``, a parametric bootstrap
(multinomial resampling of the histogram) of that noise. Two models'
KLs differ beyond noise only when the gap exceeds about
``2·sqrt(std_a² + std_b²)``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping

import matplotlib
import numpy as np
import torch
from torch import Tensor

from vq2pc.evaluate.classifier import SmallCNN, classify
from vq2pc.evaluate.common import DensityModel, check_leaf_kind, images_to_unit, to_unit
from vq2pc.evaluate.plots import as_images, image_grid, new_figure, save_figure, styled

__all__ = [
    "draw_samples",
    "kl_from_uniform",
    "kl_std",
    "label_histogram",
    "class_balance",
    "plot_samples",
    "DATA_KEY",
    "TEST_KEY",
]

DATA_KEY = "data labels"
TEST_KEY = "classifier on test data"


@torch.no_grad()
def draw_samples(
    model: DensityModel,
    n: int,
    leaf_kind: str,
    levels: int,
    image_shape: tuple[int, int, int],
    batch_size: int = 1000,
    generator: torch.Generator | None = None,
) -> Tensor:
    """``n`` unconditional samples of ``model`` as float32 images ``[n,C,H,W]`` in ``[0,1]`` (CPU)."""
    check_leaf_kind(leaf_kind, levels)
    if n < 1:
        raise ValueError(f"number of samples must be >= 1, got {n}")
    parts = []
    for start in range(0, n, batch_size):
        x = model.sample(min(batch_size, n - start), generator=generator)
        parts.append(to_unit(x.cpu(), leaf_kind, levels))
    return as_images(torch.cat(parts), image_shape)


def _kl_rows(c: np.ndarray) -> np.ndarray:
    """``KL(p_r || U_C)`` for each row ``r`` of non-negative counts ``c [R, C]`` (``0·log 0 = 0``)."""
    p = c / c.sum(1, keepdims=True)
    logs = np.log(np.where(p > 0, p * c.shape[1], 1.0))
    return np.sum(p * logs, axis=1)


def _check_counts(counts: Tensor | np.ndarray | list) -> np.ndarray:
    c = np.asarray(counts, dtype=np.float64)
    if c.ndim != 1 or c.size < 1 or (c < 0).any() or c.sum() <= 0:
        raise ValueError("counts must be a non-empty 1-d histogram of non-negative numbers with a positive sum")
    return c


def kl_from_uniform(counts: Tensor | np.ndarray | list) -> float:
    """``KL(p || U_C)`` in nats of the normalized histogram ``counts [C]`` (``0·log 0 = 0``)."""
    return float(_kl_rows(_check_counts(counts)[None])[0])


def kl_std(counts: Tensor | np.ndarray | list, draws: int = 2000, seed: int = 0) -> float:
    """Standard deviation of :func:`kl_from_uniform` over ``draws`` histograms of the same total resampled
    from ``counts [C]`` (multinomial, a fixed ``seed``): the sampling noise of the KL estimate."""
    c = _check_counts(counts)
    n = round(c.sum())
    resampled = np.random.default_rng(seed).multinomial(n, c / c.sum(), size=int(draws))  # [draws, C]
    return float(np.round(_kl_rows(resampled.astype(np.float64)).std(ddof=1), 12))  # 0, not 1e-16, for one class


def label_histogram(labels: Tensor, num_classes: int) -> dict[str, Any]:
    """``labels [n]`` -> ``{"hist": counts [C], "kl_from_uniform": nats, "kl_std": nats, "n": n}``."""
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes - 1}]")
    hist = torch.bincount(labels.long().cpu(), minlength=num_classes).numpy()
    return {
        "hist": hist.tolist(),
        "kl_from_uniform": kl_from_uniform(hist),
        "kl_std": kl_std(hist),
        "n": int(labels.numel()),
    }


def class_balance(
    classifier: SmallCNN,
    samples_by_model: Mapping[str, Tensor],
    data_labels: Tensor,
    out_png: str | Path,
    test_images: Tensor | None = None,
    levels: int | None = None,
) -> dict[str, dict[str, Any]]:
    """Fig. 5: label histograms of the data, of the classifier on test data, and of each model's samples.

    ``samples_by_model``: name -> images ``[n,C,H,W]`` (uint8 levels with ``levels``, or
    ``[0,1]`` floats; e.g. from :func:`draw_samples`); ``data_labels [n]``: the dataset's
    labels; ``test_images`` (optional): test images whose predicted labels are shown.
    Returns name -> ``{"hist", "kl_from_uniform", "kl_std", "n"}`` (keys :data:`DATA_KEY`,
    :data:`TEST_KEY` and every model name) and writes a grouped bar chart (log y).
    """
    num_classes = int(classifier.cfg.num_classes)
    result = {DATA_KEY: label_histogram(data_labels, num_classes)}
    if test_images is not None:
        result[TEST_KEY] = label_histogram(classify(classifier, test_images, levels), num_classes)
    for name, images in samples_by_model.items():
        if name in result:
            raise ValueError(f"model name {name!r} collides with a reserved histogram name")
        result[name] = label_histogram(classify(classifier, images_to_unit(images, levels)), num_classes)
    _plot_balance(result, num_classes, Path(out_png))
    return result


@styled
def _plot_balance(result: dict[str, dict[str, Any]], num_classes: int, out_png: Path) -> Path:
    names = list(result)
    fig = new_figure(max(6.0, 0.55 * num_classes * (1 + 0.15 * len(names))), 4.0)
    ax = fig.add_subplot()
    width = 0.85 / len(names)
    classes = np.arange(num_classes)
    colors = matplotlib.colormaps["tab10" if len(names) <= 10 else "tab20"].colors  # one colour per source
    for i, name in enumerate(names):
        hist = np.asarray(result[name]["hist"], dtype=np.float64)
        freq = hist / hist.sum()
        label = f"{name} (KL={result[name]['kl_from_uniform']:.3f}±{result[name].get('kl_std', 0.0):.3f})"
        ax.bar(
            classes - 0.425 + (i + 0.5) * width,
            np.where(freq > 0, freq, np.nan),
            width,
            label=label,
            color=colors[i % len(colors)],
        )
    ax.axhline(1.0 / num_classes, color="black", ls="--", lw=1, label="uniform")
    ax.set_yscale("log")
    ax.set_xticks(classes)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("fraction of images (log scale)")
    ax.set_title("Class balance of samples (KL from uniform ± bootstrap std, nats)")
    fig.legend(loc="outside lower center", ncols=min(3, len(names) + 1))
    return save_figure(fig, out_png)


@styled
def plot_samples(
    samples_by_model: Mapping[str, Tensor],
    image_shape: tuple[int, int, int],
    out_png: str | Path,
    levels: int | None = None,
    per_model: int = 36,
) -> Path:
    """Fig. 4: a grid of the first ``per_model`` samples of each model, side by side.

    Values: images ``[n,C,H,W]`` or ``[n,S]``, uint8 levels (with ``levels``) or ``[0,1]`` floats.
    """
    if not samples_by_model:
        raise ValueError("plot_samples needs at least one model's samples")
    ncols = max(1, math.isqrt(per_model))
    fig = new_figure(2.3 * len(samples_by_model) + 0.4, 2.7)
    axes = fig.subplots(1, len(samples_by_model), squeeze=False)[0]
    for ax, (name, images) in zip(axes, samples_by_model.items()):
        imgs = images_to_unit(as_images(images[:per_model], image_shape), levels)
        image_grid(ax, imgs, ncols, title=name)
    fig.suptitle("Samples", fontsize=10)
    return save_figure(fig, out_png)
