"""Vector quantizer with an exponential-moving-average codebook (VQ-VAE paper,
arXiv:1711.00937, App. A.1).

The codebook is not trained by gradient: after each training batch every
codeword moves to the moving average of the encoder outputs assigned to it,
``e_k = m_k / N_k`` with ``N_k ← γN_k + (1−γ)n_k`` and ``m_k ← γm_k + (1−γ)Σ z``
(``N`` Laplace-smoothed with ``eps`` so unused codes stay finite). The loss is
only ``β·‖z_e − sg[e]‖²``. ``N`` starts at 1 and ``m`` at the initial codebook,
so an unused codeword stays where it is.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from vq2pc.core.distributed import all_reduce_sum
from vq2pc.models.quantizers.vq import VectorQuantizer

__all__ = ["EMAVectorQuantizer"]


class EMAVectorQuantizer(VectorQuantizer):
    """:class:`VectorQuantizer` whose codebook follows EMA cluster means (``decay`` = γ)."""

    def __init__(self, K: int, D: int, beta: float, *, decay: float = 0.99, eps: float = 1e-5, **opts: Any) -> None:
        super().__init__(K, D, beta, **opts)
        if not 0 < decay < 1 or eps <= 0:
            raise ValueError(f"need 0 < decay < 1 and eps > 0, got decay={decay}, eps={eps}")
        self.decay, self.eps = float(decay), float(eps)
        self.embedding.requires_grad_(False)
        self.register_buffer("cluster_size", torch.ones(K))
        self.register_buffer("embed_sum", self.embedding.detach().clone())

    def _loss(self, flat: Tensor, e: Tensor, batch: int) -> Tensor:
        return self.beta * (flat - e.detach()).pow(2).sum() / batch

    @torch.no_grad()
    def _set_codes(self, mask: Tensor, values: Tensor) -> None:
        super()._set_codes(mask, values)
        self.cluster_size[mask] = 1.0
        self.embed_sum[mask] = values

    @torch.no_grad()
    def _after_assignment(self, flat: Tensor, codes: Tensor) -> None:
        super()._after_assignment(flat, codes)
        counts = all_reduce_sum(torch.bincount(codes, minlength=self.K).to(flat.dtype))  # global batch under DDP
        sums = all_reduce_sum(torch.zeros_like(self.embed_sum).index_add_(0, codes, flat))
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1.0 - self.decay)
        self.embed_sum.mul_(self.decay).add_(sums, alpha=1.0 - self.decay)
        n = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (n + self.K * self.eps) * n
        self.embedding.data.copy_(self.embed_sum / smoothed.unsqueeze(1))
