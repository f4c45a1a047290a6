"""Exact ``log p(z)`` for every latent of a small grid (all ``K^{HW}`` of them).

Order: row-major lexicographic, ``index = Σ_i z_i · K^{HW-1-i}`` (position ``i``
row-major), so ``index_to_codes(arange(K^{HW}))`` lists the grids in output order.

Method: a prefix tree over positions, expanded breadth-first and in chunks. At
depth ``d`` every prefix ``z_<d`` (for every class, in the same prior call)
gets one :meth:`~vq2pc.core.protocols.Prior.next_log_probs_all_classes` evaluation, which scores all ``K``
children at once: ``log p(z_≤d | c) = log p(z_<d | c) + log p(z_d | z_<d, c)``.
At the last position the per-class scores are combined at once with
``logsumexp_c(log p(c) + ·)`` into the output slice, so nothing of size
``C·K^{HW}`` is ever stored; when a level's frontier would exceed
``frontier_rows`` it is split into groups of consecutive prefixes (whose
subtrees are consecutive output slices) handled one after another.
Prior calls: ``C · Σ_{d<HW} K^d`` rows (``≈ C·K^{HW-1}``).

Sharded (under ``torchrun``, :mod:`vq2pc.core.distributed`): rank ``r`` expands only the
subtrees whose first code lies in its :func:`~vq2pc.core.distributed.shard_range` of ``K``
(a consecutive output slice), the other entries stay ``-inf``, and one max all-reduce
assembles the whole vector on every rank.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from vq2pc.core.distributed import all_reduce_max_, is_distributed, is_main, shard_range
from vq2pc.core.protocols import Prior, num_positions, prior_device

__all__ = ["latent_space_size", "check_space", "index_to_codes", "codes_to_index", "enumerate_log_prior"]


def latent_space_size(K: int, h: int, w: int) -> int:
    """``K^{h·w}`` as an exact Python integer."""
    return int(K) ** (int(h) * int(w))


def check_space(K: int, h: int, w: int, max_space: int) -> int:
    """Return ``K^{hw}``; raise ``ValueError`` naming the size when it exceeds ``max_space``."""
    space = latent_space_size(K, h, w)
    if space > max_space:
        raise ValueError(
            f"latent space K^(HW) = {K}^{h * w} = {space} exceeds max_space = {max_space}; "
            "raise max_space or use a strategy that does not enumerate (sample, beam, gumbel)"
        )
    return space


def _powers(K: int, P: int, device: torch.device | str) -> Tensor:
    if latent_space_size(K, 1, P) >= 2**63:
        raise ValueError(f"K^(HW) = {K}^{P} does not fit a 64-bit index")
    return torch.tensor([K ** (P - 1 - i) for i in range(P)], dtype=torch.long, device=device)


def index_to_codes(idx: Tensor, K: int, h: int, w: int) -> Tensor:
    """Lexicographic indices ``[n]`` -> code grids ``[n, h, w]`` (inverse of :func:`codes_to_index`)."""
    powers = _powers(K, h * w, idx.device)
    space = latent_space_size(K, h, w)
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= space):
        raise ValueError(f"idx outside [0, K^(HW) = {space})")
    return (idx.long()[:, None] // powers % K).view(-1, h, w)


def codes_to_index(z: Tensor, K: int) -> Tensor:
    """Code grids ``[n, h, w]`` -> lexicographic indices ``[n]`` (row-major, first position most significant)."""
    if z.dim() != 3:
        raise ValueError(f"z must have shape [n, h, w], got {tuple(z.shape)}")
    if z.numel() and (int(z.min()) < 0 or int(z.max()) >= K):
        raise ValueError(f"z has codes outside [0, K={K})")
    powers = _powers(K, z.shape[1] * z.shape[2], z.device)
    return (z.long().flatten(1) * powers).sum(1)


class _Enumerator:
    """State of one enumeration: the prior, the output vector, chunk sizes and progress."""

    def __init__(self, prior: Prior, out: Tensor, batch_size: int, frontier_rows: int, bar: tqdm) -> None:
        self.prior, self.out, self.bar = prior, out, bar
        self.K, self.C, self.P = prior.K, prior.num_classes, num_positions(prior)
        self.step = max(1, batch_size // self.C)  # prefixes per prior call (each repeated over C classes)
        self.frontier_rows = frontier_rows
        self.log_pc = prior.class_log_prior.float()

    def next_all(self, codes: Tensor, d: int) -> Tensor:
        """``[n, C, K]`` log p(z_d = k | prefix, c) for a chunk of prefixes ``[n, h, w]``."""
        self.bar.update(codes.shape[0] * self.C)
        return self.prior.next_log_probs_all_classes(codes, d)

    def expand(self, codes: Tensor, scores: Tensor, d: int, offset: int) -> None:
        """Fill ``out[offset : offset + n·K^{P-d}]`` for prefixes ``codes [n,h,w]`` with scores ``[n, C]``."""
        n, K = codes.shape[0], self.K
        if d == self.P - 1:
            for a in range(0, n, self.step):
                total = scores[a : a + self.step, :, None] + self.next_all(codes[a : a + self.step], d)
                total += self.log_pc[:, None]
                rows = slice(offset + a * K, offset + (a + total.shape[0]) * K)
                if self.out.dim() == 2:  # per class: [n, C, K] -> [n·K, C]
                    self.out[rows] = total.transpose(1, 2).reshape(-1, self.C)
                else:
                    self.out[rows] = torch.logsumexp(total, 1).flatten()
            return
        group = max(1, self.frontier_rows // (K * self.C))
        if n > group:  # split the frontier: consecutive prefixes own consecutive output slices
            span = K ** (self.P - d)
            for a in range(0, n, group):
                self.expand(codes[a : a + group], scores[a : a + group], d, offset + a * span)
            return
        nlp = torch.cat([self.next_all(codes[a : a + self.step], d) for a in range(0, n, self.step)])
        child_scores = (scores[:, :, None] + nlp).transpose(1, 2).reshape(n * K, self.C)
        children = codes.repeat_interleave(K, dim=0)
        children.view(n * K, -1)[:, d] = torch.arange(K, device=codes.device).repeat(n)
        self.expand(children, child_scores, d + 1, offset)

    def expand_first(self, root: Tensor, lo: int, hi: int) -> None:
        """Fill ``out[lo·K^{P-1} : hi·K^{P-1}]``: the subtrees whose first code lies in ``[lo, hi)`` (P >= 2;
        empty on a rank left without codes when K < ranks)."""
        if hi <= lo:
            return
        child_scores = self.next_all(root, 0)[0].T[lo:hi]  # [hi-lo, C]: the root's score is 0
        children = root.repeat(hi - lo, 1, 1)
        children.view(hi - lo, -1)[:, 0] = torch.arange(lo, hi, device=root.device)
        self.expand(children, child_scores, 1, lo * self.K ** (self.P - 1))


@torch.inference_mode()
def enumerate_log_prior(
    prior: Prior,
    batch_size: int = 16384,
    device: str | torch.device | None = None,
    progress: bool = True,
    max_space: int = 2**27,
    frontier_rows: int = 2**22,
    sharded: bool | None = None,
    per_class: bool = False,
) -> Tensor:
    """``[K^{HW}]`` float32 ``log p(z)`` of every latent, in lexicographic order (see module docstring).
    ``per_class``: ``[K^{HW}, C]`` ``log p(c) + log p(z | c)`` instead (same prior calls; C times the memory).

    ``batch_size``: rows (prefix × class) per prior call. ``device``: where to
    compute (the prior is moved there; default: the prior's device).
    ``frontier_rows``: bound on prefix × class rows held per tree level.
    ``sharded``: split the work over the ranks of the process group (default: when one runs;
    then every rank must call this, and every rank gets the whole vector).
    Raises ``ValueError`` when ``K^{HW}`` exceeds ``max_space``.
    """
    h, w = prior.latent_hw
    space = check_space(prior.K, h, w, max_space)
    if batch_size < 1 or frontier_rows < 1:
        raise ValueError(f"batch_size and frontier_rows must be >= 1, got {batch_size}, {frontier_rows}")
    if device is not None:
        prior.to(device)
    if space > MEMO_SPACE or not isinstance(prior, torch.nn.Module):
        return _enumerate(prior, space, per_class, batch_size, frontier_rows, progress, sharded)
    key, memos = _memo_key(prior), _MEMO.setdefault(prior, {})
    memo = memos.get(per_class)
    if memo is None or memo[0] != key:
        memo = key, _enumerate(prior, space, per_class, batch_size, frontier_rows, progress, sharded)
        memos[per_class] = memo
    return memo[1].clone()


MEMO_SPACE = 2**22
"""Latent spaces up to this size keep their last enumeration per prior and kind (``_MEMO``), reused while the prior's
weights are unchanged (same tensor versions and device): the pipeline asks for ``p(z)`` of one prior from ExM,
top-k selection at every N, latent usage and the class weights."""
_MEMO: weakref.WeakKeyDictionary[Any, dict[bool, tuple[tuple[Any, ...], Tensor]]] = weakref.WeakKeyDictionary()


def _memo_key(prior: torch.nn.Module) -> tuple[Any, ...]:
    """What an enumeration depends on besides the prior's identity: its tensors' in-place versions and device."""
    tensors = [*prior.parameters(), *prior.buffers()]
    return (str(prior_device(prior)), tuple((id(t), t._version) for t in tensors))


def _enumerate(
    prior: Prior,
    space: int,
    per_class: bool,
    batch_size: int,
    frontier_rows: int,
    progress: bool,
    sharded: bool | None,
) -> Tensor:
    """The enumeration itself (see :func:`enumerate_log_prior`)."""
    h, w = prior.latent_hw
    dev = prior_device(prior)
    was_training = prior.training
    prior.eval()
    out = torch.empty((space, prior.num_classes) if per_class else (space,), dtype=torch.float32, device=dev)
    calls = prior.num_classes * sum(prior.K**d for d in range(num_positions(prior)))
    with tqdm(total=calls, desc="enumerate p(z)", unit="row", disable=not (progress and is_main()), leave=False) as bar:
        state = _Enumerator(prior, out, batch_size, frontier_rows, bar)
        root = torch.zeros((1, h, w), dtype=torch.long, device=dev)
        if (is_distributed() if sharded is None else sharded) and num_positions(prior) > 1:
            out.fill_(-torch.inf)
            state.expand_first(root, *shard_range(prior.K))
            all_reduce_max_(out)
        else:
            state.expand(root, torch.zeros((1, prior.num_classes), device=dev), 0, 0)
    prior.train(was_training)
    return out
