"""Gaussian-mixture vector quantization trained with the ALBO.

Yan, Wu, Shah, Liu 2024, "Gaussian Mixture Vector Quantization with Aggregated Categorical
Posterior", arXiv:2410.10180. Generative model: ``c ~ U(K)``, ``z | c ~ N(e_c, σ²I)``,
``x | z ~`` decoder. The formulas below were reconstructed from the paper's prose (the text
they were written from lacked its typeset equations), so they may differ from the paper in
detail; the numbers in parentheses are the paper's equation numbers:

* (15) raw weights ``r = W ẑ + b`` (a linear head on the encoder's proxy ``ẑ``;
  the paper's encoder emits ``r`` itself — a last linear layer, same family),
  ``w = softplus(r)``.
* (16)–(17) ``ℓ_c = -½ Σ_d w_d (ẑ_d − e_{c,d})²`` and ``q(c | x) = softmax(ℓ)``.
  Expanded as ``-½ [w·ẑ² − 2 (w⊙ẑ)·e_c + w·e_c²]``: two ``[n, D] × [D, K]``
  products, no ``[n, K, D]`` broadcast.
* (18) ``q(z | x, c) = N(e_c, σ̃_c² I)`` with ``σ̃_c² = σ² + ‖ẑ − e_c‖² / D``: the
  variance grows with the distance of the proxy from the codeword.
* Sampling: ``c`` by straight-through Gumbel-softmax at temperature τ (annealed
  geometrically from ``tau_start`` = 2.0 to ``tau_end`` = 0.1 over ``anneal_steps``
  training steps), ``z = e_c + σ̃_c ε``.
* (13)–(14) loss per image (summed over the ``h·w`` latent positions, like the
  reconstruction NLL): ``β · Σ_c q(c|x) KL(N(e_c, σ̃_c²) ‖ N(e_c, σ²))`` with
  ``KL = D/2 (t − log(1 + t))``, ``t = ‖ẑ − e_c‖² / (Dσ²)`` (latent alignment;
  the expectation over ``c`` is exact) ``+ α · (log K − H(q̄))`` per position,
  where ``q̄`` is the mini-batch mean of ``q(c | x)`` (Eq. 12): the ALBO's
  ``KL(q̄ ‖ U(K))``.

At evaluation ``c = argmax_c q(c | x)`` and ``z_q = e_c``: the codes the circuit
distills are the posterior modes. ``perplexity`` is the code histogram's, as for
every quantizer; :attr:`GMVectorQuantizer.aggregate_perplexity` holds
``exp H(q̄)`` of the last training batch (the paper's metric).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vq2pc.models.quantizers.gumbel import GumbelFamily, gumbel_softmax_draw

__all__ = ["GMVectorQuantizer", "gmvq_logits"]


def gmvq_logits(z: Tensor, w: Tensor, codebook: Tensor) -> Tensor:
    """``ℓ [n, K] = -½ Σ_d w_d (z_d − e_{c,d})²`` for ``z, w [n, D]`` and ``codebook [K, D]``."""
    return -0.5 * ((w * z * z).sum(1, keepdim=True) - 2.0 * (w * z) @ codebook.t() + w @ (codebook * codebook).t())


class GMVectorQuantizer(GumbelFamily):
    """GM-VQ codebook of means ``[K, D]`` trained by gradient on the ALBO (see module docstring).

    ``beta`` weighs the latent-alignment KL, ``alpha`` the aggregated-posterior KL,
    ``sigma`` is the generative model's std. ``alpha`` competes with the reconstruction NLL
    (summed over pixels): measured best of {1, 10, 50, 100} for codebook use, 10 on 8×8 digits
    and 50 on MNIST (test perplexity 14.82 of 16 there, against 7.97 at the default 1). Other options (``kmeans_init``, ``seed``)
    as for :class:`VectorQuantizer`.
    """

    def __init__(
        self,
        K: int,
        D: int,
        beta: float,
        *,
        alpha: float = 1.0,
        sigma: float = 0.5,
        tau_start: float = 2.0,
        tau_end: float = 0.1,
        anneal_steps: int = 2000,
        **opts: Any,
    ) -> None:
        super().__init__(K, D, beta, tau_start=tau_start, tau_end=tau_end, anneal_steps=anneal_steps, **opts)
        if alpha < 0 or sigma <= 0:
            raise ValueError(f"need alpha >= 0 and sigma > 0, got alpha={alpha}, sigma={sigma}")
        self.alpha, self.sigma = float(alpha), float(sigma)
        self.weight_head = nn.Linear(D, D)
        nn.init.zeros_(self.weight_head.weight)
        nn.init.constant_(self.weight_head.bias, math.log(math.e - 1.0))  # softplus(r) = 1: plain distances at start
        self.aggregate_perplexity = float("nan")

    def logits(self, flat: Tensor) -> Tensor:
        """``ℓ [n, K]`` for proxies ``flat [n, D]`` (Eqs. 15–16)."""
        return gmvq_logits(flat, F.softplus(self.weight_head(flat)), self.embedding)

    def _dist2(self, flat: Tensor) -> Tensor:
        """``‖ẑ − e_c‖² [n, K]`` (one matrix product)."""
        e = self.embedding
        return ((flat * flat).sum(1, keepdim=True) - 2.0 * flat @ e.t() + (e * e).sum(1)).clamp_min(0.0)

    def _draw(self, flat: Tensor, logits: Tensor) -> tuple[Tensor, Tensor]:
        """``z = e_c + σ̃_c ε`` with ``c`` a straight-through Gumbel-softmax draw; returns ``(z [n, D], c [n])``."""
        gen = self._generator(logits.device)
        y, codes = gumbel_softmax_draw(logits, self.tau, gen, hard=True)  # one-hot forward, softmax backward
        var = self.sigma**2 + self._dist2(flat) / self.D  # σ̃_c² [n, K]
        eps = torch.randn(logits.shape[0], self.D, generator=gen, device=logits.device, dtype=logits.dtype)
        return y @ self.embedding + (y * var).sum(1, keepdim=True).sqrt() * eps, codes

    def _regularizer(self, flat: Tensor, logits: Tensor, batch: int) -> Tensor:
        """``β · E_q KL(q(z|x,c) ‖ p(z|c)) + α · (log K − H(q̄))``, per image (see module docstring)."""
        q = torch.softmax(logits, 1)
        t = self._dist2(flat) / (self.D * self.sigma**2)
        alignment = (q * (0.5 * self.D) * (t - torch.log1p(t))).sum() / batch
        q_bar = q.mean(0)
        entropy = torch.special.entr(q_bar).sum()
        if self.training:
            self.aggregate_perplexity = float(entropy.detach().exp())
        positions = logits.shape[0] / batch
        return self.beta * alignment + self.alpha * positions * (math.log(self.K) - entropy)
