"""Selection of the N latents that become the mixture components of the distilled circuit.

Strategies (``select(prior, strategy, N, ...)``):

* ``exhaustive`` (ExM): all ``K^{HW}`` latents with their exact ``log p(z)`` (enumeration);
  use ``log_weights("prior")`` for the exact model. ``N`` is ignored.
* ``sample`` (DMRS): ``N`` distinct latents, ``c ~ U(C)``, ``z ~ p(z|c)`` — drawn by ancestral
  sampling WITHOUT enumeration: batches of i.i.d. draws, duplicates rejected, the first ``N``
  distinct latents in draw order kept. The sequence of first appearances of i.i.d. draws is
  exactly successive sampling without replacement from ``q(z) = Σ_c (1/C) p(z|c)``, i.e. the
  paper's procedure (sample, keep distinct).
* ``gumbel`` (beyond the paper): Gumbel-top-k stochastic beam search, ``N`` distinct latents that
  are an exact sample without replacement from ``p(z) = Σ_c p(c) p(z|c)`` in one pass (no
  rejection, so it also works when the prior is very concentrated).
* ``beam`` (DMBS, Algorithms 1 + 2): for every class ``c``, ``starts`` first tokens
  ``z_1 ~ p(z_1 | c)``; from each, a beam search of width ``N // (starts·C)`` ranked by
  ``p(z_≤i | c)`` (``beam_score="class"``, Algorithm 1 read literally) or by ``p(z_≤i)``
  (``"marginal"``), keeping the best ``B`` beams per position (``beam_search="deterministic"``,
  Algorithm 2) or sampling them without replacement (``"stochastic"``); see :mod:`vq2pc.latents.dmbs`.
* ``topk``: the ``N`` latents of highest ``p(z)`` — exact by enumeration when ``K^{HW} ≤
  max_space``, otherwise a deterministic beam search of width ``N`` on ``p(z)`` (approximate;
  ``info["exact"]`` says which).
* ``data`` (beyond the paper): the distinct codes the encoder assigned to the training set
  (``codes_from_data``), most frequent first; ``log_prior`` holds the log empirical frequency.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from vq2pc.core.distributed import (
    all_reduce_max_,
    gather_rows,
    is_distributed,
    rank,
    shard_range,
    world_size,
)
from vq2pc.core.protocols import Prior, check_codes, num_positions, prior_device
from vq2pc.core.random import randint
from vq2pc.latents.beam import beam_search, stochastic_beam_search
from vq2pc.latents.dmbs import BEAM_SCORES, BEAM_SEARCHES, select_dmbs
from vq2pc.latents.enumerate import (
    check_space,
    enumerate_log_prior,
    index_to_codes,
    latent_space_size,
)

__all__ = ["BEAM_SCORES", "BEAM_SEARCHES", "STRATEGIES", "WEIGHTS", "Selection", "SelectionShortfall", "select"]

STRATEGIES = ("exhaustive", "sample", "gumbel", "beam", "topk", "data")
WEIGHTS = ("uniform", "prior")


@dataclass
class Selection:
    """Selected latents: ``codes [N,h,w]`` (distinct), ``log_prior [N]``, the strategy, and extra ``info``.

    ``classes [N]``: the class each latent was drawn for (DMRS: the class of its first draw; DMBS: the class
    of its search; -1 unknown), None when the strategy draws no class. ``class_log_joint [N, C]``:
    ``log p(c) + log p(z_n | c)`` when selected with ``classes=True`` (class-aware circuits)."""

    codes: Tensor
    log_prior: Tensor
    strategy: str
    info: dict[str, Any] = field(default_factory=dict)
    classes: Tensor | None = None
    class_log_joint: Tensor | None = None

    def __post_init__(self) -> None:
        if self.codes.dim() != 3 or self.log_prior.shape != (self.codes.shape[0],):
            raise ValueError(
                f"Selection needs codes [N,h,w] and log_prior [N], got "
                f"{tuple(self.codes.shape)} and {tuple(self.log_prior.shape)}"
            )

    def __len__(self) -> int:
        return self.codes.shape[0]

    def log_weights(self, weights: str = "uniform") -> Tensor:
        """``[N]`` normalized log mixture weights: ``uniform`` (paper Eq. 2) or ``prior`` (p(z) renormalized)."""
        if weights == "uniform":
            return torch.full_like(self.log_prior, -torch.log(torch.tensor(float(len(self)))).item())
        if weights == "prior":
            return torch.log_softmax(self.log_prior.double(), 0).to(self.log_prior.dtype)
        raise ValueError(f"weights must be one of {WEIGHTS}, got {weights!r}")


def _check_n(N: int | None, space: int) -> int:
    if N is None or int(N) < 1:
        raise ValueError(f"N must be a positive integer, got {N}")
    if int(N) > space:
        raise ValueError(f"N={N} exceeds the latent space K^(HW)={space}")
    return int(N)


def _log_prob(prior: Prior, codes: Tensor, batch_size: int) -> Tensor:
    """``[N]`` log p(z) = log Σ_c p(c) p(z|c) of codes ``[N,h,w]``."""
    with torch.inference_mode():
        return torch.logsumexp(prior.log_prob_all_classes(codes, batch_size) + prior.class_log_prior, dim=1)


def _first_distinct(collected: Tensor, draws: Tensor, need: int) -> tuple[Tensor, Tensor]:
    """Rows of ``draws [m,P]`` not in ``collected [n,P]`` and not repeated, in order of first appearance,
    at most ``need`` of them, and their indices into ``draws``."""
    rows = torch.cat([collected, draws])
    _, inverse = torch.unique(rows, dim=0, return_inverse=True)
    order = torch.arange(rows.shape[0], device=rows.device)
    first = torch.full((int(inverse.max()) + 1,), rows.shape[0], device=rows.device, dtype=torch.long)
    first = first.scatter_reduce(0, inverse, order, reduce="amin")
    new = first[first >= collected.shape[0]].sort().values[:need]
    return rows[new], new - collected.shape[0]


class SelectionShortfall(ValueError):
    """A strategy could not find ``N`` distinct latents (the prior's mass sits on fewer)."""


def _rank_stream(generator: torch.Generator | None, dev: torch.device) -> torch.Generator:
    """This rank's own generator under torch.distributed: a seed drawn from ``generator`` (agreed across
    ranks), offset by the rank, so the ranks draw disjoint streams."""
    seed = randint(2**62, (1,), generator, dev)
    base = int(all_reduce_max_(seed))  # the same on every rank even if their generators differ
    gen_device = generator.device if generator is not None else dev
    return torch.Generator(device=gen_device).manual_seed(base + 1 + rank())


def _select_sample(
    prior: Prior, N: int, generator: torch.Generator | None, batch_size: int, max_draws_per_latent: int = 256
) -> tuple[Tensor, Tensor, dict[str, Any]]:
    """DMRS: first ``N`` distinct of i.i.d. draws ``c ~ U(C), z ~ p(z|c)``; draw batches double in size.
    Returns the codes, the class of each one's first draw, and ``info``.

    Under torch.distributed each rank draws its slice of every batch from its own stream and the slices
    are gathered in rank order, so every rank deduplicates the same draws and returns the same latents."""
    dev, P = prior_device(prior), num_positions(prior)
    sharded = is_distributed() and world_size() > 1
    if sharded:
        generator = _rank_stream(generator, dev)
    collected = torch.empty((0, P), dtype=torch.long, device=dev)
    classes = torch.empty((0,), dtype=torch.long, device=dev)
    draws, size, limit = 0, 2 * N, max_draws_per_latent * N + 1024
    while collected.shape[0] < N and draws < limit:
        size = min(size, limit - draws)
        lo, hi = shard_range(size) if sharded else (0, size)
        c = randint(prior.num_classes, (hi - lo,), generator, dev)
        z = prior.sample(c, generator=generator, batch_size=batch_size).flatten(1)
        z, c = (gather_rows(z), gather_rows(c)) if sharded else (z, c)
        rows, picked = _first_distinct(collected, z, N - collected.shape[0])
        collected, classes = torch.cat([collected, rows]), torch.cat([classes, c[picked]])
        draws, size = draws + size, 2 * size
    if collected.shape[0] < N:
        raise SelectionShortfall(
            f"sample: only {collected.shape[0]} distinct latents in {draws} draws, N={N} requested; the prior "
            "concentrates its mass on fewer latents - lower N, or use strategy 'gumbel' (no rejection) or 'topk'"
        )
    return collected.view(N, *prior.latent_hw), classes, {"draws": draws}


def _select_topk(prior: Prior, N: int, max_space: int, batch_size: int) -> tuple[Tensor, Tensor, dict[str, Any]]:
    """Top-N by p(z): exact by enumeration within ``max_space``, else a width-N beam on p(z) (approximate)."""
    h, w = prior.latent_hw
    if latent_space_size(prior.K, h, w) <= max_space:
        log_p = enumerate_log_prior(prior, batch_size=batch_size, progress=False, max_space=max_space)
        log_prior, idx = log_p.topk(N)
        return index_to_codes(idx, prior.K, h, w), log_prior, {"exact": True}
    result = beam_search(prior, *_root(prior), 0, N, batch_size=batch_size)
    return result.codes[0], result.keys[0], {"exact": False}


def _root(prior: Prior) -> tuple[Tensor, Tensor]:
    """One empty grid ``[1,h,w]`` and its class scores ``[1,C]`` (zeros): a search from the first position."""
    dev = prior_device(prior)
    return (
        torch.zeros((1, *prior.latent_hw), dtype=torch.long, device=dev),
        torch.zeros((1, prior.num_classes), device=dev),
    )


def _select_data(prior: Prior, N: int | None, codes_from_data: Tensor | None) -> tuple[Tensor, Tensor]:
    if codes_from_data is None:
        raise ValueError("strategy 'data' needs codes_from_data [n,h,w] (the encoder's training-set codes)")
    codes = check_codes(codes_from_data, prior.K, prior.latent_hw, "codes_from_data").to(prior_device(prior))
    if codes.shape[0] == 0:
        raise ValueError("codes_from_data is empty")
    unique, counts = torch.unique(codes.flatten(1), dim=0, return_counts=True)
    order = torch.sort(counts, descending=True, stable=True).indices
    if N is not None and not 1 <= int(N) <= unique.shape[0]:
        raise ValueError(f"N={N} must be in [1, {unique.shape[0]}] (distinct codes in codes_from_data)")
    keep = order[: unique.shape[0] if N is None else int(N)]
    log_freq = (counts[keep].double() / codes.shape[0]).log().float()
    return unique[keep].view(-1, *prior.latent_hw), log_freq


def _dispatch(
    prior: Prior,
    strategy: str,
    N: int | None,
    starts: int,
    beam: tuple[str, str],
    generator: torch.Generator | None,
    max_space: int,
    codes_from_data: Tensor | None,
    batch_size: int,
) -> tuple[Tensor, Tensor, dict[str, Any], Tensor | None]:
    """Run one strategy; returns ``codes [N,h,w]``, ``log_prior [N]``, ``info`` and the drawn ``classes [N]``
    (None where the strategy draws no class)."""
    h, w = prior.latent_hw
    space = latent_space_size(prior.K, h, w)
    info: dict[str, Any] = {}
    classes = None
    if strategy == "exhaustive":
        check_space(prior.K, h, w, max_space)
        log_prior = enumerate_log_prior(prior, batch_size=batch_size, progress=False, max_space=max_space)
        codes = index_to_codes(torch.arange(space, device=prior_device(prior)), prior.K, h, w)
    elif strategy == "data":
        codes, log_prior = _select_data(prior, N, codes_from_data)
    else:
        N = _check_n(N, space)
        if strategy == "sample":
            codes, classes, info = _select_sample(prior, N, generator, batch_size)
            log_prior = _log_prob(prior, codes, batch_size)
        elif strategy == "gumbel":
            result = stochastic_beam_search(prior, *_root(prior), 0, N, generator, batch_size=batch_size)
            codes = result.codes[0]
            log_prior = torch.logsumexp(result.class_scores[0] + prior.class_log_prior, 1)
        elif strategy == "beam":
            codes, log_prior, info, classes = select_dmbs(prior, N, starts, generator, batch_size, *beam)
        else:
            codes, log_prior, info = _select_topk(prior, N, max_space, batch_size)
    return codes, log_prior, info, classes


def select(
    prior: Prior,
    strategy: str,
    N: int | None,
    *,
    starts: int = 10,
    beam_score: str = "class",
    beam_search: str = "deterministic",
    generator: torch.Generator | None = None,
    max_space: int = 2**24,
    codes_from_data: Tensor | None = None,
    device: str | torch.device | None = None,
    batch_size: int = 16384,
    classes: bool = False,
) -> Selection:
    """Select latents with ``strategy`` (see the module docstring); returns a :class:`Selection`.

    ``N``: number of latents (ignored by ``exhaustive``; ``None`` = all distinct codes for ``data``).
    ``starts``: start tokens per class for ``beam``; ``beam_score``: its score, ``"class"`` (Algorithm 1)
    or ``"marginal"``; ``beam_search``: ``"deterministic"`` (Algorithm 2) or ``"stochastic"`` (Gumbel-top-k).
    ``generator``: randomness of ``sample``,
    ``gumbel``, ``beam``. ``max_space``: largest ``K^{HW}`` enumerated (``exhaustive``, exact
    ``topk``). ``device``: where to compute (the prior is moved there). ``batch_size``: prior rows
    per call. ``classes``: also keep ``log p(c) + log p(z_n | c)`` of every latent and class
    (``Selection.class_log_joint [N, C]``, for class-aware circuits).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if device is not None:
        prior.to(device)
    was_training = prior.training
    prior.eval()
    try:
        codes, log_prior, info, drawn = _dispatch(
            prior, strategy, N, starts, (beam_score, beam_search), generator, max_space, codes_from_data, batch_size
        )
        joint = None
        if classes:
            if strategy == "exhaustive":  # the enumeration's prefix tree: ~C·K^{HW-1} prior rows, not C·K^{HW}
                joint = enumerate_log_prior(
                    prior, batch_size=batch_size, progress=False, max_space=max_space, per_class=True
                )
            else:
                with torch.inference_mode():
                    joint = prior.log_prob_all_classes(codes, batch_size).float() + prior.class_log_prior.float()
    finally:
        prior.train(was_training)
    return Selection(
        codes=codes, log_prior=log_prior.float(), strategy=strategy, info=info, classes=drawn, class_log_joint=joint
    )
