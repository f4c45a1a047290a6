"""Inpainting (paper Fig. 3), made quantitative: conditional BPD and MSE of the hidden pixels.

For an image ``x`` and an observed-mask ``m`` (True = observed, hidden ``u = ~m``):

* conditional BPD of the hidden pixels:
  ``-(log p(x) - log p(x_o)) / (|u| · ln 2)`` ``(+ log2 L`` for continuous leaves,
  the convention of ``data.bpd``), i.e. ``-log2 p(x_u | x_o)`` per hidden variable;
* MSE of the conditional mean ``E[x_u | x_o]`` against the true hidden pixels, in
  ``[0, 1]`` intensity units (categorical levels are divided by ``L - 1``).

Both are computed per image and averaged over the images that have a hidden pixel.
"""

from __future__ import annotations

import inspect
import math
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import Tensor

from vq2pc.core.validate import observed_mask
from vq2pc.evaluate.common import (
    DensityModel,
    check_leaf_kind,
    check_model_batch,
    log2_levels,
    model_device,
    to_unit,
)
from vq2pc.evaluate.density import model_log_prob
from vq2pc.evaluate.plots import clean_axes, hidden_pixels, new_figure, save_figure, styled, tile_rgb, to_rgb

__all__ = [
    "inpainting_metrics",
    "conditional_bpd",
    "conditional_mean",
    "inpainting_panels",
    "plot_inpainting",
    "plot_inpainting_panels",
]


def _check_mask(mask: Tensor, x: Tensor, name: str) -> Tensor:
    """The mask named ``name`` for ``x [B,S]`` as bool ``[B,S]`` (True = observed)."""
    return observed_mask(mask, x.shape[0], x.shape[1], f"mask {name!r}")


def conditional_bpd(lp_full: Tensor, lp_obs: Tensor, hidden_count: Tensor, leaf_kind: str, levels: int) -> Tensor:
    """Per-image bits per hidden variable of ``p(x_u | x_o)``.

    ``lp_full``, ``lp_obs``: ``[B]`` log p(x), log p(x_o) in nats; ``hidden_count [B]``
    (> 0). Returns ``[B]`` float64.
    """
    bits = -(lp_full.double() - lp_obs.double()) / (hidden_count.double() * math.log(2.0))
    return bits + log2_levels(leaf_kind, levels)


@torch.no_grad()
def conditional_mean(model: DensityModel, x: Tensor, mask: Tensor, batch_size: int = 500) -> Tensor | None:
    """``E[x | x_o]`` ``[B,S]`` in model space (batched on the model's device), or None if unsupported."""
    fn = getattr(model, "conditional_mean", None)
    if fn is None:
        return None
    device = model_device(model)
    parts = [
        fn(x[i : i + batch_size].to(device), mask[i : i + batch_size].to(device))
        for i in range(0, x.shape[0], batch_size)
    ]
    return torch.cat(parts)


def inpainting_metrics(
    model: DensityModel,
    x_model: Tensor,
    masks: Mapping[str, Tensor],
    leaf_kind: str,
    levels: int,
    batch_size: int = 500,
) -> dict[str, dict[str, Any]]:
    """Conditional BPD and conditional-mean MSE of the hidden pixels, per mask.

    ``x_model [B,S]``: test images in model space; ``masks``: name -> bool ``[B,S]``
    (True = observed). Returns ``{mask: {"cond_bpd", "mse", "hidden_fraction",
    "images"}}``; ``mse`` is None when the model has no ``conditional_mean``.
    """
    check_model_batch(x_model, "x_model")
    check_leaf_kind(leaf_kind, levels)
    if not masks:
        raise ValueError("inpainting_metrics needs at least one mask")
    lp_full = model_log_prob(model, x_model, batch_size=batch_size).cpu()
    x_unit = to_unit(x_model.cpu(), leaf_kind, levels)
    out: dict[str, dict[str, Any]] = {}
    for name, mask in masks.items():
        mask = _check_mask(mask, x_model, name).cpu()
        hidden = (~mask).sum(1)
        keep = hidden > 0
        if not keep.any():
            raise ValueError(f"mask {name!r} hides no pixel in any image")
        lp_obs = model_log_prob(model, x_model, mask, batch_size=batch_size).cpu()
        bits = conditional_bpd(lp_full, lp_obs, hidden, leaf_kind, levels)[keep]
        mean = conditional_mean(model, x_model, mask, batch_size)
        mse = None
        if mean is not None:
            err = (to_unit(mean.cpu(), leaf_kind, levels) - x_unit) ** 2
            per_image = (err * ~mask).sum(1) / hidden.clamp(min=1)
            mse = float(per_image[keep].mean())
        out[name] = {
            "cond_bpd": float(bits.mean()),
            "mse": mse,
            "hidden_fraction": float((~mask).float().mean()),
            "images": int(keep.sum()),
        }
    return out


