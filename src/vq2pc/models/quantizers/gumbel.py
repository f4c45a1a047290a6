"""Gumbel-softmax quantization (Jang et al. 2017; the "Gumbel VQ-VAE" of GM-VQ's Table 1).

A linear head maps each encoder output ``z_e`` to logits over the ``K`` codes,
``q(c | x) = softmax(logits)``. Training draws ``y = softmax((logits + g) / τ)``
with Gumbel noise ``g`` (``hard=True``: the one-hot of its argmax forward, the
soft ``y`` backward) and uses ``z_q = y @ codebook``; the loss is
``β · KL(q(c|x) ‖ U(K))`` summed over latent positions, averaged over images.
At evaluation ``c = argmax logits`` and ``z_q = e_c``. τ anneals geometrically
from ``tau_start`` to ``tau_end`` over ``anneal_steps`` training steps.

:class:`GumbelFamily` (forward pass, temperature) and :func:`gumbel_softmax_draw`
are shared with :mod:`vq2pc.models.quantizers.gmvq`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vq2pc.core.random import gumbel_noise
from vq2pc.models.quantizers import QuantizerOutput
from vq2pc.models.quantizers.vq import VectorQuantizer, _flatten, perplexity

__all__ = ["GumbelFamily", "GumbelQuantizer", "gumbel_softmax_draw"]


def gumbel_softmax_draw(logits: Tensor, tau: float, generator: torch.Generator, hard: bool) -> tuple[Tensor, Tensor]:
    """``(y [n, K], codes [n])``: a Gumbel-softmax relaxation of a draw from ``softmax(logits)``.

    ``codes`` is the argmax of the perturbed logits (an exact draw); ``y`` is the soft
    relaxation, or with ``hard`` the one-hot of ``codes`` carrying the soft gradient."""
    gumbel = gumbel_noise(tuple(logits.shape), generator, logits.device).to(logits.dtype)
    soft = torch.softmax((logits + gumbel) / tau, 1)
    codes = soft.argmax(1)
    if not hard:
        return soft, codes
    return F.one_hot(codes, logits.shape[1]).to(soft.dtype) + soft - soft.detach(), codes


class GumbelFamily(VectorQuantizer):
    """Base of the quantizers that draw codes by Gumbel-softmax from posterior logits.

    Subclasses give ``logits(flat) [n, K]``, ``_draw(flat, logits) -> (z [n, D], codes [n])``
    (training) and ``_regularizer(flat, logits, batch)`` (the loss); evaluation takes the
    posterior mode and its codeword. The temperature anneals geometrically.
    """

    def __init__(
        self, K: int, D: int, beta: float, *, tau_start: float, tau_end: float, anneal_steps: int, **opts: Any
    ) -> None:
        if opts.get("l2_normalize"):
            raise ValueError("l2_normalize applies to the vq and ema quantizers only")
        super().__init__(K, D, beta, **opts)
        if not 0 < tau_end <= tau_start or anneal_steps < 1:
            raise ValueError(
                f"need 0 < tau_end <= tau_start and anneal_steps >= 1, got {tau_start}, {tau_end}, {anneal_steps}"
            )
        self.tau_start, self.tau_end, self.anneal_steps = float(tau_start), float(tau_end), int(anneal_steps)

    @property
    def tau(self) -> float:
        """Temperature at the current step (geometric from tau_start to tau_end)."""
        frac = min(1.0, int(self.steps) / self.anneal_steps)
        return self.tau_start * (self.tau_end / self.tau_start) ** frac

    def logits(self, flat: Tensor) -> Tensor:
        """``[n, K]`` unnormalized log q(c | x) for encoder outputs ``flat [n, D]``."""
        raise NotImplementedError

    def _draw(self, flat: Tensor, logits: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def _regularizer(self, flat: Tensor, logits: Tensor, batch: int) -> Tensor:
        raise NotImplementedError

    def nearest(self, z_e: Tensor) -> Tensor:
        """Codes ``[B, h, w]``: the posterior modes ``argmax_c q(c | x)``; no side effects."""
        B, _, h, w = z_e.shape
        return self.logits(_flatten(z_e)).argmax(1).reshape(B, h, w)

    def forward(self, z_e: Tensor) -> QuantizerOutput:
        """Draw (training) or take the mode (evaluation) of ``q(c | x)`` for ``z_e [B, D, h, w]``."""
        flat = self._flat_input(z_e)
        B, _, h, w = z_e.shape
        logits = self.logits(flat)
        if self.training:
            z, codes = self._draw(flat, logits)
            self._after_assignment(flat.detach(), codes)
        else:
            codes = logits.argmax(1)
            z = F.embedding(codes, self.embedding)
        return QuantizerOutput(
            z_q=z.reshape(B, h, w, self.D).permute(0, 3, 1, 2),
            codes=codes.reshape(B, h, w),
            loss=self._regularizer(flat, logits, B),
            perplexity=perplexity(codes, self.K),
        )


class GumbelQuantizer(GumbelFamily):
    """Codes drawn by Gumbel-softmax from a linear head's logits (see module docstring)."""

    def __init__(
        self,
        K: int,
        D: int,
        beta: float,
        *,
        tau_start: float = 1.0,
        tau_end: float = 1.0 / 16,
        anneal_steps: int = 2000,
        hard: bool = False,
        **opts: Any,
    ) -> None:
        super().__init__(K, D, beta, tau_start=tau_start, tau_end=tau_end, anneal_steps=anneal_steps, **opts)
        self.hard = bool(hard)
        self.to_logits = nn.Linear(D, K)

    def logits(self, flat: Tensor) -> Tensor:
        return self.to_logits(flat)

    def _draw(self, flat: Tensor, logits: Tensor) -> tuple[Tensor, Tensor]:
        y, codes = gumbel_softmax_draw(logits, self.tau, self._generator(flat.device), self.hard)
        return y @ self.embedding, codes

    def _regularizer(self, flat: Tensor, logits: Tensor, batch: int) -> Tensor:
        """``β · Σ_positions KL(q(c|x) ‖ U(K))`` per image."""
        log_q = torch.log_softmax(logits, 1)
        return self.beta * (log_q.exp() * (log_q + math.log(self.K))).sum() / batch
