"""Vector quantizers: one module per family, one output tuple, one registry.

Every quantizer maps encoder outputs ``z_e [B, D, h, w]`` to a
:class:`QuantizerOutput` and exposes ``embed(codes) -> z_q``, ``nearest(z_e) ->
codes`` (no side effects) and ``codebook [K, D]``. Build one with
:func:`make_quantizer`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from torch import Tensor, nn

__all__ = ["QuantizerOutput", "QUANTIZER_NAMES", "make_quantizer"]


class QuantizerOutput(NamedTuple):
    """Result of a quantizer's forward pass."""

    z_q: Tensor  # [B, D, h, w] quantized latents; straight-through gradient to z_e
    codes: Tensor  # [B, h, w] long, codeword indices in 0..K-1
    loss: Tensor  # scalar: the quantizer's training loss (codebook + β·commitment for "vq", ALBO terms for "gmvq")
    perplexity: Tensor  # scalar: exp(entropy of the batch's code histogram), in [1, K]


QUANTIZER_NAMES: tuple[str, ...] = ("vq", "ema", "gumbel", "gmvq")


def make_quantizer(name: str, K: int, D: int, beta: float, **opts: Any) -> nn.Module:
    """Build quantizer ``name`` (one of :data:`QUANTIZER_NAMES`) with ``K`` codewords of length ``D``.

    ``opts`` go to the family's constructor (e.g. ``kmeans_init=True``,
    ``dead_code_threshold=0.5``, ``l2_normalize=True`` for ``vq``; ``decay=0.99`` for ``ema``;
    ``tau_start``, ``tau_end``, ``anneal_steps`` for ``gumbel`` and ``gmvq``; ``hard`` for
    ``gumbel``; ``alpha``, ``sigma`` for ``gmvq``).
    """
    from vq2pc.models.quantizers.ema import EMAVectorQuantizer
    from vq2pc.models.quantizers.gmvq import GMVectorQuantizer
    from vq2pc.models.quantizers.gumbel import GumbelQuantizer
    from vq2pc.models.quantizers.vq import VectorQuantizer

    families: dict[str, type[nn.Module]] = {
        "vq": VectorQuantizer,
        "ema": EMAVectorQuantizer,
        "gumbel": GumbelQuantizer,
        "gmvq": GMVectorQuantizer,
    }
    if name not in families:
        raise ValueError(f"unknown quantizer {name!r}; expected one of {list(QUANTIZER_NAMES)}")
    if K < 1 or D < 1:
        raise ValueError(f"K and D must be >= 1, got K={K}, D={D}")
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    try:
        return families[name](K, D, beta, **opts)
    except TypeError as exc:  # an unknown option or a value of the wrong type
        raise ValueError(f"bad quantizer options {opts} for {name!r}: {exc}") from None
