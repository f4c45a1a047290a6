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

from vq2pc.core import validate

__all__ = ["patch_kmeans_codes"]


def _patches(images: Tensor, owner: Tensor, levels: int) -> Tensor:
    """``[M, n, P]`` float patch vectors (``P`` = the largest patch; shorter patches padded with 0)."""
    v = images.reshape(images.shape[0], -1).cpu()
    validate.check_levels(v, levels, "images")
    m, s = int(owner.max()) + 1, owner.numel()
    sizes = torch.bincount(owner, minlength=m)
    perm = torch.argsort(owner, stable=True)
    slot = torch.arange(s) - (torch.cumsum(sizes, 0) - sizes)[owner[perm]]  # rank of each variable in its patch
    index = torch.full((m, int(sizes.max())), s, dtype=torch.long)  # s: the padding column
    index[owner[perm], slot] = perm
    padded = torch.cat([v.float() / (levels - 1), torch.zeros(v.shape[0], 1)], 1)
    return padded[:, index].permute(1, 0, 2).contiguous()


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
) -> tuple[Tensor, Tensor]:
    """Codes ``[n, M]`` (long) of raw images ``[n, S]`` / ``[n, C, H, W]`` (levels) and the centroids
    ``[M, K, P]``: ``iterations`` Lloyd steps per position from ``K`` distinct random images' patches; a
    centroid that loses every point is moved to a random patch of its position."""
    if not (isinstance(K, int) and 1 <= K <= images.shape[0]):
        raise ValueError(f"K must be an integer in [1, {images.shape[0]}] (the number of images), got {K!r}")
    x = _patches(images, owner.cpu(), levels)  # [M, n, P]
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
