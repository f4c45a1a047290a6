"""The structure of a libcirkit circuit baseline (:class:`EiNetConfig`): region graph, layer kind, units,
pixel leaves; checked on construction."""

from __future__ import annotations

import math
from dataclasses import dataclass

from vq2pc.baselines.regions import REGION_GRAPHS

__all__ = ["EiNetConfig", "SUM_PRODUCT_LAYERS"]

SUM_PRODUCT_LAYERS = ("tucker", "cp", "cp-t")


@dataclass
class EiNetConfig:
    """Structure of a libcirkit circuit over an image.

    ``region_graph`` picks the structure: ``poon-domingos`` (the EiNet: ``pieces`` are EiNet's
    ``pd_num_pieces``, pieces per axis), ``quad-graph`` / ``quad-tree-2`` / ``quad-tree-4`` (libcirkit's
    image templates) or ``chow-liu-tree`` (HCLT: the Chow–Liu tree of the training pixels, learned by
    :func:`train_einet` and kept in ``tree`` as each variable's parent, -1 at the root, so a saved
    model rebuilds the same structure).
    """

    image_shape: tuple[int, int, int]
    leaf: str = "gaussian"
    levels: int = 256
    pieces: tuple[int, ...] = (4,)
    num_input_units: int = 10
    num_sum_units: int = 10
    sum_product: str = "tucker"
    min_std: float = 1e-3
    max_std: float = 1.0
    seed: int = 0  # parameter initialization (train_einet sets it to the training seed)
    region_graph: str = "poon-domingos"
    tree: tuple[int, ...] | None = None  # chow-liu-tree: parent of each variable (-1: the root)

    def __post_init__(self) -> None:
        self.image_shape = tuple(int(s) for s in self.image_shape)  # type: ignore[assignment]
        self.pieces = tuple(int(p) for p in self.pieces)
        self.tree = None if self.tree is None else tuple(int(t) for t in self.tree)
        if len(self.image_shape) != 3 or min(self.image_shape) < 1:
            raise ValueError(f"image_shape must be (C, H, W) with positive sizes, got {self.image_shape}")
        if self.leaf not in ("gaussian", "categorical"):
            raise ValueError(f"EiNet leaf must be 'gaussian' or 'categorical', got {self.leaf!r}")
        if self.levels < 2:
            raise ValueError(f"levels must be >= 2, got {self.levels}")
        if not self.pieces or min(self.pieces) < 1:
            raise ValueError(f"pieces must be positive piece counts per axis, got {self.pieces}")
        if min(self.num_input_units, self.num_sum_units) < 1:
            raise ValueError("num_input_units and num_sum_units must be >= 1")
        if self.sum_product not in SUM_PRODUCT_LAYERS:
            raise ValueError(f"sum_product must be one of {SUM_PRODUCT_LAYERS}, got {self.sum_product!r}")
        if not 0 < self.min_std < self.max_std:
            raise ValueError(f"need 0 < min_std < max_std, got {self.min_std}, {self.max_std}")
        if self.region_graph not in REGION_GRAPHS:
            raise ValueError(f"region_graph must be one of {REGION_GRAPHS}, got {self.region_graph!r}")
        if self.tree is not None and (len(self.tree) != self.num_variables or sorted(self.tree).count(-1) != 1):
            raise ValueError(f"tree must give one parent per variable ({self.num_variables}) with one root (-1)")

    @property
    def num_variables(self) -> int:
        return math.prod(self.image_shape)

    def deltas(self) -> list[list[float]]:
        """libcirkit ``PoonDomingos`` deltas: ``[H/p, W/p]`` per piece count (at least 1)."""
        _, h, w = self.image_shape
        return [[max(1.0, h / p), max(1.0, w / p)] for p in self.pieces]
