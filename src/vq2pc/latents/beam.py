"""Beam searches over the row-major sequence of latent codes (batched, chunked).

* :func:`beam_search` — Algorithm 2 of the distillation paper (arXiv:2509.01400, App. D) for many
  independent beams ("groups") at once: from partial grids filled up to position
  ``start``, extend every beam by all ``K`` codes, score each candidate by its
  class marginal ``m = Σ_c w_c · h_c`` with the per-class prefix scores
  ``h_c = p(z_≤i | c)`` carried along, keep the top ``width`` per group.
  One incremental step of the prior per position (:meth:`vq2pc.core.protocols.Prior.step`)
  scores every beam of every group for every class; the survivors' decoding states are
  gathered with :meth:`~vq2pc.core.protocols.Prior.reorder`, so a prior with a cache (the
  Transformer) feeds one new token per beam and position instead of the whole prefix.
* :func:`stochastic_beam_search` — Gumbel-top-k stochastic beam search (Kool,
  van Hoof & Welling 2019, arXiv:1903.06059) on ``p(z) = Σ_c p(c) p(z|c)``: ``N`` distinct latents
  that are an exact sample without replacement from ``p(z)``, in one pass over the
  positions, no enumeration.

Both keep scores in log space; beams live in tensors ``[G, b, h, w]``. The candidates of a
position are ranked in chunks of ``batch_size`` rows (beam × class).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from vq2pc.core.protocols import Prior, check_codes, num_positions, prior_device
from vq2pc.core.random import gumbel_noise

__all__ = ["BeamResult", "beam_search", "stochastic_beam_search"]

# keys(cand_h [g, j, C, K], parent keys [g, j], groups: slice) -> candidate keys [g, j, K]
KeyFn = Callable[[Tensor, Tensor, slice], Tensor]


@dataclass
class BeamResult:
    """Final beams: ``codes [G,b,h,w]``, per-class ``class_scores [G,b,C]`` = log p(z|c), ``keys [G,b]``."""

    codes: Tensor
    class_scores: Tensor
    keys: Tensor


def _topk_per_group(keys: Tensor, width: int) -> tuple[Tensor, Tensor]:
    """``keys [g, n]`` -> top ``min(width, n)`` values and indices per row."""
    return keys.topk(min(width, keys.shape[1]), dim=1)


def _expand(
    nlp: Tensor, h: Tensor, keys: Tensor, width: int, key_fn: KeyFn, batch_size: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Rank the children of every beam at one position of a batched beam search.

    ``nlp [G,b,C,K]``: log p(z_i = k | beam, c); ``h [G,b,C]``: log p(z_<i | c); ``keys [G,b]``: the
    beams' own keys. Every beam is extended by all K codes; per group the ``width`` candidates with the
    largest keys are kept. Work is chunked (≤ ``batch_size`` beam × class rows): a chunk is a block of
    groups × a slice of beams; chunk-local top-k results of a group are merged by a second top-k.
    Returns ``parent [G,b']`` (beam index within the group), ``token [G,b']``, ``h [G,b',C]``
    and ``keys [G,b']``, with ``b' = min(width, b·K)``.
    """
    G, b, C, K = nlp.shape
    parents = max(1, batch_size // C)
    beam_step = min(b, parents)
    group_step = max(1, parents // beam_step)
    out_parent, out_token, out_h, out_keys = [], [], [], []
    for g0 in range(0, G, group_step):
        gs = slice(g0, min(G, g0 + group_step))
        part_keys, part_idx, part_h = [], [], []
        for j0 in range(0, b, beam_step):
            js = slice(j0, min(b, j0 + beam_step))
            cand_h = h[gs, js, :, None] + nlp[gs, js]  # [g, j, C, K]
            g, j = cand_h.shape[:2]
            top, idx = _topk_per_group(key_fn(cand_h, keys[gs, js], gs).reshape(g, j * K), width)
            flat_h = cand_h.permute(0, 1, 3, 2).reshape(g, j * K, C)
            part_keys.append(top)
            part_idx.append(idx + j0 * K)  # candidate index j·K + k within the group
            part_h.append(flat_h.gather(1, idx[:, :, None].expand(-1, -1, C)))
        top, sel = _topk_per_group(torch.cat(part_keys, 1), width)
        idx = torch.cat(part_idx, 1).gather(1, sel)
        out_keys.append(top)
        out_parent.append(idx // K)
        out_token.append(idx % K)
        out_h.append(torch.cat(part_h, 1).gather(1, sel[:, :, None].expand(-1, -1, C)))
    return torch.cat(out_parent), torch.cat(out_token), torch.cat(out_h), torch.cat(out_keys)


def _search(
    prior: Prior, flat: Tensor, h: Tensor, keys: Tensor, start: int, width: int, key_fn: KeyFn, batch_size: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Positions ``start..P-1`` of a batched beam search from one beam per group.

    ``flat [G,1,P]`` partial grids (positions ``< start`` fixed), ``h [G,1,C]``, ``keys [G,1]``.
    Returns the final ``flat [G,b,P]``, ``h [G,b,C]``, ``keys [G,b]``.
    """
    G, C = flat.shape[0], prior.num_classes
    if start == flat.shape[2]:
        return flat, h, keys
    classes = torch.arange(C, device=flat.device).expand(G, C)
    state, nlp = prior.start(classes, flat[:, 0, :start], batch_size=batch_size)
    for i in range(start, flat.shape[2]):
        b = flat.shape[1]
        parent, token, h, keys = _expand(nlp.reshape(G, b, C, prior.K), h, keys, width, key_fn, batch_size)
        flat = flat.gather(1, parent[:, :, None].expand(-1, -1, flat.shape[2])).clone()
        flat[:, :, i] = token
        rows = (parent + torch.arange(G, device=parent.device)[:, None] * b).reshape(-1)
        state, nlp = prior.step(prior.reorder(state, rows), token.reshape(-1))
    return flat, h, keys


def _start(
    prior: Prior, codes: Tensor, class_scores: Tensor, start: int, width: int, class_log_weights: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """Checked inputs of a batched search: ``flat [G,1,P]``, ``h [G,1,C]`` and the score's ``lw [G,C]``."""
    G, P = codes.shape[0], num_positions(prior)
    codes = check_codes(codes, prior.K, prior.latent_hw, "codes").to(prior_device(prior))
    if width < 1:
        raise ValueError(f"beam width must be >= 1, got {width}")
    if not 0 <= start <= P:
        raise ValueError(f"start={start} outside [0, {P}]")
    if class_scores.shape != (G, prior.num_classes):
        raise ValueError(f"class_scores must have shape [{G}, {prior.num_classes}], got {tuple(class_scores.shape)}")
    lw = prior.class_log_prior if class_log_weights is None else class_log_weights.to(codes.device)
    lw = lw.float().expand(G, prior.num_classes)
    return codes.flatten(1)[:, None].clone(), class_scores.float().to(codes.device)[:, None], lw


@torch.inference_mode()
def beam_search(
    prior: Prior,
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
    flat, h, lw = _start(prior, codes, class_scores, start, width, class_log_weights)

    def marginal(cand_h: Tensor, parent_keys: Tensor, gs: slice) -> Tensor:
        return torch.logsumexp(cand_h + lw[gs, None, :, None], dim=2)

    keys = torch.logsumexp(h + lw[:, None], dim=2)
    flat, h, keys = _search(prior, flat, h, keys, start, width, marginal, batch_size)
    return BeamResult(flat.view(codes.shape[0], -1, *prior.latent_hw), h, keys)


def _log1mexp(a: Tensor) -> Tensor:
    """log(1 - exp(a)) for a ≤ 0, numerically stable (Mächler 2012)."""
    return torch.where(a > -0.6931471805599453, torch.log(-torch.expm1(a)), torch.log1p(-torch.exp(a)))


@torch.inference_mode()
def stochastic_beam_search(
    prior: Prior,
    codes: Tensor,
    class_scores: Tensor,
    start: int,
    width: int,
    generator: torch.Generator | None = None,
    class_log_weights: Tensor | None = None,
    batch_size: int = 16384,
) -> BeamResult:
    """Gumbel-top-k stochastic beam search (Kool et al. 2019) for ``G`` independent searches at once.

    Same inputs as :func:`beam_search`. Each group's final beams are ``min(width, K^{HW-start})``
    distinct completions of its partial grid, an exact sample without replacement from the score's
    distribution over them: ``m(z) = Σ_c w_c p(z | c)`` restricted to the group's prefix (the default
    ``w_c = p(c)`` gives ``p(z)``; a one-hot row, ``p(z | c)``). Every prefix ``y`` carries
    ``φ(y) = log m(y)`` and a perturbed ``G(y)``; children get ``G_φ = φ + Gumbel`` conditioned on
    their maximum equal to the parent's ``G`` (Eq. 10 of Kool et al., the stable form of their
    App. B), and the top ``width`` survive. Beams are in decreasing ``G`` (the sampling order);
    ``keys`` = ``G``.
    """
    flat, h, lw = _start(prior, codes, class_scores, start, width, class_log_weights)

    def perturbed(cand_h: Tensor, g_par: Tensor, gs: slice) -> Tensor:
        phi = torch.logsumexp(cand_h.double() + lw[gs, None, :, None].double(), dim=2)  # [g, j, K]
        g_phi = phi + gumbel_noise(tuple(phi.shape), generator, phi.device).double()
        z_max = g_phi.max(dim=2, keepdim=True).values
        g_par = g_par[:, :, None]
        v = g_par - g_phi + _log1mexp(g_phi - z_max)
        return g_par - v.clamp_min(0) - torch.log1p(torch.exp(-v.abs()))

    root_g = torch.zeros(flat.shape[:2], dtype=torch.float64, device=flat.device)  # any value: one root per group
    flat, h, keys = _search(prior, flat, h, root_g, start, width, perturbed, batch_size)
    return BeamResult(flat.view(codes.shape[0], -1, *prior.latent_hw), h, keys)
