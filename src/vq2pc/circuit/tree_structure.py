"""The structure of a tree circuit over a VQ-VAE's code grid (:mod:`vq2pc.circuit.tree`).

``M = h·w`` latent positions. :func:`patch_owner` assigns every observed variable (pixel × channel) to the
position whose patch holds it (a partition of the ``S`` variables by image position);
:func:`mutual_information` and :func:`chow_liu` build the Chow-Liu tree over the positions (a maximum
spanning tree on the pairwise mutual information of the codes, rooted at its centre so that the tree has
the fewest levels); :class:`LatentTree` holds a rooted tree as the per-level node and edge indices the
message passing uses.
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["LatentTree", "grid_shift", "patch_owner", "mutual_information", "chow_liu"]


@dataclass(frozen=True)
class LatentTree:
    """A rooted tree over ``M`` nodes, laid out for level-by-level message passing.

    ``parent [M]`` (long, ``-1`` at the root). Edges are numbered by their child in level order, so the
    edges into level ``d`` are the contiguous slice ``edge_slices[d]`` and ``children[e]`` is edge ``e``'s
    child. ``levels[d]`` holds the nodes at depth ``d`` (``levels[0] = [root]``), ``level_parents[d]``
    their parents (``d ≥ 1``) and ``parent_slots[d]`` those parents' positions within ``levels[d − 1]``.
    ``order [M]`` lists the nodes level by level (``levels`` concatenated) and ``inverse [M]`` is each
    node's position in ``order``.
    """

    parent: Tensor
    root: int
    levels: tuple[Tensor, ...]
    level_parents: tuple[Tensor, ...]
    edge_slices: tuple[tuple[int, int], ...]
    children: Tensor
    order: Tensor
    inverse: Tensor
    parent_slots: tuple[Tensor, ...]

    @property
    def level_sizes(self) -> list[int]:
        return [int(lv.numel()) for lv in self.levels]

    @property
    def num_nodes(self) -> int:
        return int(self.parent.numel())

    @classmethod
    def from_parent(cls, parent: Tensor) -> LatentTree:
        """Validate ``parent [M]`` (one root ``-1``, every node reaching it) and lay out the levels."""
        parent = torch.as_tensor(parent, dtype=torch.long).reshape(-1).cpu()
        m = parent.numel()
        roots = (parent == -1).nonzero().flatten().tolist()
        if len(roots) != 1 or ((parent < -1) | (parent >= m)).any():
            raise ValueError(f"parent must hold one root (-1) and indices in [0, {m - 1}]; got {parent.tolist()}")
        kids: list[list[int]] = [[] for _ in range(m)]
        for child, p in enumerate(parent.tolist()):
            if p >= 0:
                kids[p].append(child)
        levels, frontier = [], [roots[0]]
        while frontier:
            levels.append(frontier)
            frontier = [c for node in frontier for c in kids[node]]
        if sum(len(lv) for lv in levels) != m:
            raise ValueError(f"parent is not a tree: some nodes do not reach the root ({parent.tolist()})")
        bounds = [0, *torch.tensor([len(lv) for lv in levels[1:]]).cumsum(0).tolist()]
        order = torch.tensor([node for lv in levels for node in lv], dtype=torch.long)
        inverse = torch.empty_like(order).scatter_(0, order, torch.arange(m))
        starts = [0, *itertools.accumulate(len(lv) for lv in levels)]
        level_parents = tuple(parent[torch.tensor(lv)] for lv in levels)
        return cls(
            parent=parent,
            root=roots[0],
            levels=tuple(torch.tensor(lv) for lv in levels),
            level_parents=level_parents,
            edge_slices=((0, 0), *itertools.pairwise(bounds)),
            children=torch.tensor([c for lv in levels[1:] for c in lv], dtype=torch.long),
            order=order,
            inverse=inverse,
            parent_slots=(torch.zeros(0, dtype=torch.long),)
            + tuple(inverse[level_parents[d]] - starts[d - 1] for d in range(1, len(levels))),
        )

    def to(self, device: torch.device | str) -> LatentTree:
        return LatentTree(
            self.parent.to(device),
            self.root,
            tuple(t.to(device) for t in self.levels),
            tuple(t.to(device) for t in self.level_parents),
            self.edge_slices,
            self.children.to(device),
            self.order.to(device),
            self.inverse.to(device),
            tuple(t.to(device) for t in self.parent_slots),
        )


def grid_shift(shift: int | Sequence[int]) -> tuple[int, int]:
    """A grid shift as ``(rows, columns)`` pixels: one value shifts both; each must be ``>= 0``."""
    values = [int(shift)] if isinstance(shift, int) else [int(v) for v in shift]
    if not 1 <= len(values) <= 2 or min(values) < 0:
        raise ValueError(f"a grid shift is one or two values >= 0, got {shift}")
    return values[0], values[-1]


def patch_owner(
    image_shape: tuple[int, int, int], latent_hw: tuple[int, int], shift: int | Sequence[int] = 0
) -> Tensor:
    """``[S]`` (long): the latent position ``r·w + c`` of every variable of a ``[C, H, W]`` image (C, H, W
    order), pixel ``(y, x)`` in position ``(⌊(y+a)·h/(H+a)⌋, ⌊(x+b)·w/(W+b)⌋)``: ``h×w`` patches of (nearly)
    equal size (7×7 pixels for a 28×28 image on a 4×4 grid) laid over the image padded by ``shift = (a, b)``
    pixels at the top and the left (one int: both). On 28×28 pixels a 15×15 grid with shift 1 has 2×2
    patches whose borders fall between those of the unshifted 14×14 grid, and 1-pixel rows and columns at
    the edges. Every channel of a pixel has the pixel's position."""
    C, H, W = (int(v) for v in image_shape)
    h, w = (int(v) for v in latent_hw)
    a, b = grid_shift(shift)
    if not (1 <= h <= H and 1 <= w <= W) or C < 1:
        raise ValueError(f"latent grid {h}x{w} does not fit images of shape {image_shape} (need 1 <= h <= H, w <= W)")
    rows = (torch.arange(H) + a) * h // (H + a)
    cols = (torch.arange(W) + b) * w // (W + b)
    if rows.unique().numel() != h or cols.unique().numel() != w:
        raise ValueError(f"shift {shift} leaves patches of the {h}x{w} grid empty on {H}x{W} images")
    return (rows[:, None] * w + cols[None, :]).reshape(1, H * W).expand(C, H * W).reshape(-1).clone()


