"""The typed seams between stages: what selection, distillation and ExM need from a VQ model.

Any object with these members works — vq2pc's :class:`~vq2pc.models.vqvae.VQVAE` and priors,
or a model trained elsewhere (``isinstance(obj, Decoder)`` / ``isinstance(obj, Prior)`` check
that the members exist; the shapes are the contract):

* :class:`Decoder` — codes ``[B, h, w]`` (long, values in ``[0, K)``) to a
  :class:`~vq2pc.core.leaves.Leaf` with batch shape ``[B, S]``: ``p(x | z)``.
* :class:`Prior` — ``p(z) = Σ_c p(c) p(z | c)`` over the ``H×W`` grid, autoregressive in
  row-major order (position ``i = r·W + col``, ``P = H·W`` positions): ``log p(c)``,
  ``log p(z | c)`` for every class, next-position log-probabilities for every class of a batch of
  partial grids, ancestral samples, and incremental decoding (:meth:`Prior.start`,
  :meth:`Prior.step`, :meth:`Prior.reorder`) so that a search extends every beam by one position
  without recomputing its prefix.

Imports only torch and :mod:`vq2pc.core.leaves`.
"""

from __future__ import annotations

import math
from typing import Any, Iterator, Protocol, runtime_checkable

import torch
from torch import Tensor

from vq2pc.core.leaves import Leaf

__all__ = [
    "LeafDecoder",
    "Decoder",
    "Prior",
    "DecodingState",
    "check_codes",
    "num_positions",
    "prior_device",
    "missing_members",
]

DecodingState = Any
"""Opaque state of an incremental decoding (a prior's own type): a batch of ``B`` partial grids,
each scored under ``M`` classes. :meth:`Prior.step` and :meth:`Prior.reorder` consume it."""


@runtime_checkable
class LeafDecoder(Protocol):
    """Any model that decodes a batch of latents ``[B, ...]`` into a leaf with batch shape ``[B, S]``
    (a :class:`Decoder`, or a continuous mixture's network over points ``[B, d]``)."""

    def decode(self, latents: Tensor) -> Leaf: ...

    def parameters(self, recurse: bool = True) -> Iterator[torch.nn.Parameter]: ...

    def eval(self) -> Any: ...


@runtime_checkable
class Decoder(Protocol):
    """``p(x | z)``: a codebook of ``K`` codes on a ``latent_hw`` grid and a decoder to leaves."""

    @property
    def K(self) -> int: ...

    @property
    def latent_hw(self) -> tuple[int, int]: ...

    def decode(self, codes: Tensor) -> Leaf:
        """Codes ``[B, h, w]`` (long) -> leaf with batch shape ``[B, S]``."""
        ...

    def parameters(self, recurse: bool = True) -> Iterator[torch.nn.Parameter]: ...

    def eval(self) -> Any: ...

    def to(self, *args: Any, **kwargs: Any) -> Any: ...


@runtime_checkable
class Prior(Protocol):
    """``p(z | c)`` over ``K`` codes on a ``latent_hw`` grid, ``num_classes`` classes, row-major order.

    The incremental API, for a batch of ``B`` sequences each scored under ``M`` classes
    (``M = C`` for the searches, ``M = 1`` for sampling)::

        state, logp = prior.start(classes, prefix)   # classes [B, M], prefix [B, t] -> logp [B, M, K] at t
        state = prior.reorder(state, index)          # index [B'] into the B sequences (keep / duplicate)
        state, logp = prior.step(state, tokens)      # tokens [B] at t -> logp at t + 1 (None when t + 1 = P)
    """

    class_log_prior: Tensor
    """``[C]`` log p(c) (a buffer: it moves with :meth:`to`; its device is the prior's)."""

    training: bool

    @property
    def K(self) -> int: ...

    @property
    def latent_hw(self) -> tuple[int, int]: ...

    @property
    def num_classes(self) -> int: ...

    def log_prob_all_classes(self, z: Tensor, batch_size: int = 8192) -> Tensor:
        """Codes ``[B, h, w]`` -> ``[B, C]`` log p(z | c) for every class."""
        ...

    def next_log_probs_all_classes(self, z: Tensor, i: int) -> Tensor:
        """Partial grids ``[B, h, w]`` (positions ``≥ i`` ignored) -> ``[B, C, K]`` log p(z_i = k | z_<i, c)."""
        ...

    def sample(self, c: Tensor, generator: torch.Generator | None = None, batch_size: int = 8192) -> Tensor:
        """Ancestral samples: classes ``[n]`` -> codes ``[n, h, w]``."""
        ...

    def start(
        self, classes: Tensor, prefix: Tensor | None = None, batch_size: int = 8192
    ) -> tuple[DecodingState, Tensor]:
        """Begin decoding ``B`` sequences: ``classes [B, M]``, ``prefix [B, t]`` (codes of positions ``< t``,
        ``t < P``; None = empty). Returns the state and ``[B, M, K]`` log p(z_t = k | prefix, c).
        ``batch_size``: most rows (sequence × class) per forward pass."""
        ...

    def step(self, state: DecodingState, tokens: Tensor) -> tuple[DecodingState, Tensor | None]:
        """Append ``tokens [B]`` at the state's position ``t``; returns the new state and ``[B, M, K]``
        log-probabilities of position ``t + 1`` (None when the grid is full)."""
        ...

    def reorder(self, state: DecodingState, index: Tensor) -> DecodingState:
        """The sequences ``index [B']`` (long, into ``0..B-1``; repeats duplicate) of ``state``."""
        ...

    def to(self, *args: Any, **kwargs: Any) -> Any: ...

    def eval(self) -> Any: ...

    def train(self, mode: bool = True) -> Any: ...


def missing_members(obj: object, protocol: type) -> list[str]:
    """Members of ``protocol`` that ``obj`` lacks (for an error message naming them)."""
    names = [n for n in dir(protocol) if not n.startswith("_")] + list(getattr(protocol, "__annotations__", {}))
    return sorted({n for n in names if not hasattr(obj, n)})


def num_positions(model: Decoder | Prior) -> int:
    """``P = H·W``, the number of latent positions."""
    return math.prod(model.latent_hw)


def prior_device(prior: Prior) -> torch.device:
    """The device a prior computes on (that of its ``class_log_prior`` buffer)."""
    return prior.class_log_prior.device


def check_codes(z: Tensor, K: int, latent_hw: tuple[int, int], name: str = "z") -> Tensor:
    """Validate a ``[B, h, w]`` integer code grid with values in ``[0, K)``; return it as long."""
    if not isinstance(z, Tensor) or z.dim() != 3 or tuple(z.shape[1:]) != tuple(latent_hw):
        shape = tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__
        raise ValueError(f"{name} must have shape [B, {latent_hw[0]}, {latent_hw[1]}], got {shape}")
    if z.dtype.is_floating_point or z.dtype == torch.bool or z.is_complex():
        raise ValueError(f"{name} must be an integer tensor, got {z.dtype}")
    if z.numel() and (int(z.min()) < 0 or int(z.max()) >= K):
        raise ValueError(f"{name} has codes outside [0, K={K}): min {int(z.min())}, max {int(z.max())}")
    return z.long()
