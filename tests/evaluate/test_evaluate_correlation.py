"""Component correlation (Fig. 6): identical components correlate perfectly, independent ones do not."""

from __future__ import annotations

import pytest
import torch

from vq2pc.circuit import MixtureCircuit
from vq2pc.core.leaves import Gaussian
from vq2pc.evaluate import component_correlation, joint_log_likelihoods

S = 16


def _circuit(mean: torch.Tensor, std: float = 0.2) -> MixtureCircuit:
    return MixtureCircuit(Gaussian(mean, torch.full_like(mean, std)), torch.zeros(mean.shape[0]))


@pytest.mark.slow
def test_identical_versus_distinct_components(tmp_path) -> None:
    g = torch.Generator().manual_seed(0)
    same = _circuit(torch.rand(1, S, generator=g).expand(4, S).clone())
    # Components that each look at a different block of pixels: log-likelihoods driven by disjoint noise.
    means = torch.full((4, S), 0.5)
    for n in range(4):
        means[n, 4 * n : 4 * n + 4] = 0.0
    distinct = _circuit(means, std=0.05)
    x = torch.rand(500, S, generator=g)
    res = component_correlation(same, distinct, x, tmp_path / "corr.png")
    assert res["mean_pairwise_corr_random"] == pytest.approx(1.0, abs=1e-6)
    assert abs(res["mean_pairwise_corr_topk"]) < 0.5
    assert res["components"] == 4 and res["images"] == 500
    assert (tmp_path / "corr.png").stat().st_size > 1000


def test_joint_log_likelihoods_add_log_weights_and_take_first_components() -> None:
    g = torch.Generator().manual_seed(1)
    mean = torch.rand(6, S, generator=g)
    c = MixtureCircuit(Gaussian(mean, torch.full_like(mean, 0.3)), torch.log(torch.arange(1.0, 7.0)))
    x = torch.rand(5, S, generator=g)
    got = joint_log_likelihoods(c, x, components=4)
    ref = torch.distributions.Normal(mean[:4], 0.3).log_prob(x[:, None, :]).sum(-1) + c.log_weights[:4]
    torch.testing.assert_close(got, ref.double(), rtol=1e-5, atol=1e-4)


def test_one_component_is_rejected(tmp_path) -> None:
    c = _circuit(torch.rand(1, S))
    with pytest.raises(ValueError, match="at least 2 components"):
        component_correlation(c, c, torch.rand(10, S), tmp_path / "x.png")


def test_log_prior_replaces_the_weights() -> None:
    g = torch.Generator().manual_seed(2)
    c = _circuit(torch.rand(3, S, generator=g))
    x = torch.rand(4, S, generator=g)
    prior = torch.tensor([-1.0, -2.0, -30.0])
    diff = joint_log_likelihoods(c, x, 3, log_prior=prior) - joint_log_likelihoods(c, x, 3)
    torch.testing.assert_close(diff, (prior - c.log_weights).double().expand(4, 3), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="log_prior has shape"):
        joint_log_likelihoods(c, x, 3, log_prior=torch.zeros(2))
