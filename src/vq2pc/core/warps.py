"""Warps of feature maps: linear maps ``[S, S]`` over the pixels of an ``h × w`` grid.

A warp ``T`` moves a map ``f [..., S]`` to ``f @ T``: column ``t`` of ``T`` holds the weights with which
the source pixels make target pixel ``t``. :func:`affine_warps` builds them from rotations, scalings and
shifts by bilinear interpolation (``torch.nn.functional.grid_sample`` applied to the identity), with border
replication outside the grid; an integer shift is an exact permutation of the pixels, border rows
repeated. :class:`~vq2pc.core.head_leaf.HeadCategorical` uses them to give each decoded component
translated and rotated copies (their leaves are recomputed and normalized, so every copy is a proper
component).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["Warp", "affine_warps", "shift_warps"]

Warp = tuple[float, float, float, float]
"""``(angle in degrees, scale, shift down, shift right)``, shifts in pixels, about the grid's centre."""


def affine_warps(grid: tuple[int, int], warps: Sequence[Warp], dtype: torch.dtype = torch.float32) -> Tensor:
    """``[D, S, S]`` matrices of the affine ``warps`` on the ``grid = (h, w)`` (see the module docstring)."""
    h, w = grid
    s = h * w
    if not warps:
        raise ValueError("need at least one warp")
    thetas = []
    for warp in warps:
        if len(warp) != 4 or not all(math.isfinite(v) for v in warp) or not warp[1] > 0:
            raise ValueError(f"a warp is (angle, scale > 0, dy, dx), all finite; got {tuple(warp)}")
        angle, scale, dy, dx = (float(v) for v in warp)
        c, si = math.cos(math.radians(angle)) / scale, math.sin(math.radians(angle)) / scale
        thetas.append([[c, -si, -2.0 * dx / w], [si, c, -2.0 * dy / h]])  # output → input coordinates
    theta = torch.tensor(thetas, dtype=torch.float64)  # [D, 2, 3]
    coords = F.affine_grid(theta, [len(warps), 1, h, w], align_corners=False)  # [D, h, w, 2]
    eye = torch.eye(s, dtype=torch.float64).view(1, s, h, w).expand(len(warps), s, h, w)
    out = F.grid_sample(eye, coords, mode="bilinear", padding_mode="border", align_corners=False)
    return out.reshape(len(warps), s, s).to(dtype)  # [D, source S, target S]


def shift_warps(radius: int, ball: str = "square") -> list[Warp]:
    """Every integer shift within ``radius``, the identity first: ``|dy|, |dx| ≤ radius`` (``ball="square"``,
    ``(2·radius + 1)²`` warps) or ``|dy| + |dx| ≤ radius`` (``"diamond"``: 5 at radius 1)."""
    if radius < 0 or ball not in ("square", "diamond"):
        raise ValueError(f"need radius >= 0 and ball 'square' or 'diamond', got {radius}, {ball!r}")
    steps = range(-radius, radius + 1)
    inside = (lambda dy, dx: abs(dy) + abs(dx) <= radius) if ball == "diamond" else (lambda dy, dx: True)
    shifts = [(float(dy), float(dx)) for dy in steps for dx in steps if (dy or dx) and inside(dy, dx)]
    return [(0.0, 1.0, 0.0, 0.0)] + [(0.0, 1.0, dy, dx) for dy, dx in shifts]
