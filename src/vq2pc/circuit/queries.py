"""Queries defined once over a mixture's component blocks, for :class:`~vq2pc.circuit.MixtureCircuit` and
:class:`~vq2pc.circuit.exact.ExactModel` alike (as cirkit defines its queries as small functions over a circuit).

A *block* of components, for prepared rows ``x [B, S]`` and their mask, is ``(n0, scores, means)``:
``scores [B, n]`` = ``log w_n + log p(x_o | n)`` for components ``n0 .. n0+n-1`` (a scratch view, used
before the next block is asked for), and ``means()`` their means ``[n, S]``. A circuit's blocks are
column slices of its leaves; the exact model's are decoded chunks of the latent space. Each query is
an exact running reduction over the blocks, so its result does not depend on how they are cut.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor

from vq2pc.circuit.streaming import RunningArgmax, Scratch, SoftmaxWeightedSum, add_gumbel_, logsumexp_

__all__ = ["Block", "log_marginal", "posterior_mean", "posterior_draw"]

Block = tuple[int, Tensor, Callable[[], Tensor]]


def log_marginal(blocks: Iterable[Block]) -> Tensor:
    """``[B]`` log Σ_n w_n p(x_o | n): a running log-add-exp over the blocks."""
    lse = None
    for _, s, _ in blocks:
        part = logsumexp_(s)
        lse = part if lse is None else torch.logaddexp(lse, part)
    return lse


def posterior_mean(blocks: Iterable[Block], acc_dtype: torch.dtype | None = None) -> Tensor:
    """``[B, S]`` Σ_n p(n | x_o) E[x | n], accumulated in ``acc_dtype`` (default: the scores')."""
    acc = SoftmaxWeightedSum(acc_dtype)
    for _, s, means in blocks:
        acc.add(s, means())
    return acc.result()


def posterior_draw(blocks: Iterable[Block], generator: torch.Generator | None, scratch: Scratch) -> Tensor:
    """``[B]`` one component per row drawn from p(n | x_o): Gumbel-max over the blocks (scores overwritten)."""
    best = RunningArgmax()
    for n0, s, _ in blocks:
        best.add(add_gumbel_(s, generator, scratch), n0)
    return best.result()
