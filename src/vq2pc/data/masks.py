"""Observation masks for inpainting and marginal queries.

A mask is a bool tensor ``[B, S]`` with ``S = C·H·W`` (row-major over ``C, H, W``),
**True = observed**. The mask *kind* names the region that is HIDDEN:

* ``left`` / ``right``: the left / right ``⌊W/2⌋`` columns are hidden;
* ``top`` / ``bottom``: the top / bottom ``⌊H/2⌋`` rows are hidden;
* ``center``: a centered ``⌈H/2⌉ × ⌈W/2⌉`` square is hidden;
* ``random``: each pixel (all channels together) is hidden with probability 1/2,
  independently per image (uses ``generator``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from vq2pc.core.random import uniform

__all__ = ["MASK_KINDS", "make_mask"]

MASK_KINDS = ("left", "right", "top", "bottom", "center", "random")


def _hidden_region(kind: str, h: int, w: int) -> Tensor:
    """``[H, W]`` bool, True where hidden (deterministic kinds)."""
    rows = torch.arange(h)[:, None].expand(h, w)
    cols = torch.arange(w)[None, :].expand(h, w)
    if kind == "left":
        return cols < w // 2
    if kind == "right":
        return cols >= w - w // 2
    if kind == "top":
        return rows < h // 2
    if kind == "bottom":
        return rows >= h - h // 2
    hh, hw = (h + 1) // 2, (w + 1) // 2
    r0, c0 = (h - hh) // 2, (w - hw) // 2
    return (rows >= r0) & (rows < r0 + hh) & (cols >= c0) & (cols < c0 + hw)


def make_mask(
    kind: str,
    image_shape: tuple[int, int, int],
    batch: int,
    generator: torch.Generator | None = None,
    device: str | torch.device | None = None,
) -> Tensor:
    """``[batch, C·H·W]`` bool mask, True = observed (see module docstring for the kinds)."""
    if kind not in MASK_KINDS:
        raise ValueError(f"unknown mask kind {kind!r}; expected one of {list(MASK_KINDS)}")
    if len(image_shape) != 3 or min(image_shape) < 1:
        raise ValueError(f"image_shape must be (C, H, W) with positive sizes, got {tuple(image_shape)}")
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    c, h, w = (int(v) for v in image_shape)
    if kind == "random":
        hidden = uniform((batch, 1, h, w), generator, generator.device if generator is not None else "cpu") < 0.5
    else:
        hidden = _hidden_region(kind, h, w)[None, None]
    observed = (~hidden).expand(batch, c, h, w).reshape(batch, c * h * w)
    return observed.to(device) if device is not None else observed.clone()
