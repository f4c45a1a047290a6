"""Distillation: decode each selected latent once into the leaves of a MixtureCircuit.

``p̂(x) = Σ_n w_n Π_i p(x_i | θ_n)`` with ``θ_n = decoder(z_n)`` (arXiv:2509.01400, Eq. 2 with
uniform weights; ``weights="prior"`` uses p(z) renormalized over the selection,
which for the exhaustive selection is the exact model ExM).
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Iterable, Sequence

import torch

from vq2pc.circuit.kernels import categorical_table, categorical_view
from vq2pc.circuit.mixture import MixtureCircuit
from vq2pc.core.head_leaf import HeadCategorical
from vq2pc.core.leaves import Categorical, Leaf, discretize, leaf_from_tensors
from vq2pc.core.protocols import Decoder, LeafDecoder, Prior
from vq2pc.core.warps import Warp, affine_warps
from vq2pc.latents.selection import Selection

__all__ = ["distill", "decode_leaf", "decode_head_leaf", "check_std_floor"]


def check_std_floor(std_floor: float | None, leaf_kind: str) -> None:
    """``ValueError`` unless ``std_floor`` is None or a positive finite number for a Gaussian decoder."""
    if std_floor is None:
        return
    if leaf_kind != "gaussian":
        raise ValueError(f"std_floor applies to Gaussian leaves only; this VQ-VAE has {leaf_kind} leaves")
    if not (isinstance(std_floor, (int, float)) and math.isfinite(std_floor) and std_floor > 0):
        raise ValueError(f"std_floor must be a positive finite number, got {std_floor!r}")


@torch.no_grad()
def decode_leaf(
    decoder: LeafDecoder, latents: torch.Tensor, batch_size: int = 512, std_floor: float | None = None
) -> Leaf:
    """Decode latents ``[N, ...]`` (codes ``[N, h, w]`` of a :class:`~vq2pc.core.protocols.Decoder`, or a
    continuous mixture's points ``[N, d]``) into one leaf with batch shape ``[N, S]`` (batched, eval mode).

    Categorical leaves are written batch by batch straight into the circuit's ``[S·L, N]`` table
    (:func:`~vq2pc.circuit.kernels.categorical_view`): at N = 4096 on MNIST the table is 3.3 GB,
    and concatenating, renormalizing and laying it out again held four copies.

    ``std_floor``: raise every Gaussian std below it to it. The decoder's own floor is 1e-3
    (paper App. C); latents whose decoded strokes are that sharp give test images that miss
    them thousands of nats — a higher floor at distillation time bounds that cost."""
    decoder.eval()
    device = next(decoder.parameters()).device
    leaves = (decoder.decode(latents[i : i + batch_size].to(device)) for i in range(0, latents.shape[0], batch_size))
    first = next(leaves)
    check_std_floor(std_floor, first.kind)
    if isinstance(first, Categorical):
        return _categorical_leaf(first, leaves, latents.shape[0])
    parts: dict[str, list[torch.Tensor]] = {}
    for leaf in itertools.chain([first], leaves):
        for name, t in leaf.tensors().items():
            parts.setdefault(name, []).append(t)
    tensors = {name: torch.cat(ts) for name, ts in parts.items()}
    if std_floor is not None:
        tensors["std"] = tensors["std"].clamp_min(std_floor)
    return leaf_from_tensors(first.kind, tensors)


@torch.no_grad()
def decode_head_leaf(
    vqvae: Any, codes: torch.Tensor, batch_size: int = 512, warps: Sequence[Warp] | None = None
) -> HeadCategorical:
    """The categorical leaves of codes ``[N, h, w]`` as a :class:`~vq2pc.core.head_leaf.HeadCategorical`: the
    decoder's features before its head convolution (``H`` per pixel) and the head itself, not the ``[N, S, L]``
    table (``H = 32`` against ``L = 256`` on MNIST). Needs a one-channel categorical VQ-VAE whose head is a
    stride-1 convolution with "same" padding. ``warps`` (:mod:`vq2pc.core.warps`; the identity is not
    implied) make ``D·N`` components: every decoded map under every warp."""
    head = vqvae.decoder.head
    k = head.kernel_size[0] if isinstance(head, torch.nn.Conv2d) else 0
    if vqvae.cfg.leaf != "categorical" or vqvae.cfg.image_shape[0] != 1:
        raise ValueError(f"head leaves need a one-channel categorical VQ-VAE, got {vqvae.cfg.leaf!r} leaves")
    if not (k % 2 == 1 and head.kernel_size == (k, k) and head.stride == (1, 1) and head.padding == (k // 2, k // 2)):
        raise ValueError(f"head leaves need a stride-1 'same' convolution as the decoder's head, got {head}")
    vqvae.eval()
    device = next(vqvae.parameters()).device
    body, features = vqvae.decoder.net[:-1], None
    for i in range(0, codes.shape[0], batch_size):  # written in place: no second copy of the features
        part = body(vqvae.quantizer.embed(codes[i : i + batch_size].to(device).long())).float()
        if features is None:
            features = part.new_empty(codes.shape[0], *part.shape[1:])
        features[i : i + part.shape[0]] = part
    if features is None:
        raise ValueError("no codes to decode")
    maps = None if warps is None else affine_warps(tuple(features.shape[2:]), warps).to(features.device)
    return HeadCategorical(features, head.weight.detach().float(), head.bias.detach().float(), warps=maps)


def _categorical_leaf(first: Categorical, rest: Iterable[Categorical], n: int) -> Categorical:
    """The normalized leaves of consecutive batches of components (``first`` then ``rest``), laid out in one
    ``[S·L, n]`` table."""
    part = categorical_table(first.logits)  # [S·L, b], already normalized by Categorical
    table, n0 = part.new_empty(part.shape[0], n), 0
    for leaf in itertools.chain([first], rest):
        part = categorical_table(leaf.logits)
        table[:, n0 : n0 + part.shape[1]] = part
        n0 += part.shape[1]
    return categorical_view(table, first.num_levels)


def distill(
    vqvae: Decoder,
    selection: Selection,
    weights: str = "uniform",
    batch_size: int = 512,
    meta: dict[str, Any] | None = None,
    std_floor: float | None = None,
    discretized: int | None = None,
    classes: bool = False,
    prior: Prior | None = None,
) -> MixtureCircuit | Any:
    """Build the distilled circuit of ``selection`` (N components) from a :class:`~vq2pc.core.protocols.Decoder`
    such as a VQ-VAE (``std_floor``: see :func:`decode_leaf`). ``discretized = L``: a Gaussian decoder's
    leaves become their exact ``L``-level twins (``DiscretizedGaussian``; the circuit then reads integer
    levels and scores discrete BPD), with no retraining.

    ``classes=True``: a class-aware :class:`~vq2pc.circuit.classes.ClassMixture` with class weights
    :func:`~vq2pc.circuit.class_weights.class_weights` of the same ``weights`` rule (``prior``: ∝ p(c) p(z_n|c);
    ``uniform``: uniform per drawn class), from ``prior`` or the selection's ``class_log_joint``."""
    if selection.codes.shape[0] == 0:
        raise ValueError("selection is empty: nothing to distill")
    leaf = decode_leaf(vqvae, selection.codes, batch_size, std_floor)
    if discretized is not None:
        leaf = discretize(leaf, discretized)
    info = {"strategy": selection.strategy, "weights": weights, **(meta or {})}
    if selection.info.get("shortfall_reason"):  # fewer components than asked for, and why
        info["shortfall_reason"] = selection.info["shortfall_reason"]
    if std_floor is not None:
        info["std_floor"] = float(std_floor)
    circuit = MixtureCircuit(leaf, selection.log_weights(weights).to(leaf.device), meta=info)
    if not classes:
        return circuit
    from vq2pc.circuit.class_weights import class_weights  # the class-aware modules build on this one
    from vq2pc.circuit.classes import ClassMixture

    return ClassMixture(circuit, class_weights(prior, selection, weights).to(leaf.device))
