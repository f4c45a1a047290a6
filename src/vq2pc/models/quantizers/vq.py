"""The VQ-VAE vector quantizer (van den Oord et al. 2017, arXiv:1711.00937;
the distillation paper, arXiv:2509.01400, App. A, Eq. 6).

Nearest codeword by Euclidean distance, computed as one matrix product
(``argmin_k ‖e_k‖² − 2 z·e_k``, no ``[n, K, D]`` broadcast); loss
``‖sg[z_e] − e‖² + β‖z_e − sg[e]‖²`` summed over the latent grid and the
codeword (as the squared norms of Eq. 6) and averaged over the batch — the same
convention as the reconstruction NLL, which is summed over pixels; the
straight-through estimator copies the gradient of ``z_q`` to ``z_e``.

Options: ℓ2-normalized codes (encoder outputs and codewords are projected onto
the unit sphere before the nearest-codeword search, so distances are cosine
distances and ``z_q`` is a unit vector), k-means initialization of the codebook
from the first training batch, and dead-code replacement (a codeword whose moving-average use per batch falls
below a threshold is moved onto a random encoder output of the current batch).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vq2pc.core.distributed import all_reduce_sum, gather_rows
from vq2pc.core.random import step_seed
from vq2pc.models.quantizers import QuantizerOutput

__all__ = ["VectorQuantizer", "nearest_codes", "kmeans", "kmeans_plus_plus", "perplexity"]


def nearest_codes(flat: Tensor, codebook: Tensor) -> Tensor:
    """Index of the nearest codeword (Euclidean) for each row: ``flat [n, D]``, ``codebook [K, D]`` -> ``[n]`` long."""
    scores = codebook.pow(2).sum(1) - 2.0 * flat @ codebook.t()  # ‖z‖² is the same for every k
    return scores.argmin(1)


def perplexity(codes: Tensor, K: int) -> Tensor:
    """``exp(H(p))`` of the histogram ``p`` of ``codes`` (any shape) over ``0..K-1``: a float64 scalar in
    ``[1, K]``. The one definition of codebook perplexity (training statistics and reports)."""
    p = torch.bincount(codes.reshape(-1), minlength=K).double() / max(codes.numel(), 1)
    return torch.special.entr(p).sum().exp()


def kmeans_plus_plus(x: Tensor, K: int, generator: torch.Generator) -> Tensor:
    """k-means++ seeding: ``K`` rows of ``x [n, D]``, each drawn with probability ∝ squared distance
    to the nearest row already chosen. Returns ``[K, D]`` (one-time initialization, ``K`` steps)."""
    n = x.shape[0]
    centres = torch.empty(K, x.shape[1], dtype=x.dtype, device=x.device)
    d2 = torch.ones(n, dtype=x.dtype, device=x.device)
    for k in range(K):
        pick = torch.multinomial(d2.to(generator.device) + 1e-12, 1, generator=generator).to(x.device)
        centres[k] = x[pick[0]]
        d2 = torch.minimum(d2, (x - centres[k]).pow(2).sum(1)) if k else (x - centres[k]).pow(2).sum(1)
    return centres


def kmeans(x: Tensor, K: int, iters: int, generator: torch.Generator) -> Tensor:
    """Lloyd's k-means on ``x [n, D]`` from a k-means++ start; returns centres ``[K, D]``.

    A centre that loses all its points keeps its previous position.
    """
    centres = kmeans_plus_plus(x, K, generator)
    for _ in range(iters):
        codes = nearest_codes(x, centres)
        sums = torch.zeros_like(centres).index_add_(0, codes, x)
        counts = torch.bincount(codes, minlength=K).unsqueeze(1)
        centres = torch.where(counts > 0, sums / counts.clamp(min=1), centres)
    return centres


class VectorQuantizer(nn.Module):
    """Codebook ``[K, D]`` learned by gradient (codebook + β·commitment loss).

    ``l2_normalize``: quantize ``z_e / ‖z_e‖`` to the nearest of the normalized codewords.
    ``kmeans_init``: on the first training forward, set the codebook by
    ``kmeans_iters`` Lloyd iterations on that batch's encoder outputs.
    ``dead_code_threshold > 0``: track ``usage`` (moving average, ``usage_decay``,
    of each code's count per batch, starting at twice the threshold) and move
    codes below the threshold onto random encoder outputs of the batch.
    Randomness comes from ``seed`` and the step counter, so runs and resumed
    runs are reproducible.
    """

    def __init__(
        self,
        K: int,
        D: int,
        beta: float,
        *,
        kmeans_init: bool = False,
        kmeans_iters: int = 10,
        dead_code_threshold: float = 0.0,
        usage_decay: float = 0.99,
        seed: int = 0,
        l2_normalize: bool = False,
    ) -> None:
        super().__init__()
        if dead_code_threshold < 0 or not 0 < usage_decay < 1 or kmeans_iters < 0:
            raise ValueError("need dead_code_threshold >= 0, 0 < usage_decay < 1, kmeans_iters >= 0")
        self.K, self.D, self.beta = K, D, float(beta)
        self.kmeans_iters, self.dead_code_threshold, self.usage_decay, self.seed = (
            kmeans_iters,
            float(dead_code_threshold),
            float(usage_decay),
            seed,
        )
        self.l2_normalize = bool(l2_normalize)
        self.embedding = nn.Parameter(torch.empty(K, D).uniform_(-1.0 / K, 1.0 / K))
        self.register_buffer("initialized", torch.tensor(not kmeans_init))
        self.register_buffer("usage", torch.full((K,), 2.0 * self.dead_code_threshold))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    @property
    def codebook(self) -> Tensor:
        """The codewords ``[K, D]`` (unit vectors with ``l2_normalize``)."""
        return F.normalize(self.embedding, dim=1) if self.l2_normalize else self.embedding

    def embed(self, codes: Tensor) -> Tensor:
        """Codewords of ``codes [B, h, w]`` (long) as ``z_q [B, D, h, w]``."""
        return F.embedding(codes, self.codebook).permute(0, 3, 1, 2)

    def nearest(self, z_e: Tensor) -> Tensor:
        """Codes ``[B, h, w]`` of the nearest codewords to ``z_e [B, D, h, w]``; no side effects."""
        B, _, h, w = z_e.shape
        flat = _flatten(z_e)
        return nearest_codes(F.normalize(flat, dim=1) if self.l2_normalize else flat, self.codebook).reshape(B, h, w)

    def forward(self, z_e: Tensor) -> QuantizerOutput:
        """Quantize ``z_e [B, D, h, w]`` (see :class:`QuantizerOutput`)."""
        flat = self._flat_input(z_e)
        B, _, h, w = z_e.shape
        codebook = self.codebook
        codes = nearest_codes(flat.detach(), codebook)
        e = F.embedding(codes, codebook)
        loss = self._loss(flat, e, B)
        if self.training:
            self._after_assignment(flat.detach(), codes)
        z_q = flat + (e - flat).detach()  # straight-through: dz_q/dz_e = I
        return QuantizerOutput(
            z_q=z_q.reshape(B, h, w, self.D).permute(0, 3, 1, 2),
            codes=codes.reshape(B, h, w),
            loss=loss,
            perplexity=perplexity(codes, self.K),
        )

    def _flat_input(self, z_e: Tensor) -> Tensor:
        """Checked ``z_e [B, D, h, w]`` as ``[B·h·w, D]``, after the training-time codebook hooks."""
        if z_e.dim() != 4 or z_e.shape[1] != self.D:
            raise ValueError(f"z_e must have shape [B, {self.D}, h, w], got {tuple(z_e.shape)}")
        flat = _flatten(z_e)
        if self.l2_normalize:
            flat = F.normalize(flat, dim=1)
        if self.training:  # under DDP: the global batch's outputs, in global order, on every rank
            self._before_assignment(gather_rows(flat.detach()))
        return flat

    # --- training-time hooks ------------------------------------------------------------------------
    def _loss(self, flat: Tensor, e: Tensor, batch: int) -> Tensor:
        """Codebook term (gradient to the codebook only) + β · commitment term (gradient to the encoder only)."""
        codebook_term = (e - flat.detach()).pow(2).sum() / batch
        commitment_term = (flat - e.detach()).pow(2).sum() / batch
        return codebook_term + self.beta * commitment_term

    def _generator(self, device: torch.device) -> torch.Generator:
        return torch.Generator(device=device).manual_seed(step_seed(self.seed, self.steps))

    @torch.no_grad()
    def _set_codes(self, mask: Tensor, values: Tensor) -> None:
        """Overwrite the codewords selected by ``mask [K]`` with ``values [mask.sum(), D]``."""
        self.embedding.data[mask] = values

    @torch.no_grad()
    def _before_assignment(self, flat: Tensor) -> None:
        if not bool(self.initialized):
            centres = kmeans(flat, self.K, self.kmeans_iters, self._generator(flat.device))
            self._set_codes(torch.ones(self.K, dtype=torch.bool, device=flat.device), centres)
            self.initialized.fill_(True)
        if self.dead_code_threshold > 0:
            dead = self.usage < self.dead_code_threshold
            n_dead = int(dead.sum())
            if n_dead:
                pick = torch.randint(
                    0, flat.shape[0], (n_dead,), generator=self._generator(flat.device), device=flat.device
                )
                self._set_codes(dead, flat[pick])
                self.usage[dead] = 2.0 * self.dead_code_threshold

    @torch.no_grad()
    def _after_assignment(self, flat: Tensor, codes: Tensor) -> None:
        counts = all_reduce_sum(torch.bincount(codes, minlength=self.K).to(self.usage.dtype))  # global batch
        self.usage.mul_(self.usage_decay).add_(counts, alpha=1.0 - self.usage_decay)
        self.steps += 1


def _flatten(z_e: Tensor) -> Tensor:
    """``[B, D, h, w] -> [B·h·w, D]`` in (B, h, w) row-major order."""
    return z_e.permute(0, 2, 3, 1).reshape(-1, z_e.shape[1])
