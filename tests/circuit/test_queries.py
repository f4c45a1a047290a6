"""The block queries equal their one-block formulas however the components are cut, and a posterior draw
follows p(n | x_o)."""

from __future__ import annotations

import itertools

import pytest
import torch

from vq2pc.circuit.queries import log_marginal, posterior_draw, posterior_mean
from vq2pc.circuit.streaming import Scratch


def _blocks(scores: torch.Tensor, means: torch.Tensor, cuts: list[int]):
    """Blocks of ``scores [B, N]`` and ``means [N, S]`` cut at ``cuts`` (scores copied: queries may overwrite)."""
    edges = [0, *cuts, scores.shape[1]]
    for a, b in itertools.pairwise(edges):
        yield a, scores[:, a:b].clone(), lambda a=a, b=b: means[a:b]


@pytest.mark.parametrize("cuts", [[], [1], [3, 4, 9], list(range(1, 12))])
def test_log_marginal_and_posterior_mean_do_not_depend_on_the_blocks(cuts: list[int]) -> None:
    g = torch.Generator().manual_seed(0)
    scores, means = (
        torch.randn(5, 12, generator=g, dtype=torch.float64) * 30,
        torch.randn(12, 3, generator=g, dtype=torch.float64),
    )
    scores[0, :6] = -torch.inf  # a row whose first blocks hold no mass
    torch.testing.assert_close(log_marginal(_blocks(scores, means, cuts)), torch.logsumexp(scores, 1))
    torch.testing.assert_close(posterior_mean(_blocks(scores, means, cuts)), torch.softmax(scores, 1) @ means)


def test_posterior_draw_follows_the_posterior() -> None:
    scores = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4]])).expand(20000, 4)
    gen = torch.Generator().manual_seed(1)
    idx = posterior_draw(_blocks(scores, torch.zeros(4, 1), [1, 3]), gen, Scratch())
    freq = torch.bincount(idx, minlength=4).double() / len(idx)
    torch.testing.assert_close(freq, torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64), atol=0.015, rtol=0)
