"""Statistical tests of MixtureCircuit sampling (fixed seeds, bounds from standard errors)."""

from __future__ import annotations

import torch
from helpers import assert_sample_frequencies

from vq2pc.circuit import MixtureCircuit
from vq2pc.core.leaves import Categorical, Gaussian


def test_unconditional_sample_frequencies_match_probabilities() -> None:
    g = torch.Generator().manual_seed(0)
    c = MixtureCircuit(Categorical(2 * torch.randn(4, 2, 3, generator=g)), torch.randn(4, generator=g))
    assert_sample_frequencies(c, levels=3, s=2, seed=1)


def test_conditional_samples_keep_observed_and_match_conditional_mean() -> None:
    g = torch.Generator().manual_seed(2)
    n, s = 6, 10
    mean, std = torch.rand(n, s, generator=g), 0.05 + 0.2 * torch.rand(n, s, generator=g)
    c = MixtureCircuit(Gaussian(mean, std), torch.randn(n, generator=g))
    x = mean[:2] + 0.05 * torch.randn(2, s, generator=g)
    mask = torch.rand(2, s, generator=g) < 0.5
    reps = 4000
    xr, mr = x.repeat(reps, 1), mask.repeat(reps, 1)
    draws = c.sample(x=xr, mask=mr, generator=torch.Generator().manual_seed(3))
    assert torch.equal(draws[mr], xr[mr])
    draws = draws.view(reps, 2, s)
    emp_mean, emp_se = draws.mean(0), draws.std(0) / reps**0.5
    cm = c.conditional_mean(x, mask=mask)
    hidden = ~mask
    z = ((emp_mean - cm).abs() / emp_se.clamp_min(1e-12))[hidden]
    # 4.5 standard errors on each of ~10 hidden entries: a false alarm has probability < 1e-4
    assert z.max().item() < 4.5, z.max().item()


def test_unconditional_gaussian_sample_mean_matches_mixture_mean() -> None:
    g = torch.Generator().manual_seed(4)
    n, s = 5, 8
    mean, std = torch.rand(n, s, generator=g), 0.1 + 0.1 * torch.rand(n, s, generator=g)
    c = MixtureCircuit(Gaussian(mean, std), torch.randn(n, generator=g), memory_budget_mib=0.01)
    draws = c.sample(8000, generator=torch.Generator().manual_seed(5))
    mix_mean = (c.log_weights.exp()[:, None] * mean).sum(0)
    se = draws.std(0) / 8000**0.5
    assert ((draws.mean(0) - mix_mean).abs() / se).max().item() < 4.5
