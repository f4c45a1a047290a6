"""Distillation: decode each selected latent once into the leaves of a MixtureCircuit.

``p̂(x) = Σ_n w_n Π_i p(x_i | θ_n)`` with ``θ_n = decoder(z_n)`` (paper Eq. 2 with
uniform weights; ``weights="prior"`` uses p(z) renormalized over the selection,
which for the exhaustive selection is the exact model ExM).
"""

from __future__ import annotations

from typing import Any

import torch

from .circuit import MixtureCircuit
from .leaves import leaf_from_tensors
from .selection import Selection

__all__ = ["distill", "decode_leaf"]


@torch.no_grad()
def decode_leaf(vqvae: torch.nn.Module, codes: torch.Tensor, batch_size: int = 512):
    """Decode codes ``[N, h, w]`` into one leaf with batch shape ``[N, S]`` (batched, eval mode)."""
    vqvae.eval()
    device = next(vqvae.parameters()).device
    parts: dict[str, list[torch.Tensor]] = {}
    kind = ""
    for start in range(0, codes.shape[0], batch_size):
        leaf = vqvae.decode(codes[start : start + batch_size].to(device))
        kind = leaf.kind
        for name, t in leaf.tensors().items():
            parts.setdefault(name, []).append(t)
    return leaf_from_tensors(kind, {name: torch.cat(ts) for name, ts in parts.items()})


def distill(
    vqvae: torch.nn.Module,
    selection: Selection,
    weights: str = "uniform",
    batch_size: int = 512,
    meta: dict[str, Any] | None = None,
) -> MixtureCircuit:
    """Build the distilled circuit of ``selection`` (N components) from ``vqvae``'s decoder."""
    if selection.codes.shape[0] == 0:
        raise ValueError("selection is empty: nothing to distill")
    leaf = decode_leaf(vqvae, selection.codes, batch_size)
    info = {"strategy": selection.strategy, "weights": weights, **(meta or {})}
    return MixtureCircuit(leaf, selection.log_weights(weights).to(leaf.device), meta=info)
