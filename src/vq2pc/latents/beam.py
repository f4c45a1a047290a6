"""Beam searches over the row-major sequence of latent codes (batched, chunked).

* :func:`beam_search` — Algorithm 2 of the distillation paper (arXiv:2509.01400, App. D) for many
  independent beams ("groups") at once: from partial grids filled up to position
  ``start``, extend every beam by all ``K`` codes, score each candidate by its
  class marginal ``m = Σ_c w_c · h_c`` with the per-class prefix scores
  ``h_c = p(z_≤i | c)`` carried along, keep the top ``width`` per group.
  One prior call per position evaluates every beam of every group for every
  class (chunked to ``batch_size`` rows).
* :func:`stochastic_beam_search` — Gumbel-top-k stochastic beam search (Kool,
  van Hoof & Welling 2019, arXiv:1903.06059) on ``p(z) = Σ_c p(c) p(z|c)``: ``N`` distinct latents
  that are an exact sample without replacement from ``p(z)``, in one pass over the
  positions, no enumeration.

Both keep scores in log space; beams live in tensors ``[G, b, h, w]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from vq2pc.core.random import gumbel_noise
from vq2pc.models.priors.pixelcnn import PixelCNNPrior

__all__ = ["BeamResult", "beam_search", "stochastic_beam_search"]

# keys(cand_h [g, j, C, K], groups: slice, beams: slice) -> candidate keys [g, j, K]
KeyFn = Callable[[Tensor, slice, slice], Tensor]


@dataclass
class BeamResult:
    """Final beams: ``codes [G,b,h,w]``, per-class ``class_scores [G,b,C]`` = log p(z|c), ``keys [G,b]``."""

    codes: Tensor
    class_scores: Tensor
    keys: Tensor


def _topk_per_group(keys: Tensor, width: int) -> tuple[Tensor, Tensor]:
    """``keys [g, n]`` -> top ``min(width, n)`` values and indices per row."""
    return keys.topk(min(width, keys.shape[1]), dim=1)


def _expand(prior: PixelCNNPrior, codes: Tensor, h: Tensor, i: int, width: int, key_fn: KeyFn,
            batch_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """One position of a batched beam search.

    ``codes [G,b,P]`` (flattened grids), ``h [G,b,C]`` log p(z_<i | c). Every beam is extended by
    all K codes at position ``i``; per group the ``width`` candidates with the largest keys are kept.
    Work is chunked (≤ ``batch_size`` prior rows per call): a chunk is a block of groups × a slice of
    beams; chunk-local top-k results of a group are merged by a second top-k.
    Returns new ``codes [G,b',P]``, ``h [G,b',C]``, ``keys [G,b']`` with ``b' = min(width, b·K)``.
    """
    G, b, P = codes.shape
    C, K = prior.num_classes, prior.K
    parents = max(1, batch_size // C)
    beam_step = min(b, parents)
    group_step = max(1, parents // beam_step)
    hw = prior.latent_hw
    out_codes, out_h, out_keys = [], [], []
    for g0 in range(0, G, group_step):
        gs = slice(g0, min(G, g0 + group_step))
        part_keys, part_codes, part_h = [], [], []
        for j0 in range(0, b, beam_step):
            js = slice(j0, min(b, j0 + beam_step))
            chunk = codes[gs, js]  # [g, j, P]
            g, j = chunk.shape[:2]
            nlp = prior.next_log_probs_all_classes(chunk.reshape(g * j, *hw), i).view(g, j, C, K)
            cand_h = h[gs, js, :, None] + nlp  # [g, j, C, K]
            keys, idx = _topk_per_group(key_fn(cand_h, gs, js).reshape(g, j * K), width)
            parent, token = idx // K, idx % K
            child = chunk.gather(1, parent[:, :, None].expand(-1, -1, P)).clone()
            child[:, :, i] = token
            flat_h = cand_h.permute(0, 1, 3, 2).reshape(g, j * K, C)
            part_keys.append(keys)
            part_codes.append(child)
            part_h.append(flat_h.gather(1, idx[:, :, None].expand(-1, -1, C)))
        keys, idx = _topk_per_group(torch.cat(part_keys, 1), width)
        out_keys.append(keys)
        out_codes.append(torch.cat(part_codes, 1).gather(1, idx[:, :, None].expand(-1, -1, P)))
        out_h.append(torch.cat(part_h, 1).gather(1, idx[:, :, None].expand(-1, -1, C)))
    return torch.cat(out_codes), torch.cat(out_h), torch.cat(out_keys)


@torch.inference_mode()
def beam_search(
    prior: PixelCNNPrior,
    codes: Tensor,
    class_scores: Tensor,
    start: int,
    width: int,
    class_log_weights: Tensor | None = None,
    batch_size: int = 16384,
) -> BeamResult:
    """Algorithm 2 (BeamSearch) for ``G`` independent searches at once.

    ``codes [G,h,w]``: partial grids, positions ``< start`` fixed (row-major; later ones ignored).
    ``class_scores [G,C]``: their log p(z_<start | c) (zeros when ``start == 0``).
    ``class_log_weights``: ``[C]`` or ``[G,C]`` log w_c of the score ``m = Σ_c w_c h_c``; default
    ``log p(c)`` (the class marginal, so ``m = p(z_≤i)``); a one-hot row (0 / -inf) restricts a
    group's score to its own class, the literal reading of Algorithm 1's ``BeamSearch(.., {c}, ..)``.
    Returns the final beams, ``b = min(width, K^{HW-start})`` per group, best first; ``keys`` = log m.
    """
    G = codes.shape[0]
    codes = prior.check_codes(codes, "codes")
    if width < 1:
        raise ValueError(f"beam width must be >= 1, got {width}")
    if not 0 <= start <= prior.num_positions:
        raise ValueError(f"start={start} outside [0, {prior.num_positions}]")
    if class_scores.shape != (G, prior.num_classes):
        raise ValueError(f"class_scores must have shape [{G}, {prior.num_classes}], got {tuple(class_scores.shape)}")
    lw = prior.class_log_prior if class_log_weights is None else class_log_weights.to(codes.device)
    lw = lw.float().expand(G, prior.num_classes)

    def marginal(cand_h: Tensor, gs: slice, js: slice) -> Tensor:
        return torch.logsumexp(cand_h + lw[gs, None, :, None], dim=2)

    flat, h = codes.flatten(1)[:, None].clone(), class_scores.float()[:, None]
    keys = torch.logsumexp(h + lw[:, None], dim=2)
    for i in range(start, prior.num_positions):
        flat, h, keys = _expand(prior, flat, h, i, width, marginal, batch_size)
    return BeamResult(flat.view(G, -1, *prior.latent_hw), h, keys)


def _log1mexp(a: Tensor) -> Tensor:
    """log(1 - exp(a)) for a ≤ 0, numerically stable (Mächler 2012)."""
    return torch.where(a > -0.6931471805599453, torch.log(-torch.expm1(a)), torch.log1p(-torch.exp(a)))


@torch.inference_mode()
def stochastic_beam_search(
    prior: PixelCNNPrior, N: int, generator: torch.Generator | None = None, batch_size: int = 16384,
) -> BeamResult:
    """``N`` distinct latents sampled without replacement from p(z) (Gumbel-top-k SBS, Kool et al. 2019).

    Every prefix ``y`` carries ``φ(y) = log p(y) = logsumexp_c(log p(c) + h_c(y))`` and a perturbed
    ``G(y)``; children get ``G_φ = φ + Gumbel`` conditioned on their maximum equal to the parent's
    ``G`` (Eq. 10 of Kool et al., the stable form in their App. B), and the top ``N`` survive.
    The final ``N`` grids, in decreasing ``G``, are a sample without replacement. Requires
    ``N ≤ K^{HW}`` (checked by the caller). Returns one group: ``codes [1,N,h,w]``.
    """
    dev = prior.device
    C = prior.num_classes
    log_pc = prior.class_log_prior.double()
    flat = torch.zeros((1, 1, prior.num_positions), dtype=torch.long, device=dev)
    h = torch.zeros((1, 1, C), device=dev)
    parent_g = torch.zeros((1, 1), dtype=torch.float64, device=dev)

    def perturbed(cand_h: Tensor, gs: slice, js: slice) -> Tensor:
        phi = torch.logsumexp(cand_h.double() + log_pc[:, None], dim=2)  # [g, j, K]
        g_phi = phi + gumbel_noise(tuple(phi.shape), generator, dev).double()
        z_max = g_phi.max(dim=2, keepdim=True).values
        g_par = parent_g[gs, js, None]
        v = g_par - g_phi + _log1mexp(g_phi - z_max)
        return g_par - v.clamp_min(0) - torch.log1p(torch.exp(-v.abs()))

    for i in range(prior.num_positions):
        flat, h, parent_g = _expand(prior, flat, h, i, N, perturbed, batch_size)
    return BeamResult(flat.view(1, -1, *prior.latent_hw), h, parent_g)
