"""The kernel of discretized leaves (:class:`~vq2pc.core.discretized.DiscretizedGaussian` / ``Logistic``):
the categorical kernel's gather-sums over ``[P·L, n]`` tables of log-probabilities built per call from the
two parameters per pixel and component, so the full ``[S·L, N]`` table never exists (see
:mod:`vq2pc.circuit.kernels`)."""

from __future__ import annotations

from torch import Tensor

from vq2pc.circuit.kernels import GatherKernel, _bag_sum
from vq2pc.circuit.streaming import Scratch
from vq2pc.core.discretized import table_block
from vq2pc.core.leaves import Discretized

__all__ = ["DiscretizedKernel"]


class DiscretizedKernel(GatherKernel):
    """``embedding_bag`` sums over ``[P·L, n]`` tables built per call (see module docstring)."""

    # The gather-sum tiles as CategoricalKernel's; each pixel's [L, BUILD_COLUMNS] slice of the table is built
    # by one table_block call, whose dozen temporaries (1 MiB each) stay in the L2 cache. CPU time per
    # table cell, 1 thread (S=16, L=256, N=1024): Gaussian 20 ns with one pixel per call, 53 ns with 8
    # (8 MiB temporaries); logistic 9 / 26 ns; 128..1024 columns per call differ by under 15%.
    BUILD_COLUMNS = 1024

    def __init__(self, leaf: Discretized) -> None:
        self.loc = leaf.loc.T.contiguous()  # [S, N]: a pixel's components are a row slice
        self.scale = leaf.scale.T.contiguous()
        self.levels, self.cdf, self.s = leaf.levels, leaf.cdf, int(leaf.loc.shape[1])

    def params(self) -> Tensor:
        return self.loc

    def column_bytes(self) -> int:
        return self.PIXEL_BLOCK * self.levels * self.loc.element_size()  # the [P·L, n] table buffer

    def _build(self, table: Tensor, p0: int, p1: int, n0: int, n1: int, keep: Tensor | None) -> None:
        """Rows ``(i - p0)·L + v`` of ``table [(p1-p0)·L, n1-n0]`` for the observed pixels ``p0 ≤ i < p1``."""
        for i in range(p0, p1):
            if keep is not None and not bool(keep[:, i - p0].any()):
                continue  # nobody observes pixel i: its rows are never gathered
            rows = table[(i - p0) * self.levels : (i - p0 + 1) * self.levels]
            for c0 in range(n0, n1, self.BUILD_COLUMNS):
                c1 = min(n1, c0 + self.BUILD_COLUMNS)
                rows[:, c0 - n0 : c1 - n0] = table_block(
                    self.loc[i : i + 1, c0:c1], self.scale[i : i + 1, c0:c1], self.levels, self.cdf
                )

    def _loglik(
        self, x: Tensor, mask: Tensor | None, n0: int, n1: int, bias: Tensor | None, scratch: Scratch
    ) -> Tensor:
        out = scratch.take("scores", (x.shape[0], n1 - n0), self.loc.dtype, x.device)
        if bias is None:
            out.zero_()
        else:
            out.copy_(bias.expand_as(out))
        idx, offsets, row_block = self._tiling(x, n1 - n0)
        for p0 in range(0, self.s, self.PIXEL_BLOCK):
            p1 = min(self.s, p0 + self.PIXEL_BLOCK)
            keep = None if mask is None else mask[:, p0:p1]
            if keep is not None and not bool(keep.any()):
                continue  # nobody observes these pixels: nothing to build
            table = scratch.take("table", ((p1 - p0) * self.levels, n1 - n0), self.loc.dtype, x.device)
            self._build(table, p0, p1, n0, n1, keep)
            pos = idx[:, p0:p1] + offsets[: p1 - p0]
            for r0 in range(0, x.shape[0], row_block):
                rows = slice(r0, r0 + row_block)
                out[rows] += _bag_sum(pos[rows], table, None if keep is None else keep[rows])
        return out
