"""The kernel of :class:`~vq2pc.core.head_leaf.HeadCategorical` leaves: log-likelihoods as one matrix product.

For images ``x [B, S]`` (levels) with mask ``m [B, S]`` and components with features ``f_n [H, h, w]``,

    ``ℓ[b, n] = Σ_s m[b, s] (conv(f_n)[x[b, s], s] + bias[x[b, s]] − log Z[n, s])``
    ``       = ⟨fold(C_b), f_n⟩ + Σ_s m[b, s] bias[x[b, s]] − Σ_s m[b, s] log Z[n, s]``

with ``C_b [H·k², S]`` the head weight's columns ``W[x[b, s]]`` of the observed pixels and ``fold`` the
adjoint of the convolution's ``unfold``: the image side ``G = fold(C) [B, H·S]`` is built once per batch
and every component block costs one ``[B, H·S] × [H·S, n]`` product plus one ``[B, S] × [S, n]`` for the
normalizers (unobserved pixels contribute ``log 1 = 0`` exactly, as in every kernel). With warps ``T_d``
component ``d·N + n`` has features ``f_n T_d``, and its block takes ``G T_dᵀ`` instead of ``G``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from vq2pc.circuit.kernels import Kernel
from vq2pc.circuit.streaming import Scratch
from vq2pc.core.head_leaf import HeadCategorical

__all__ = ["HeadKernel"]


class HeadKernel(Kernel):
    """``[B, n]`` log-likelihoods of :class:`HeadCategorical` components (see module docstring)."""

    def __init__(self, leaf: HeadCategorical) -> None:
        self.features = leaf.features.flatten(1)  # [N, H·S] (a view when contiguous)
        self.warps = leaf.warps  # [D, S, S] or None
        self.log_norm = leaf.log_norm  # [D·N, S]
        self.columns = leaf.weight.flatten(1)  # [L, H·k²] in unfold's (channel, tap) order
        self.bias = leaf.bias
        self.grid, self.k = leaf.grid, int(leaf.weight.shape[-1])
        self.s = leaf.num_variables

    def row_bytes(self) -> int:
        per_row = self.columns.shape[1] * self.s + 2 * self.features.shape[1] + 2 * self.s  # C, G, G T_dᵀ, mask, levels
        return per_row * self.features.element_size()

    def fill_value(self) -> Tensor:
        return torch.zeros(self.s, dtype=self.features.dtype, device=self.features.device)

    def image_side(self, x: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
        """``(G [B, H·S], Σ_s m·bias[x] [B], m [B, S] as floats or None)`` for levels ``x [B, S]``."""
        v = x.long()
        m = None if mask is None else mask.to(self.features.dtype)
        cols = self.columns[v]  # [B, S, H·k²]
        const = self.bias[v]  # [B, S]
        if m is not None:
            cols = cols * m.unsqueeze(-1)
            const = const * m
        g = F.fold(cols.transpose(1, 2), self.grid, self.k, padding=self.k // 2)  # [B, H, h, w]
        return g.flatten(1), const.sum(1), m

    def _loglik(
        self, x: Tensor, mask: Tensor | None, n0: int, n1: int, bias: Tensor | None, scratch: Scratch
    ) -> Tensor:
        g, const, m = self.image_side(x, mask)
        out = scratch.take("scores", (x.shape[0], n1 - n0), self.features.dtype, x.device)
        n = self.features.shape[0]
        for d in range(n0 // n, (n1 - 1) // n + 1):  # the warps this block of components spans
            lo, hi = max(n0, d * n), min(n1, (d + 1) * n)
            gd = g if self.warps is None else (g.view(-1, self.s) @ self.warps[d].T).view_as(g)
            torch.mm(gd, self.features[lo - d * n : hi - d * n].T, out=out[:, lo - n0 : hi - n0])
        if m is None:
            out -= self.log_norm[n0:n1].sum(1)
        else:
            out.addmm_(m, self.log_norm[n0:n1].T, alpha=-1.0)
        out += const.unsqueeze(1)
        if bias is not None:
            out += bias
        return out