def _has_conditional_sampling(model: object) -> bool:
    sample = getattr(model, "sample", None)
    if sample is None:
        return False
    try:
        params = inspect.signature(sample).parameters
    except (TypeError, ValueError):
        return False
    return "mask" in params and "x" in params


@torch.no_grad()
def _cell(
    model: DensityModel,
    x: Tensor,
    mask: Tensor,
    image_shape: tuple[int, int, int],
    leaf_kind: str,
    levels: int,
    generator: torch.Generator | None,
) -> np.ndarray:
    """RGB mosaic for one model and one mask: rows = images; original | observed | mean | sample."""
    device = model_device(model)
    xd, md = x.to(device), mask.to(device)
    blank = torch.full_like(x, float("nan"))
    mean = conditional_mean(model, x, mask)
    mean = blank if mean is None else torch.where(md, xd, mean).cpu()
    sample = blank
    if _has_conditional_sampling(model):
        sample = torch.where(md, xd, model.sample(x=xd, mask=md, generator=generator)).cpu()
    panels = []
    for i in range(x.shape[0]):
        hid = hidden_pixels(mask[i], image_shape)
        for j, img in enumerate((x[i], x[i], mean[i], sample[i])):
            if torch.isnan(img).all():
                panels.append(np.full((*image_shape[1:], 3), 0.6, dtype=np.float32))
                continue
            unit = to_unit(img, leaf_kind, levels).reshape(image_shape)
            panels.append(to_rgb(unit, hid if j == 1 else None))
    return tile_rgb(panels, ncols=4)


def inpainting_panels(
    model: DensityModel,
    x: Tensor,
    masks: Mapping[str, Tensor],
    image_shape: tuple[int, int, int],
    leaf_kind: str = "gaussian",
    levels: int = 256,
    generator: torch.Generator | None = None,
) -> dict[str, np.ndarray]:
    """One model's row of Fig. 3: mask name -> RGB mosaic of the images ``x [n,S]`` (model space), each
    as original | observed (hidden pixels in red) | conditional mean | conditional sample (grey when the
    model cannot produce one). ``masks``: name -> bool ``[n,S]`` (True = observed)."""
    check_model_batch(x, "x")
    if int(np.prod(image_shape)) != x.shape[1]:
        raise ValueError(f"image_shape {image_shape} does not match S = {x.shape[1]}")
    return {
        name: _cell(model, x, _check_mask(mask, x, name), image_shape, leaf_kind, levels, generator)
        for name, mask in masks.items()
    }


@styled
def plot_inpainting_panels(panels: Mapping[str, Mapping[str, np.ndarray]], out_png: str | Path) -> Path:
    """Fig. 3 from :func:`inpainting_panels` by model name: rows = models, columns = masks."""
    if not panels or not all(panels.values()):
        raise ValueError("plot_inpainting needs at least one model and one mask")
    masks = list(next(iter(panels.values())))
    height, width = next(iter(next(iter(panels.values())).values())).shape[:2]
    cell_w = 2.4  # inches per mask column; rows keep the mosaic's aspect ratio
    cell_h = cell_w * height / width
    fig = new_figure(cell_w * len(masks) + 0.6, (cell_h + 0.25) * len(panels) + 0.7)
    axes = fig.subplots(len(panels), len(masks), squeeze=False)
    for r, (mname, row) in enumerate(panels.items()):
        for c, kname in enumerate(masks):
            ax = axes[r][c]
            ax.imshow(row[kname], interpolation="nearest")
            clean_axes(ax)
            if r == 0:
                ax.set_title(f"hidden: {kname}")
            if c == 0:
                ax.set_ylabel(mname, fontsize=10)
    fig.suptitle(
        "Inpainting p(x_u | x_o) — each panel: original | observed (hidden in red) | "
        "conditional mean | conditional sample",
        fontsize=9,
    )
    return save_figure(fig, out_png)


def plot_inpainting(
    models: Mapping[str, DensityModel],
    x: Tensor,
    masks: Mapping[str, Tensor],
    image_shape: tuple[int, int, int],
    out_png: str | Path,
    leaf_kind: str = "gaussian",
    levels: int = 256,
    n_images: int = 2,
    generator: torch.Generator | None = None,
) -> Path:
    """Fig. 3: rows = models, columns = masks (:func:`inpainting_panels` of the first ``n_images`` of
    ``x [B,S]``, model space, for every model; ``masks``: name -> bool ``[B,S]``, True = observed)."""
    check_model_batch(x, "x")
    n = min(n_images, x.shape[0])
    firsts = {k: _check_mask(m, x, k)[:n] for k, m in masks.items()}
    return plot_inpainting_panels(
        {
            name: inpainting_panels(model, x[:n], firsts, image_shape, leaf_kind, levels, generator)
            for name, model in models.items()
        },
        out_png,
    )
