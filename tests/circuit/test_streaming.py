"""Block-wise reductions: equal to the one-shot computation for any blocking, -inf rows included."""

from __future__ import annotations

import math

import pytest
import torch

from vq2pc.circuit.streaming import (
    RunningArgmax,
    Scratch,
    SoftmaxWeightedSum,
    add_gumbel_,
    logsumexp_,
)


def _scores(seed: int = 0) -> torch.Tensor:
    """``[6, 40]`` scores with a wide range, one row of all -inf and one partly -inf row."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(6, 40, generator=g, dtype=torch.float64) * 50
    s[2] = -math.inf
    s[4, :25] = -math.inf
    return s


def test_logsumexp_in_place_equals_torch() -> None:
    s = _scores()
    ref = torch.logsumexp(s, 1)
    got = logsumexp_(s.clone())
    assert torch.equal(torch.isinf(got), torch.isinf(ref))
    torch.testing.assert_close(got, ref, rtol=1e-14, atol=0)


@pytest.mark.parametrize("block", [1, 7, 40])
def test_softmax_weighted_sum_is_independent_of_blocking(block: int) -> None:
    s = _scores(1)
    s[:, 30:] += 500.0  # the running maximum grows in a late block: old sums must be rescaled
    values = torch.randn(40, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    acc = SoftmaxWeightedSum()
    for n0 in range(0, 40, block):
        acc.add(s[:, n0 : n0 + block].clone(), values[n0 : n0 + block])
    got = acc.result()
    ref = torch.softmax(s, 1) @ values
    finite = torch.isfinite(s).any(1)
    torch.testing.assert_close(got[finite], ref[finite], rtol=1e-12, atol=1e-12)
    assert torch.isnan(got[~finite]).all()  # p(x_o) = 0: the conditional is undefined


def test_running_argmax_equals_argmax_with_first_tie() -> None:
    s = _scores(3)
    s[0, 5] = s[0, 33] = 1e6  # a tie across blocks goes to the smaller index
    best = RunningArgmax()
    for n0 in range(0, 40, 9):
        best.add(s[:, n0 : n0 + 9], n0)
    assert best.result()[0] == 5
    torch.testing.assert_close(best.result()[[1, 3, 4, 5]], s.argmax(1)[[1, 3, 4, 5]])


def test_gumbel_argmax_draws_from_softmax() -> None:
    logits = torch.tensor([0.0, 1.0, -1.0, 2.0])
    draws, g, scratch = 40000, torch.Generator().manual_seed(4), Scratch()
    s = add_gumbel_(logits.expand(draws, 4).clone(), g, scratch)
    freq = torch.bincount(s.argmax(1), minlength=4).double() / draws
    expected = torch.softmax(logits.double(), 0)
    chi2 = (draws * (freq - expected) ** 2 / expected).sum().item()
    assert chi2 < 16.3  # 0.999 quantile of chi-square with 3 degrees of freedom


def test_scratch_reuses_and_grows() -> None:
    scratch = Scratch()
    a = scratch.take("x", (4, 5), torch.float32, torch.device("cpu"))
    b = scratch.take("x", (2, 3), torch.float32, torch.device("cpu"))
    assert b.data_ptr() == a.data_ptr() and b.is_contiguous() and b.shape == (2, 3)
    c = scratch.take("x", (10, 10), torch.float32, torch.device("cpu"))
    assert c.shape == (10, 10) and c.numel() == 100
    d = scratch.take("x", (3,), torch.float64, torch.device("cpu"))
    assert d.dtype == torch.float64
