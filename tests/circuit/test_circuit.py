"""Exactness tests of MixtureCircuit: normalization, marginals, conditionals, accuracy, chunking."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from vq2pc.circuit import MixtureCircuit
from vq2pc.core.leaves import Bernoulli, Categorical, Gaussian


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _tiny_categorical(n: int = 4, s: int = 3, levels: int = 3, seed: int = 0) -> MixtureCircuit:
    g = _gen(seed)
    return MixtureCircuit(Categorical(2 * torch.randn(n, s, levels, generator=g)), torch.randn(n, generator=g))


def _all_configs(s: int, levels: int) -> torch.Tensor:
    return torch.tensor(list(itertools.product(range(levels), repeat=s)), dtype=torch.float32)


def _brute_joint(c: MixtureCircuit, xs: torch.Tensor) -> torch.Tensor:
    """[M] log p(x) by direct evaluation in float64 (leaf log_prob over a [M, N, S] broadcast)."""
    lp = c.leaf.map(lambda t: t.double()).log_prob(xs.double()[:, None]).sum(-1)  # [M, N]
    return torch.logsumexp(lp + c.log_weights.double(), 1)


def test_categorical_normalizes_over_all_configurations() -> None:
    c = _tiny_categorical()
    xs = _all_configs(3, 3)
    total = torch.logsumexp(c.log_prob(xs).double(), 0)
    assert abs(total.item()) < 1e-5
    assert torch.allclose(c.log_prob(xs).double(), _brute_joint(c, xs), atol=1e-5)


def test_bernoulli_normalizes_over_all_configurations() -> None:
    g = _gen(1)
    c = MixtureCircuit(Bernoulli(3 * torch.randn(5, 6, generator=g)), torch.randn(5, generator=g))
    xs = _all_configs(6, 2)
    assert abs(torch.logsumexp(c.log_prob(xs).double(), 0).item()) < 1e-5
    assert torch.allclose(c.log_prob(xs).double(), _brute_joint(c, xs), atol=1e-5)


def test_categorical_marginal_equals_brute_force_sum_over_hidden() -> None:
    c = _tiny_categorical(s=4, seed=2)
    xs = _all_configs(4, 3)
    joint = c.log_prob(xs).double()
    mask = torch.tensor([True, False, True, False])
    for x_obs in itertools.product(range(3), repeat=2):
        match = (xs[:, 0] == x_obs[0]) & (xs[:, 2] == x_obs[1])
        brute = torch.logsumexp(joint[match], 0)
        x = torch.tensor([[x_obs[0], float("nan"), x_obs[1], float("nan")]])  # hidden entries are ignored
        got = c.log_prob(x, mask=mask[None])
        assert abs(got.item() - brute.item()) < 1e-5


def test_gaussian_marginal_equals_circuit_on_observed_pixels() -> None:
    g = _gen(3)
    n, s, b = 7, 20, 9
    mean, std, lw = torch.rand(n, s, generator=g), 0.05 + torch.rand(n, s, generator=g), torch.randn(n, generator=g)
    c = MixtureCircuit(Gaussian(mean, std), lw)
    x = torch.rand(b, s, generator=g)
    keep = torch.rand(s, generator=g) < 0.5
    small = MixtureCircuit(Gaussian(mean[:, keep], std[:, keep]), lw)
    got = c.log_prob(x, mask=keep.expand(b, s))
    assert torch.allclose(got, small.log_prob(x[:, keep]), rtol=1e-5, atol=1e-4)
    # per-sample masks: each row equals its own restricted circuit
    masks = torch.rand(b, s, generator=g) < 0.5
    got = c.log_prob(x, mask=masks)
    for i in range(b):
        ref = MixtureCircuit(Gaussian(mean[:, masks[i]], std[:, masks[i]]), lw).log_prob(x[i : i + 1, masks[i]])
        assert abs(got[i].item() - ref.item()) < 1e-4


def test_conditional_mean_and_posterior_brute_force_categorical() -> None:
    c = _tiny_categorical(s=4, levels=3, seed=4)
    xs = _all_configs(4, 3)
    joint = c.log_prob(xs).double().exp()
    mask = torch.tensor([[True, False, False, True]])
    x = torch.tensor([[2.0, 0.0, 0.0, 1.0]])
    match = (xs[:, 0] == 2) & (xs[:, 3] == 1)
    cond = joint[match] / joint[match].sum()
    brute = (cond[:, None] * xs[match].double()).sum(0)
    got = c.conditional_mean(x, mask=mask)
    assert torch.allclose(got.double(), brute, atol=1e-5)
    post = c.posterior(x, mask=mask)
    assert abs(torch.logsumexp(post, 1).item()) < 1e-6
    # posterior by Bayes on the brute-force joint
    lik = c.leaf.map(lambda t: t.double()).log_prob(xs[match].double()[:, None]).sum(-1)  # [M, N]
    brute_post = torch.logsumexp(lik + c.log_weights.double(), 0)
    brute_post = brute_post - torch.logsumexp(brute_post, 0)
    assert torch.allclose(post[0].double(), brute_post, atol=1e-5)


@pytest.mark.parametrize("kind", ["gaussian", "categorical", "bernoulli"])
def test_posterior_rows_normalize(kind: str) -> None:
    c, x = _circuit_and_data(kind, n=33, s=12, b=10, seed=5)
    mask = torch.rand(x.shape, generator=_gen(6)) < 0.5
    post = c.posterior(x, mask=mask)
    assert post.shape == (10, 33)
    assert torch.allclose(torch.logsumexp(post, 1), torch.zeros(10), atol=1e-5)


def _circuit_and_data(kind: str, n: int, s: int, b: int, seed: int) -> tuple[MixtureCircuit, torch.Tensor]:
    g = _gen(seed)
    lw = torch.randn(n, generator=g)
    if kind == "gaussian":
        c = MixtureCircuit(Gaussian(torch.rand(n, s, generator=g), 0.05 + torch.rand(n, s, generator=g)), lw)
        return c, torch.rand(b, s, generator=g)
    if kind == "categorical":
        return MixtureCircuit(Categorical(torch.randn(n, s, 5, generator=g)), lw), torch.randint(
            0, 5, (b, s), generator=g
        ).float()
    return MixtureCircuit(Bernoulli(torch.randn(n, s, generator=g)), lw), torch.randint(
        0, 2, (b, s), generator=g
    ).float()


@pytest.mark.parametrize("case,seed", [("floor", 7), ("random", 7), ("random", 8), ("random", 9), ("bimodal", 7)])
def test_gaussian_accuracy_against_float64_direct(case: str, seed: int) -> None:
    g = _gen(seed)
    n, s, b = 48, 784, 40
    if case == "floor":  # std at the 1e-3 floor, means near 0.5: catastrophic cancellation in naive float32
        mean, std = 0.5 + 0.01 * torch.randn(n, s, generator=g), torch.full((n, s), 1e-3)
    elif case == "random":
        mean, std = torch.rand(n, s, generator=g), 1e-3 + (1 - 1e-3) * torch.rand(n, s, generator=g)
    else:  # MNIST-like: means near 0 or 1, stds 0.12-0.3 (a shift within 5 stds of all exists: no float64 pixel)
        mean = (torch.rand(n, s, generator=g) < 0.2).float() + 0.01 * torch.rand(n, s, generator=g)
        std = 0.12 + 0.18 * torch.rand(n, s, generator=g)
    lw = torch.randn(n, generator=g)
    c = MixtureCircuit(Gaussian(mean, std), lw)
    assert case != "bimodal" or c._kernel.s_wide == 0
    x = mean[torch.randint(0, n, (b,), generator=g)] + 1e-3 * torch.randn(b, s, generator=g)
    mask = torch.rand(b, s, generator=g) < 0.7
    for m in (None, mask):
        lp = torch.distributions.Normal(mean.double(), std.double()).log_prob(x.double()[:, None])  # [B, N, S]
        if m is not None:
            lp = lp * m[:, None]
        ref = torch.logsumexp(lp.sum(-1) + torch.log_softmax(lw.double(), 0), 1)
        # relative error; a float32 output near 0 carries absolute round-off, hence the floor of 1 nat
        rel = ((c.log_prob(x, mask=m).double() - ref).abs() / ref.abs().clamp_min(1.0)).max().item()
        assert rel < 1e-4, rel


@pytest.mark.parametrize("kind", ["gaussian", "categorical", "bernoulli"])
def test_chunking_gives_identical_results(kind: str) -> None:
    c, x = _circuit_and_data(kind, n=50, s=30, b=25, seed=8)
    tiny = MixtureCircuit(c.leaf, c.log_weights, memory_budget_mib=0.01)
    rows, cols = tiny._blocks(25)
    assert len(rows) > 1 and (kind == "categorical" or len(cols) > 1)
    mask = torch.rand(x.shape, generator=_gen(9)) < 0.5
    # equal up to float32 round-off: BLAS sums in a different order for other block shapes
    close = dict(rtol=1e-6, atol=1e-5)
    for m in (None, mask):
        torch.testing.assert_close(tiny.log_prob(x, mask=m), c.log_prob(x, mask=m), **close)
        torch.testing.assert_close(tiny.posterior(x, mask=m), c.posterior(x, mask=m), **close)
        torch.testing.assert_close(tiny.conditional_mean(x, mask=m), c.conditional_mean(x, mask=m), **close)
        torch.testing.assert_close(tiny.log_likelihoods(x, mask=m), c.log_likelihoods(x, mask=m), **close)
        assert torch.equal(tiny.map(x, mask=m), c.map(x, mask=m))


def test_map_is_exact_joint_argmax_over_component_and_hidden() -> None:
    c = _tiny_categorical(n=6, s=4, levels=3, seed=10)
    xs = _all_configs(4, 3)
    lik = c.leaf.map(lambda t: t.double()).log_prob(xs.double()[:, None]).sum(-1) + c.log_weights.double()  # [M, N]
    mask = torch.tensor([True, False, True, False])
    for x_obs in itertools.product(range(3), repeat=2):
        match = (xs[:, 0] == x_obs[0]) & (xs[:, 2] == x_obs[1])
        best = xs[match][lik[match].max(1).values.argmax()]
        x = torch.tensor([[x_obs[0], 0.0, x_obs[1], 0.0]])
        assert torch.equal(c.map(x, mask=mask[None])[0], best)


def test_log_likelihoods_match_leaf() -> None:
    c, x = _circuit_and_data("categorical", n=9, s=7, b=4, seed=11)
    ref = c.leaf.log_prob(x[:, None]).sum(-1)
    assert torch.allclose(c.log_likelihoods(x), ref, atol=1e-5)
    assert math.isclose(c.num_params, 9 * 7 * 5 + 9)
    assert len(c) == 9 and c.num_variables == 7


@pytest.mark.parametrize("kind", ["gaussian", "categorical", "bernoulli"])
def test_rows_with_nothing_observed_have_log_marginal_zero(kind: str) -> None:
    c, x = _circuit_and_data(kind, n=9, s=20, b=6, seed=12)
    mask = torch.rand(x.shape, generator=_gen(13)) < 0.5
    mask[[1, 4]] = False  # two rows with no observed entry: p(x_o) = 1, posterior = prior
    got = c.log_prob(x, mask=mask)
    torch.testing.assert_close(got[[1, 4]], torch.zeros(2), atol=1e-5, rtol=0)
    torch.testing.assert_close(c.posterior(x, mask=mask)[[1, 4]], c.log_weights.expand(2, -1), atol=1e-5, rtol=0)
    direct = c.leaf.log_prob(x[:, None]).masked_fill(~mask[:, None], 0.0).sum(-1)  # [B, N]
    torch.testing.assert_close(c.log_likelihoods(x, mask=mask), direct, atol=1e-4, rtol=1e-5)


def test_float64_gaussian_with_wide_and_narrow_pixels_equals_the_leaves() -> None:
    """Both parts of the Gaussian kernel in float64 must not share one result buffer."""
    g = torch.Generator().manual_seed(11)
    mean = torch.rand(4, 6, generator=g, dtype=torch.float64)
    std = torch.rand(4, 6, generator=g, dtype=torch.float64) * 0.2 + 0.02
    c = MixtureCircuit(Gaussian(mean, std), torch.zeros(4, dtype=torch.float64))
    assert c._kernel.s_wide > 0 and c._kernel.s_narrow > 0
    x = torch.rand(30, 6, generator=g, dtype=torch.float64)
    ref = torch.logsumexp(c.log_weights + c.leaf.log_prob(x[:, None]).sum(-1), 1)
    assert torch.allclose(c.log_prob(x), ref, rtol=0, atol=1e-10)
