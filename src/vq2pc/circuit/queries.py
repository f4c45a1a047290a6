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

from vq2pc.circuit.io import check_sample_args
from vq2pc.circuit.streaming import RunningArgmax, Scratch, SoftmaxWeightedSum, add_gumbel_, logsumexp_

__all__ = ["Block", "log_marginal", "posterior_mean", "posterior_draw", "Sampler"]

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


class Sampler:
    """``sample(n, x=, mask=)`` of every exact model (mixture, exact mixture, tree): the argument checks and the
    observed entries kept here, the draws in :meth:`_draw` / :meth:`_draw_given` of each model."""

    def _prepare(self, x: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Validated ``x [B, S]`` and its mask ``[B, S]`` (nonzero = observed) or None."""
        raise NotImplementedError

    def _draw(self, n: int, generator: torch.Generator | None) -> Tensor:
        """``[n, S]`` unconditional draws."""
        raise NotImplementedError

    def _draw_given(self, x: Tensor, mask: Tensor | None, generator: torch.Generator | None) -> Tensor:
        """``[B, S]`` one draw of every entry per row of the prepared ``x``, given its observed entries."""
        raise NotImplementedError

    def sample(
        self,
        n: int | None = None,
        *,
        x: Tensor | None = None,
        mask: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Exact samples ``[n, S]``; with ``x``/``mask``, one draw from p(x_u | x_o) per row, x_o kept (without
        ``mask`` every entry is redrawn given the whole row)."""
        if x is None:
            return self._draw(check_sample_args(n, x, mask), generator)
        xp, mp = self._prepare(x, mask)
        check_sample_args(n, x, mask, rows=xp.shape[0])
        draw = self._draw_given(xp, mp, generator)
        return draw if mp is None else torch.where(mp.bool(), xp, draw)
