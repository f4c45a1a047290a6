"""Tests of class weights fitted to labels: brute-force EM, the kept x-marginal, EM monotonicity, Bayes."""

from __future__ import annotations

import math

import pytest
import torch
from test_classes import C, L, S, brute_joint, every_image

from vq2pc.circuit.class_fit import choose_class_fit, fit_class_weights
from vq2pc.circuit.class_weights import class_weights
from vq2pc.circuit.classes import ClassMixture
from vq2pc.circuit.mixture import MixtureCircuit
from vq2pc.core.leaves import Categorical
from vq2pc.latents.selection import Selection

N = 6


def circuit(seed: int = 0) -> MixtureCircuit:
    """Categorical leaves (S = 3, L = 3), N = 6 components, float64, one zero weight."""
    g = torch.Generator().manual_seed(seed)
    log_w = torch.randn(N, generator=g, dtype=torch.float64)
    log_w[-1] = -math.inf
    return MixtureCircuit(Categorical(torch.randn(N, S, L, generator=g, dtype=torch.float64) * 2), log_w)


def labeled(seed: int = 1, n: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, L, (n, S), generator=g).double(), torch.randint(0, C, (n,), generator=g)


def brute_em(m: MixtureCircuit, x: torch.Tensor, y: torch.Tensor, alpha: float, iterations: int) -> torch.Tensor:
    """``[N, C]`` p(c | n) by EM written with explicit loops over images, components and classes."""
    w = torch.softmax(m.log_weights.double(), 0).tolist()
    probs = torch.softmax(m.leaf.logits.double(), -1)  # [N, S, L]
    lik = [[math.prod(float(probs[n, s, int(x[i, s])]) for s in range(S)) for n in range(N)] for i in range(len(x))]
    cond = [[1.0 / C] * C for _ in range(N)]
    for _ in range(iterations):
        counts = [[0.0] * C for _ in range(N)]
        for i in range(len(x)):
            c = int(y[i])
            terms = [w[n] * lik[i][n] * cond[n][c] for n in range(N)]
            for n in range(N):
                counts[n][c] += terms[n] / sum(terms)
        cond = [[(counts[n][c] + alpha / C) / (sum(counts[n]) + alpha) for c in range(C)] for n in range(N)]
    return torch.tensor(cond, dtype=torch.float64)


@pytest.mark.parametrize(("alpha", "iterations"), [(0.3, 1), (0.01, 3)])
def test_fit_equals_brute_force_em(alpha: float, iterations: int) -> None:
    m = circuit()
    x, y = labeled()
    log_w = fit_class_weights(m, x, y, C, alpha, iterations)
    assert log_w.dtype == torch.float64 and tuple(log_w.shape) == (N, C)
    cond = log_w - torch.logsumexp(log_w, 1, keepdim=True)
    want = brute_em(m, x, y, alpha, iterations)
    assert torch.allclose(cond[:-1].exp(), want[:-1], atol=1e-12)
    assert torch.isneginf(log_w[-1]).all()  # w_n = 0 stays 0
    assert torch.allclose(torch.logsumexp(log_w, 1), torch.log_softmax(m.log_weights, 0))  # w_n kept


def test_fitted_mixture_keeps_the_circuit_marginal_and_is_bayes() -> None:
    m = circuit(2)
    x, y = labeled(3)
    cm = ClassMixture(m, fit_class_weights(m, x, y, C))
    assert cm.model is m  # the circuit itself, not a rebuilt one: same w_n
    images = every_image()
    mask = torch.rand(len(images), S, generator=torch.Generator().manual_seed(4)) < 0.5
    assert torch.allclose(cm.log_prob(images), m.log_prob(images), atol=1e-13)
    assert torch.allclose(cm.log_prob(images, mask=mask), m.log_prob(images, mask), atol=1e-13)
    want = brute_joint(cm, images, mask)
    post = want - torch.logsumexp(want, 1, keepdim=True)
    assert torch.allclose(cm.class_posterior(images, mask).double(), post, atol=1e-10)


def test_em_raises_the_training_joint_likelihood_over_uniform() -> None:
    m = circuit(5)
    x, y = labeled(6, 40)
    uniform = torch.log_softmax(m.log_weights, 0)[:, None].expand(N, C) - math.log(C)

    def train_ll(log_w: torch.Tensor) -> float:
        return float(ClassMixture(m, log_w).log_joint(x).gather(1, y[:, None]).sum())

    lls = [train_ll(fit_class_weights(m, x, y, C, 1e-9, it)) for it in (1, 2, 4)]
    assert train_ll(uniform) < lls[0] <= lls[1] + 1e-12 <= lls[2] + 2e-12


def test_choose_picks_least_validation_nll_and_bad_input_is_named() -> None:
    m = circuit(7)
    train, val = labeled(8, 30), labeled(9, 20)
    fit = choose_class_fit(m, train, val, C, alphas=(0.01, 1.0, 100.0), iterations=(1, 2))
    assert set(fit.val_nll) == {(a, i) for a in (0.01, 1.0, 100.0) for i in (1, 2)}
    assert fit.val_nll[(fit.alpha, fit.iterations)] == min(fit.val_nll.values())
    cm = ClassMixture(m, fit.log_weights)
    nll = -cm.class_posterior(val[0]).double().gather(1, val[1][:, None]).mean()
    assert float(nll) == pytest.approx(min(fit.val_nll.values()), abs=1e-10)
    assert torch.allclose(fit.log_weights, fit_class_weights(m, *train, C, fit.alpha, fit.iterations))
    with pytest.raises(ValueError, match="alpha"):
        fit_class_weights(m, *train, C, alpha=0.0)
    with pytest.raises(ValueError, match="labels must lie"):
        fit_class_weights(m, train[0], train[1] + C, C)
    with pytest.raises(ValueError, match="fit_class_weights"):
        class_weights(None, Selection(torch.zeros(N, 1, 1, dtype=torch.long), m.log_weights, "sample"), "labels")