def mutual_information(codes: Tensor, K: int, pairs_per_chunk: int | None = None) -> Tensor:
    """Plug-in mutual information (nats) of every pair of positions: ``codes [n, M]`` in ``0..K-1`` ->
    ``[M, M]`` (symmetric, 0 on the diagonal). Pair counts are formed ``pairs_per_chunk`` pairs at a time
    (default: at most ~2²⁴ counts and ~2²² pair indices in memory)."""
    n, m = codes.shape
    codes = codes.long()
    i, j = torch.triu_indices(m, m, offset=1)
    chunk = pairs_per_chunk or max(1, min((1 << 24) // (K * K), (1 << 22) // max(n, 1)))
    marg = torch.stack([torch.bincount(codes[:, a], minlength=K) for a in range(m)]).double() / n  # [M, K]
    mi = torch.zeros(m, m, dtype=torch.float64)
    for lo in range(0, i.numel(), chunk):
        a, b = i[lo : lo + chunk], j[lo : lo + chunk]
        idx = torch.arange(a.numel())[None, :] * K * K + codes[:, a] * K + codes[:, b]  # [n, P]
        joint = torch.bincount(idx.reshape(-1), minlength=a.numel() * K * K).view(-1, K, K).double() / n
        ratio = joint / (marg[a][:, :, None] * marg[b][:, None, :]).clamp_min(1e-300)
        terms = torch.where(joint > 0, joint * ratio.clamp_min(1e-300).log(), torch.zeros_like(joint))
        mi[a, b] = terms.sum((1, 2))
    return mi + mi.T


def _spanning_tree(weight: Tensor) -> list[list[int]]:
    """Prim's maximum spanning tree of a dense symmetric ``[M, M]`` weight: adjacency lists."""
    m = weight.shape[0]
    best, link = weight[0].clone(), torch.zeros(m, dtype=torch.long)
    inside = torch.zeros(m, dtype=torch.bool)
    inside[0] = True
    adj: list[list[int]] = [[] for _ in range(m)]
    for _ in range(m - 1):
        node = int(torch.where(inside, -math.inf, best).argmax())
        adj[node].append(int(link[node]))
        adj[int(link[node])].append(node)
        inside[node] = True
        better = ~inside & (weight[node] > best)
        best, link = torch.where(better, weight[node], best), torch.where(better, node, link)
    return adj


def _bfs_parents(adj: list[list[int]], root: int) -> tuple[list[int], int]:
    """Parents of a BFS from ``root`` (``-1`` at the root) and the depth of the deepest node."""
    parent, depth = [-2] * len(adj), [0] * len(adj)
    parent[root] = -1
    queue = deque([root])
    while queue:
        node = queue.popleft()
        for nb in adj[node]:
            if parent[nb] == -2:
                parent[nb], depth[nb] = node, depth[node] + 1
                queue.append(nb)
    return parent, max(depth)


def chow_liu(mi: Tensor) -> Tensor:
    """The Chow-Liu tree of a symmetric mutual-information matrix ``[M, M]``: ``parent [M]`` (long, ``-1``
    at the root), a maximum spanning tree rooted at a centre (the node of least eccentricity)."""
    if mi.dim() != 2 or mi.shape[0] != mi.shape[1] or mi.shape[0] < 1:
        raise ValueError(f"mi must be a square [M, M] matrix, got shape {tuple(mi.shape)}")
    adj = _spanning_tree(mi.double())
    heights = [_bfs_parents(adj, r)[1] for r in range(len(adj))]
    parent, _ = _bfs_parents(adj, heights.index(min(heights)))
    return torch.tensor(parent, dtype=torch.long)
