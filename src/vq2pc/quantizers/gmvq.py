"""Gaussian-mixture vector quantization trained with the ALBO (``papers/gm-vq.txt``).

Generative model: ``c ~ U(K)``, ``z | c ~ N(e_c, σ²I)``, ``x | z ~`` decoder.
The paper's equations were lost from its text; what follows is our
reconstruction from its prose (DESIGN.md, "GM-VQ"), equation numbers as there:

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

from . import QuantizerOutput
from .vq import VectorQuantizer, _flatten, perplexity

__all__ = ["GMVectorQuantizer", "gmvq_logits"]


def gmvq_logits(z: Tensor, w: Tensor, codebook: Tensor) -> Tensor:
    """``ℓ [n, K] = -½ Σ_d w_d (z_d − e_{c,d})²`` for ``z, w [n, D]`` and ``codebook [K, D]``."""
    return -0.5 * ((w * z * z).sum(1, keepdim=True) - 2.0 * (w * z) @ codebook.t() + w @ (codebook * codebook).t())


class GMVectorQuantizer(VectorQuantizer):
    """GM-VQ codebook of means ``[K, D]`` trained by gradient on the ALBO (see module docstring).

    ``beta`` weighs the latent-alignment KL, ``alpha`` the aggregated-posterior KL,
    ``sigma`` is the generative model's std. Other options (``kmeans_init``, ``seed``)
    as for :class:`VectorQuantizer`.
    """

    def __init__(
        self, K: int, D: int, beta: float, *, alpha: float = 1.0, sigma: float = 0.5, tau_start: float = 2.0,
        tau_end: float = 0.1, anneal_steps: int = 2000, **opts: Any,
    ) -> None:
        super().__init__(K, D, beta, **opts)
        if alpha < 0 or sigma <= 0 or not 0 < tau_end <= tau_start or anneal_steps < 1:
            raise ValueError("need alpha >= 0, sigma > 0, 0 < tau_end <= tau_start and anneal_steps >= 1")
        self.alpha, self.sigma = float(alpha), float(sigma)
        self.tau_start, self.tau_end, self.anneal_steps = float(tau_start), float(tau_end), int(anneal_steps)
        self.weight_head = nn.Linear(D, D)
        nn.init.zeros_(self.weight_head.weight)
        nn.init.constant_(self.weight_head.bias, math.log(math.e - 1.0))  # softplus(r) = 1: plain distances at start
        self.aggregate_perplexity = float("nan")

    @property
    def tau(self) -> float:
        """Gumbel-softmax temperature at the current step (geometric from tau_start to tau_end)."""
        frac = min(1.0, int(self.steps) / self.anneal_steps)
        return self.tau_start * (self.tau_end / self.tau_start) ** frac

    def posterior_logits(self, flat: Tensor) -> Tensor:
        """``ℓ [n, K]`` for proxies ``flat [n, D]`` (Eqs. 15–16)."""
        return gmvq_logits(flat, F.softplus(self.weight_head(flat)), self.embedding)

    def nearest(self, z_e: Tensor) -> Tensor:
        """Codes ``[B, h, w]``: the posterior modes ``argmax_c q(c | x)``; no side effects."""
        B, _, h, w = z_e.shape
        return self.posterior_logits(_flatten(z_e)).argmax(1).reshape(B, h, w)

    def forward(self, z_e: Tensor) -> QuantizerOutput:
        """Sample (training) or take the mode (evaluation) of the GM-VQ posterior for ``z_e [B, D, h, w]``."""
        flat = self._flat_input(z_e)
        B, _, h, w = z_e.shape
        logits = self.posterior_logits(flat)
        dist2 = (flat * flat).sum(1, keepdim=True) - 2.0 * flat @ self.embedding.t() + (self.embedding**2).sum(1)
        dist2 = dist2.clamp_min(0.0)  # ‖ẑ − e_c‖² [n, K]
        if self.training:
            z, codes = self._sample(logits, dist2)
            self._after_assignment(flat.detach(), codes)
        else:
            codes = logits.argmax(1)
            z = F.embedding(codes, self.embedding)
        return QuantizerOutput(
            z_q=z.reshape(B, h, w, self.D).permute(0, 3, 1, 2),
            codes=codes.reshape(B, h, w),
            loss=self._albo_regularizer(logits, dist2, B),
            perplexity=perplexity(codes, self.K),
        )

    def _sample(self, logits: Tensor, dist2: Tensor) -> tuple[Tensor, Tensor]:
        """``z = e_c + σ̃_c ε`` with ``c`` a straight-through Gumbel-softmax draw; returns ``(z [n, D], c [n])``."""
        gen = self._generator(logits.device)
        u = torch.rand(logits.shape, generator=gen, device=logits.device, dtype=logits.dtype)
        gumbel = -torch.log(-torch.log(u.clamp_min(torch.finfo(u.dtype).tiny)))
        soft = torch.softmax((logits + gumbel) / self.tau, 1)
        codes = soft.argmax(1)
        one_hot = F.one_hot(codes, self.K).to(soft.dtype)
        y = one_hot + soft - soft.detach()  # straight-through: forward one-hot, backward softmax
        var = self.sigma**2 + dist2 / self.D  # σ̃_c² [n, K]
        eps = torch.randn(logits.shape[0], self.D, generator=gen, device=logits.device, dtype=logits.dtype)
        return y @ self.embedding + (y * var).sum(1, keepdim=True).sqrt() * eps, codes

    def _albo_regularizer(self, logits: Tensor, dist2: Tensor, batch: int) -> Tensor:
        """``β · E_q KL(q(z|x,c) ‖ p(z|c)) + α · (log K − H(q̄))``, per image (see module docstring)."""
        q = torch.softmax(logits, 1)
        t = dist2 / (self.D * self.sigma**2)
        alignment = (q * (0.5 * self.D) * (t - torch.log1p(t))).sum() / batch
        q_bar = q.mean(0)
        entropy = torch.special.entr(q_bar).sum()
        if self.training:
            self.aggregate_perplexity = float(entropy.detach().exp())
        positions = logits.shape[0] / batch
        return self.beta * alignment + self.alpha * positions * (math.log(self.K) - entropy)
