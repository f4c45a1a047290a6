"""A latent source for tree circuits without a VQ-VAE of the right grid: k-means per patch position.

Every latent position ``j`` gets its own codebook of ``K`` centroids over its patch's pixel vectors
(levels scaled to ``[0, 1]``), fitted by Lloyd's algorithm on all positions at once (patches padded to the
largest size with a constant 0, which adds the same distance to every centroid); the codes are the
nearest centroids. These ``codes [n, M]`` feed :func:`vq2pc.circuit.tree_fit.distill_tree` like a VQ-VAE's
(latent variable distillation with clustering as the latent source, as Liu et al. cluster embeddings).
"""

from __future__ import annotations

import torch
from torch import Tensor

from vq2pc.circuit.tree_structure import patch_owner
from vq2pc.core import validate

__all__ = ["patch_kmeans_codes", "kmeans_pairs"]


def _members(owner: Tensor, image_shape: tuple[int, int, int], context: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(position [P], variable [P], in_patch [P])`` pairs, sorted by position: every variable within
    ``context`` pixels (Chebyshev) of a position's patch bounding box, all channels, and whether it is in
    the patch itself."""
    var = torch.arange(owner.numel())
    if context == 0:
        order = torch.argsort(owner, stable=True)
        return owner[order], var[order], torch.ones(owner.numel(), dtype=torch.bool)
    _, H, W = image_shape
    y, x = (var % (H * W)) // W, var % W
    m = int(owner.max()) + 1
    lo_y = torch.full((m,), H).scatter_reduce(0, owner, y, "amin")
    hi_y = torch.full((m,), -1).scatter_reduce(0, owner, y, "amax")
    lo_x = torch.full((m,), W).scatter_reduce(0, owner, x, "amin")
    hi_x = torch.full((m,), -1).scatter_reduce(0, owner, x, "amax")
    near = (y >= (lo_y - context)[:, None]) & (y <= (hi_y + context)[:, None])
    near &= (x >= (lo_x - context)[:, None]) & (x <= (hi_x + context)[:, None])  # [M, S]
    pos, v = near.nonzero(as_tuple=True)
    return pos, v, owner[v] == pos


def _patches(images: Tensor, owner: Tensor, levels: int, context: int = 0, context_weight: float = 1.0) -> Tensor:
    """``[M, n, P]`` float window vectors (levels scaled to ``[0, 1]``; ``P`` = the largest window, shorter
    ones padded with 0): each position's patch, widened by ``context`` pixels whose values are scaled by
    ``context_weight``."""
    v = images.reshape(images.shape[0], -1).cpu()
    validate.check_levels(v, levels, "images")
    if context and images.dim() != 4:
        raise ValueError(f"context windows need images shaped [n, C, H, W], got {tuple(images.shape)}")
    pos, var, inside = _members(owner, tuple(images.shape[1:]), context)
    m, s = int(owner.max()) + 1, owner.numel()
    sizes = torch.bincount(pos, minlength=m)
    slot = torch.arange(pos.numel()) - (torch.cumsum(sizes, 0) - sizes)[pos]  # rank of each pair in its window
    index = torch.full((m, int(sizes.max())), s, dtype=torch.long)  # s: the padding column
    index[pos, slot] = var
    scale = torch.zeros(m, int(sizes.max()))
    scale[pos, slot] = torch.where(inside, 1.0, float(context_weight))
    padded = torch.cat([v.float() / (levels - 1), torch.zeros(v.shape[0], 1)], 1)
    return (padded[:, index] * scale).permute(1, 0, 2).contiguous()


def _assign(x: Tensor, centroids: Tensor, chunk: int) -> Tensor:
    """Nearest centroid ``[M, n]`` of every patch vector ``x [M, n, P]`` (``centroids [M, K, P]``)."""
    c2 = (centroids**2).sum(-1)[:, None, :]  # [M, 1, K]
    parts = [
        (c2 - 2 * torch.bmm(x[:, i : i + chunk], centroids.transpose(1, 2))).argmin(-1)
        for i in range(0, x.shape[1], chunk)
    ]
    return torch.cat(parts, 1)


def patch_kmeans_codes(
    images: Tensor,
    owner: Tensor,
    K: int,
    levels: int,
    iterations: int = 10,
    generator: torch.Generator | None = None,
    chunk: int = 4096,
    context: int = 0,
    context_weight: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Codes ``[n, M]`` (long) of raw images ``[n, S]`` / ``[n, C, H, W]`` (levels) and the centroids
    ``[M, K, P]``: ``iterations`` Lloyd steps per position from ``K`` distinct random images' patches; a
    centroid that loses every point is moved to a random patch of its position. With ``context > 0`` each
    position clusters its patch together with the pixels up to ``context`` away (weighted by
    ``context_weight``), so a code also describes the patch's surroundings."""
    if not (isinstance(K, int) and 1 <= K <= images.shape[0]):
        raise ValueError(f"K must be an integer in [1, {images.shape[0]}] (the number of images), got {K!r}")
    x = _patches(images, owner.cpu(), levels, context, context_weight)  # [M, n, P]
    m, n, p = x.shape
    centroids = x[:, torch.randperm(n, generator=generator)[:K]].clone()
    for _ in range(iterations):
        codes = _assign(x, centroids, chunk)
        flat = (torch.arange(m)[:, None] * K + codes).reshape(-1)
        sums = torch.zeros(m * K, p).index_add_(0, flat, x.reshape(m * n, p))
        counts = torch.bincount(flat, minlength=m * K).float()[:, None]
        fresh = x[:, torch.randint(0, n, (K,), generator=generator)].reshape(m * K, p)
        centroids = torch.where(counts > 0, sums / counts.clamp_min(1), fresh).view(m, K, p)
    return _assign(x, centroids, chunk).T.contiguous(), centroids


def kmeans_pairs(
    images: Tensor,
    latent_hw: tuple[int, int],
    K: int,
    levels: int,
    generator: torch.Generator | None = None,
    iterations: int = 10,
    context: int = 0,
    context_weight: float = 1.0,
    shift: int | tuple[int, int] = 0,
) -> tuple[Tensor, Tensor]:
    """The complete data of the k-means source: ``(codes [n, h·w], levels [n, S])`` of raw images
    ``[n, C, H, W]`` on a ``latent_hw`` grid of patches, shifted by ``shift`` pixels
    (:func:`~vq2pc.circuit.tree_structure.patch_owner`, :func:`patch_kmeans_codes`)."""
    owner = patch_owner(tuple(images.shape[1:]), latent_hw, shift)
    codes, _ = patch_kmeans_codes(
        images, owner, K, levels, iterations, generator, context=context, context_weight=context_weight
    )
    return codes, images.reshape(images.shape[0], -1).long()
