"""Region graphs of the libcirkit baselines: the structures of the field's image circuits.

* ``poon-domingos``: the EiNet (Peharz et al. 2020), cut at multiples of ``H/p`` and ``W/p``;
* ``quad-graph``, ``quad-tree-2``, ``quad-tree-4``: libcirkit's image templates (the QuadGraph of
  cirkit's tutorial circuits, Loconte et al. TMLR 2025, Mari et al. 2023);
* ``chow-liu-tree``: HCLT (Liu and Van den Broeck, NeurIPS 2021; Liu et al. ICLR 2022), the Chow–Liu
  tree of the training pixels turned into a region graph. The tree is learned once (:func:`learn_tree`)
  and stored as each variable's parent, so a saved model rebuilds the same structure.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

import numpy as np
from torch import Tensor

from vq2pc.circuit.cirkit import require_cirkit

__all__ = ["REGION_GRAPHS", "RegionGraph", "region_graph", "learn_tree"]

RegionGraph = Literal["poon-domingos", "quad-graph", "quad-tree-2", "quad-tree-4", "chow-liu-tree"]
REGION_GRAPHS: tuple[str, ...] = get_args(RegionGraph)


def region_graph(
    name: str, image_shape: tuple[int, int, int], deltas: list[list[float]], tree: tuple[int, ...] | None
) -> Any:
    """The libcirkit region graph ``name`` over ``image_shape`` (C, H, W); ``deltas`` are Poon–Domingos's
    cut widths, ``tree`` the Chow–Liu parents (each variable's parent, -1 at the root)."""
    require_cirkit()
    from cirkit.templates.region_graph import PoonDomingos, QuadGraph, QuadTree
    from cirkit.templates.region_graph.algorithms.utils import tree2rg

    if name == "poon-domingos":
        return PoonDomingos(image_shape, delta=deltas)
    if name == "quad-graph":
        return QuadGraph(image_shape)
    if name in ("quad-tree-2", "quad-tree-4"):
        return QuadTree(image_shape, num_patch_splits=int(name[-1]))
    if name != "chow-liu-tree":
        raise ValueError(f"region_graph must be one of {REGION_GRAPHS}, got {name!r}")
    if tree is None:
        raise ValueError("a chow-liu-tree circuit needs its tree: learn it with learn_tree (train_einet does)")
    return tree2rg(np.asarray(tree))


def learn_tree(x: Tensor, leaf: str, levels: int, max_images: int = 20000, bins: int = 16) -> tuple[int, ...]:
    """The Chow–Liu tree of pixels ``x [B, S]`` (integer levels; the first ``max_images`` rows): each
    variable's parent, -1 at the root. Categorical pixels use the categorical mutual information over
    ``bins`` equal-width bins of the ``levels`` values (the tree only: the circuit still models every level;
    256 categories would make the pairwise joint counts an ``[S·256, S·256]`` matrix, 160 G entries on
    MNIST), counted over chunks of 128 images (MNIST, 20,000 images: 130 s and 4.9 GB on 2 cores; chunks of
    2,048 peaked at 22 GB), Gaussian ones the Gaussian estimator on ``(v + 1/2) / levels``."""
    require_cirkit()
    from cirkit.templates.region_graph.algorithms.chow_liu import ChowLiuTree

    x = x.flatten(1)[:max_images].cpu()
    if leaf == "categorical":
        k = min(bins, levels)
        binned = (x.long() * k).div(levels, rounding_mode="floor")
        tree = ChowLiuTree(binned, input_type="categorical", num_categories=k, chunk_size=128, as_region_graph=False)
    else:
        tree = ChowLiuTree((x.double() + 0.5) / levels, input_type="gaussian", as_region_graph=False)
    return tuple(int(t) for t in tree)
