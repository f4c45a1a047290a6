"""The structure of a libcirkit circuit baseline (:class:`EiNetConfig`): region graph, layer kind, units,
pixel leaves; checked on construction (:mod:`vq2pc.core.settings`)."""

from __future__ import annotations

import math
from typing import Annotated, Literal, get_args

from pydantic import Field, model_validator

from vq2pc.baselines.regions import RegionGraph
from vq2pc.core.settings import AsTuple, Count, Levels, Natural, Positive, settings

__all__ = ["EiNetConfig", "SUM_PRODUCT_LAYERS", "SumProduct"]

SumProduct = Literal["tucker", "cp", "cp-t"]
SUM_PRODUCT_LAYERS: tuple[str, ...] = get_args(SumProduct)


@settings
class EiNetConfig:
    """Structure of a libcirkit circuit over an image.

    ``region_graph`` picks the structure: ``poon-domingos`` (the EiNet: ``pieces`` are EiNet's
    ``pd_num_pieces``, pieces per axis), ``quad-graph`` / ``quad-tree-2`` / ``quad-tree-4`` (libcirkit's
    image templates) or ``chow-liu-tree`` (HCLT: the Chow–Liu tree of the training pixels, learned by
    :func:`train_einet` and kept in ``tree`` as each variable's parent, -1 at the root, so a saved
    model rebuilds the same structure).

    ``pic_net_dim``: a probabilistic integral circuit (Gala et al., NeurIPS 2024) in its quadrature form, as
    in libcirkit's tutorial notebook: every layer's parameter tensor is the output of a small net evaluated
    at trapezoidal quadrature points (one per unit), sum weights normalized by the quadrature, and the nets'
    weights are what is trained.
    """

    image_shape: Annotated[tuple[Count, Count, Count], AsTuple]
    leaf: Literal["gaussian", "categorical"] = "gaussian"
    levels: Levels = 256
    pieces: Annotated[tuple[Count, ...], AsTuple, Field(min_length=1)] = Field((4,), description="pieces per axis")
    num_input_units: Count = 10
    num_sum_units: Count = 10
    sum_product: SumProduct = "tucker"
    min_std: Positive = 1e-3
    max_std: Positive = 1.0
    seed: Natural = 0  # parameter initialization (train_einet sets it to the training seed)
    region_graph: RegionGraph = "poon-domingos"
    tree: Annotated[tuple[int, ...], AsTuple] | None = None  # chow-liu-tree: parent of each variable (-1: the root)
    pic_net_dim: Count | None = None  # a PIC: every parameter tensor made by a net of this width (libcirkit's pc2qpc)

    @model_validator(mode="after")
    def _agree(self) -> EiNetConfig:
        if not self.min_std < self.max_std:
            raise ValueError(f"need min_std < max_std, got {self.min_std}, {self.max_std}")
        if self.pic_net_dim is not None and self.sum_product != "cp":
            raise ValueError(
                f"a PIC (pic_net_dim) needs sum_product 'cp' (libcirkit's pc2qpc), got {self.sum_product!r}"
            )
        if self.tree is not None and (len(self.tree) != self.num_variables or sorted(self.tree).count(-1) != 1):
            raise ValueError(f"tree must give one parent per variable ({self.num_variables}) with one root (-1)")
        return self

    @property
    def num_variables(self) -> int:
        return math.prod(self.image_shape)

    def deltas(self) -> list[list[float]]:
        """libcirkit ``PoonDomingos`` deltas: ``[H/p, W/p]`` per piece count (at least 1)."""
        _, h, w = self.image_shape
        return [[max(1.0, h / p), max(1.0, w / p)] for p in self.pieces]
