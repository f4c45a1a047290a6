"""What every experiment shares: the model protocols, input checks, pixel-unit conversions.

Evaluation code is written against small structural protocols, not concrete
classes: a distilled :class:`~vq2pc.circuit.MixtureCircuit`, the continuous-mixture
baseline and the EiNet baseline all count as a :class:`DensityModel` as long as
they expose ``log_prob(x, mask=None)``, ``sample(n, generator=...)`` and
``num_params``.
"""

from __future__ import annotations

import math
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from vq2pc.core.leaves import check_leaf_kind as _check_kind
from vq2pc.core.validate import check_finite, check_images

__all__ = [
    "DensityModel",
    "InpaintingModel",
    "ComponentModel",
    "model_device",
    "check_model_batch",
    "check_images",
    "check_leaf_kind",
    "log2_levels",
    "to_unit",
    "images_to_unit",
]


@runtime_checkable
class DensityModel(Protocol):
    """A tractable density over ``S`` variables in model space."""

    def log_prob(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """``x [B,S]``, ``mask`` bool ``[B,S]`` (True = observed) -> log p(x_o) ``[B]`` in nats."""
        ...

    def sample(self, n: int, *, generator: torch.Generator | None = None) -> Tensor:
        """``n`` unconditional samples ``[n,S]`` in model space."""
        ...

    @property
    def num_params(self) -> int: ...


@runtime_checkable
class InpaintingModel(DensityModel, Protocol):
    """A density that also answers conditional expectations ``E[x_u | x_o]``."""

    def conditional_mean(self, x: Tensor, mask: Tensor) -> Tensor:
        """``x [B,S]``, ``mask [B,S]`` -> ``[B,S]`` (observed entries equal ``x``)."""
        ...


@runtime_checkable
class ComponentModel(Protocol):
    """A finite mixture exposing its components (a ``MixtureCircuit``)."""

    log_weights: Tensor  # [N] normalized log mixture weights

    def log_likelihoods(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """``x [B,S]`` -> per-component ``log p(x | n)`` ``[B,N]``."""
        ...


def model_device(model: object) -> torch.device:
    """The device a model's parameters live on (``device`` attr, its leaf, or its nn parameters)."""
    dev = getattr(model, "device", None)
    if isinstance(dev, (torch.device, str)):
        return torch.device(dev)
    leaf = getattr(model, "leaf", None)
    if leaf is not None and hasattr(leaf, "device"):
        return torch.device(leaf.device)
    params = getattr(model, "parameters", None)
    if callable(params):
        first = next(iter(params()), None)
        if first is not None:
            return first.device
    return torch.device("cpu")


def check_model_batch(x: Tensor, name: str = "x") -> None:
    """Raise ``ValueError`` unless ``x`` is a finite float ``[B,S]`` tensor with ``B >= 1``."""
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} must have shape [B,S] with B, S >= 1; got {tuple(x.shape)}")
    check_finite(name, x)


def check_leaf_kind(leaf_kind: str, levels: int) -> None:
    """Raise ``ValueError`` for an unknown leaf kind or fewer than two pixel levels."""
    _check_kind(leaf_kind)
    if int(levels) < 2:
        raise ValueError(f"levels must be >= 2, got {levels}")


def to_unit(x: Tensor, leaf_kind: str, levels: int) -> Tensor:
    """Model-space values ``[...]`` -> pixel intensities in ``[0, 1]`` (float32, or float64 if given).

    gaussian: clamp to ``[0, 1]``; categorical: ``level / (L-1)``; bernoulli: as is.
    """
    check_leaf_kind(leaf_kind, levels)
    x = x.double() if x.dtype == torch.float64 else x.float()
    if leaf_kind == "categorical":
        x = x / (int(levels) - 1)
    return x.clamp(0.0, 1.0)


def images_to_unit(images: Tensor, levels: int | None = None) -> Tensor:
    """Images as stored (``uint8`` levels) or already in ``[0,1]`` -> float32 ``[0,1]``.

    Integer tensors need ``levels`` (``v / (L-1)``); float tensors are clamped.
    """
    if images.dtype.is_floating_point:
        check_finite("images", images)
        return images.float().clamp(0.0, 1.0)
    if levels is None or int(levels) < 2:
        raise ValueError("integer images need levels >= 2 to convert to [0,1]")
    return images.float() / (int(levels) - 1)


def log2_levels(leaf_kind: str, levels: int) -> float:
    """The ``log2 L`` offset that continuous BPD carries per variable (0 for discrete leaves)."""
    return math.log2(levels) if leaf_kind == "gaussian" else 0.0
