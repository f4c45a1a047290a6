"""DMBS, the paper's Algorithm 1: class-conditioned beam searches from sampled first tokens.

For every class ``c``, ``starts`` first tokens ``z_1 ~ p(z_1 | c)`` are drawn i.i.d. (repeats
possible, as in the paper); from each, Algorithm 2 (:func:`~vq2pc.latents.beam.beam_search`)
completes positions ``2..HW`` with width ``B = N // (starts·C)``. ``score`` is what a search of
class ``c`` ranks its prefixes by:

* ``"class"`` (default): ``p(z_≤i | c)``, Algorithm 1's ``BeamSearch(z, p, {c}, ..)`` read
  literally: each class keeps its own likeliest completions;
* ``"marginal"``: ``p(z_≤i) = Σ_c' p(c') p(z_≤i | c')`` for every search, so the class only draws
  the first token (what vq2pc did before the literal reading was measured better on MNIST).

``search`` is how a search keeps its ``B`` beams per position:

* ``"deterministic"`` (default): Algorithm 2, the ``B`` best by the score;
* ``"stochastic"``: the Gumbel-top-k stochastic beam search (Kool et al. 2019,
  :func:`~vq2pc.latents.beam.stochastic_beam_search`), so each search returns ``B`` completions
  sampled without replacement from the score's distribution over its first token's subtree. The
  paper names Algorithm 1 "the class-conditioned stochastic BS"; this is that reading with an exact
  sampler. The deterministic beam keeps prototypes (latents one or two positions apart); the sampled
  one keeps the class structure and the budget, and diversifies within a class.

Searches with the same key (first token, and the class under ``"class"``) would return the same
latents: they run as ONE search of their summed width. The widths add up to exactly N (the
remainder N - starts·C·B goes one each to the first starts; width a first token's subtree of
K^{HW-1} latents cannot use goes to the other keys). Under ``"class"`` two classes can find the
same latent: it is kept once, and the searches are widened (by the shortfall, doubling) so that
their next latents (the next-best, or the next sampled), ranked by p(z), fill the gap. Every search runs batched: one prior call per
position for all keys of one width.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import torch
from torch import Tensor

from vq2pc.core.protocols import Prior, num_positions, prior_device
from vq2pc.core.random import gumbel_noise
from vq2pc.latents.beam import beam_search, stochastic_beam_search

__all__ = ["BEAM_SCORES", "BEAM_SEARCHES", "select_dmbs"]

BEAM_SCORES = ("class", "marginal")
BEAM_SEARCHES = ("deterministic", "stochastic")


def select_dmbs(
    prior: Prior,
    N: int,
    starts: int,
    generator: torch.Generator | None,
    batch_size: int,
    score: str = "class",
    search: str = "deterministic",
) -> tuple[Tensor, Tensor, dict[str, Any], Tensor]:
    """Algorithm 1: ``codes [n,h,w]`` (n ≤ N distinct latents), their ``log p(z) [n]``, best first,
    ``info`` (width, starts, score, search, distinct first tokens, shortfall and its reason when n < N) and
    ``classes [n]``, the class of the search that found each latent (its first finder; -1 under ``"marginal"``)."""
    C, dev = prior.num_classes, prior_device(prior)
    if starts < 1:
        raise ValueError(f"starts must be >= 1, got {starts}")
    if score not in BEAM_SCORES:
        raise ValueError(f"beam_score must be one of {list(BEAM_SCORES)}, got {score!r}")
    if search not in BEAM_SEARCHES:
        raise ValueError(f"beam_search must be one of {list(BEAM_SEARCHES)}, got {search!r}")
    width = N // (starts * C)
    if width < 1:
        raise ValueError(f"beam width B = N // (starts·C) = {N} // ({starts}·{C}) = 0 < 1; raise N or lower starts")
    with torch.inference_mode():
        root = torch.zeros((1, *prior.latent_hw), dtype=torch.long, device=dev)
        first = prior.next_log_probs_all_classes(root, 0)[0]  # [C, K] log p(z_1 = k | c)
        group_class = torch.arange(C, device=dev).repeat_interleave(starts)  # [G]
        noise = gumbel_noise((group_class.shape[0], prior.K), generator, dev)
        tokens = (first[group_class] + noise).argmax(1)  # z_1 ~ p(z_1 | c), i.i.d. per start
    classes = group_class.tolist() if score == "class" else [-1] * len(tokens)
    subtree = prior.K ** (num_positions(prior) - 1)
    budgets = _token_budgets(list(zip(classes, tokens.tolist())), N, width, subtree)
    extra = 0
    while True:
        codes, log_p, found_by = _fill(
            prior, *_searches(prior, first, budgets, extra, batch_size, search, generator), N
        )
        short = N - codes.shape[0]
        if short == 0 or max(budgets.values()) + extra >= subtree:  # filled, or every search holds its subtree
            break
        extra = max(2 * extra, short)
    info: dict[str, Any] = {
        "requested_N": N,
        "width": width,
        "starts": starts,
        "beam_score": score,
        "beam_search": search,
        "distinct_first_tokens": len({t for _, t in budgets}),
        "shortfall": short,
    }
    if short:
        info["shortfall_reason"] = (
            f"the drawn first tokens' subtrees (K^(HW-1) latents each) hold only "
            f"{codes.shape[0]} distinct latents < N = {N}"
        )
    return codes, log_p, info, found_by


def _token_budgets(keys: list[Hashable], N: int, width: int, subtree: int) -> dict[Hashable, int]:
    """Beam width per distinct search key: ``width`` per start, the remainder of N one each to the first
    starts, capped at the ``subtree`` size with the excess moved to keys with room."""
    budgets: dict[Hashable, int] = {}
    for g, key in enumerate(keys):
        budgets[key] = budgets.get(key, 0) + width + (g < N - width * len(keys))
    excess = sum(max(0, b - subtree) for b in budgets.values())
    for key in sorted(budgets):
        budgets[key] = min(budgets[key], subtree)
        room = min(excess, subtree - budgets[key])
        budgets[key], excess = budgets[key] + room, excess - room
    return budgets


def _searches(
    prior: Prior,
    first: Tensor,
    budgets: dict[Hashable, int],
    extra: int,
    batch_size: int,
    search: str,
    generator: torch.Generator | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Every key's ``search`` with width budget + ``extra``: ``codes [n,h,w]``, per-class ``scores [n,C]``,
    ``primary [n]`` (the latent is within its search's budget) and ``classes [n]`` (its search's class, or -1)."""
    dev, C = first.device, prior.num_classes
    codes_out, scores_out, primary_out, class_out = [], [], [], []
    for b in sorted(set(budgets.values())):  # one batched search per budget (a handful)
        group = torch.tensor([k for k, bt in budgets.items() if bt == b], dtype=torch.long, device=dev)  # [g, 2]
        codes = torch.zeros((group.shape[0], *prior.latent_hw), dtype=torch.long, device=dev)
        codes.view(group.shape[0], -1)[:, 0] = group[:, 1]
        args = (prior, codes, first[:, group[:, 1]].T, 1, b + extra)
        weights = _own_class(group[:, 0], C)
        result = (
            beam_search(*args, weights, batch_size)
            if search == "deterministic"
            else stochastic_beam_search(*args, generator, weights, batch_size)
        )
        g, kept = result.codes.shape[:2]
        codes_out.append(result.codes.reshape(-1, *prior.latent_hw))
        scores_out.append(result.class_scores.reshape(-1, C))
        primary_out.append((torch.arange(kept, device=dev) < b).repeat(g))
        class_out.append(group[:, 0].repeat_interleave(kept))
    return torch.cat(codes_out), torch.cat(scores_out), torch.cat(primary_out), torch.cat(class_out)


