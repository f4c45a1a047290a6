"""Checks of user input — images, batches, values, masks: one definition and one message per fact.

Every stage that takes data from a user calls these, so the same mistake gives the same
``ValueError`` wherever it is made (never a deep torch traceback):

* :func:`rows` — a batch ``[B, S]`` or ``[B, C, H, W]`` with ``C·H·W = S`` -> ``[B, S]``;
* :func:`check_images` — a non-empty ``[n, C, H, W]`` tensor;
* :func:`check_finite`, :func:`check_levels` (integer levels ``0..L-1``), :func:`check_binary`
  (``0``/``1``) — the values each leaf kind accepts (:meth:`vq2pc.core.leaves.Leaf.validate_data`);
* :func:`observed_mask` — a mask (``True`` = observed, see :mod:`vq2pc.data.masks`) as bool
  ``[B, S]``: given per row (``[B, S]``, ``[B, C, H, W]``) or once for all rows (``S`` entries).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "check_finite",
    "check_levels",
    "check_binary",
    "check_images",
    "rows",
    "observed_mask",
]


def check_finite(name: str, t: Tensor) -> None:
    """``ValueError`` if ``t`` holds NaN or ±inf."""
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contains NaN or inf")


def check_levels(x: Tensor, levels: int, name: str = "x") -> None:
    """``ValueError`` unless every entry of ``x`` is an integer level in ``[0, levels - 1]``."""
    check_finite(name, x)
    if not x.numel():
        return
    lo, hi = float(x.min()), float(x.max())  # compared as Python numbers: no integer-dtype overflow
    if lo < 0 or hi > levels - 1 or (x.is_floating_point() and (x != torch.round(x)).any()):
        raise ValueError(f"{name} must hold integer levels in [0, {levels - 1}] (got values in [{lo:g}, {hi:g}])")


def check_binary(x: Tensor, name: str = "x") -> None:
    """``ValueError`` unless every entry of ``x`` is 0 or 1."""
    check_finite(name, x)
    if ((x != 0) & (x != 1)).any():
        raise ValueError(f"{name} must hold binary values 0 or 1")


def check_images(v: Any, name: str = "images") -> None:
    """``ValueError`` unless ``v`` is a non-empty ``[n, C, H, W]`` tensor."""
    if not isinstance(v, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(v).__name__}")
    if v.dim() != 4 or v.shape[0] == 0:
        raise ValueError(f"{name} must have shape [n,C,H,W] with n >= 1; got {tuple(v.shape)}")


def _shape_error(name: str, t: Tensor, s: int, extra: str = "") -> ValueError:
    return ValueError(f"{name} has shape {tuple(t.shape)}; expected [B, {s}] or [B, C, H, W] with C·H·W = {s}{extra}")


def rows(x: Any, s: int, name: str = "x") -> Tensor:
    """A non-empty batch with ``S = s`` entries per row -> ``[B, S]`` (a view where possible)."""
    if not isinstance(x, Tensor):
        x = torch.as_tensor(x)
    if x.dim() == 0 or x.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch (shape {tuple(x.shape)})")
    if x.dim() < 2 or math.prod(x.shape[1:]) != s:
        raise _shape_error(name, x, s)
    return x.reshape(x.shape[0], s)


def observed_mask(mask: Any, batch: int, s: int, name: str = "mask") -> Tensor:
    """A mask (bool, or 0/1 integers; True = observed) -> bool ``[batch, S]``.

    Per row: ``[B, S]`` or ``[B, C, H, W]``; for every row at once: any shape with ``S`` entries
    (``[S]``, ``[1, S]``, ``[C, H, W]``), returned expanded (not copied).
    """
    if not isinstance(mask, Tensor):
        mask = torch.as_tensor(mask)
    if mask.dtype != torch.bool:
        if mask.is_floating_point() or ((mask != 0) & (mask != 1)).any():
            raise ValueError(f"{name} must be boolean (True = observed); got dtype {mask.dtype}")
        mask = mask.bool()
    if mask.numel() == s:
        return mask.reshape(1, s).expand(batch, s)
    if mask.dim() < 2 or mask.shape[0] != batch or math.prod(mask.shape[1:]) != s:
        raise _shape_error(name, mask, s, f" and B = {batch}, or one mask of {s} entries for every row")
    return mask.reshape(batch, s)