def _own_class(group_class: Tensor, C: int) -> Tensor | None:
    """Score weights of searches started for ``group_class [g]``: one-hot rows (log 1 at the own class,
    log 0 elsewhere, so m = p(z_≤i | c)); ``None`` (the class marginal) where the class is -1."""
    if bool((group_class < 0).all()):
        return None
    rows = torch.full((group_class.shape[0], C), float("-inf"), device=group_class.device)
    return rows.scatter_(1, group_class[:, None], 0.0)


def _fill(
    prior: Prior, codes: Tensor, scores: Tensor, primary: Tensor, classes: Tensor, N: int
) -> tuple[Tensor, Tensor, Tensor]:
    """The distinct latents within a search's budget, then the best others by p(z) up to N; best first;
    with the class of the search that found each first (``classes [n]`` per candidate)."""
    log_p = torch.logsumexp(scores + prior.class_log_prior, 1)
    _, inverse = torch.unique(codes.flatten(1), dim=0, return_inverse=True)
    U, n, dev = int(inverse.max()) + 1, codes.shape[0], codes.device
    first = torch.full((U,), n, device=dev).scatter_reduce(0, inverse, torch.arange(n, device=dev), "amin")
    chosen = torch.zeros(U, dtype=torch.bool, device=dev).index_fill_(0, inverse[primary], True)
    reserve = (~chosen).nonzero().flatten()
    fill = reserve[log_p[first[reserve]].argsort(descending=True)[: max(0, N - int(chosen.sum()))]]
    keep = first[torch.cat([chosen.nonzero().flatten(), fill])]
    keep = keep[log_p[keep].argsort(descending=True)]
    return codes[keep], log_p[keep], classes[keep]
