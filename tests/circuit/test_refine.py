"""Tests of EM refinement: monotonicity, normalization, recovery, brute-force M-steps, errors."""

from __future__ import annotations

import itertools

import pytest
import torch

from vq2pc.circuit import MixtureCircuit
from vq2pc.circuit.refine import EMConfig, e_step, em_refine, log_prior, weights_m_step
from vq2pc.core.leaves import Bernoulli, Categorical, Gaussian

ML = {"prior_strength": 1.0, "smoothing": 0.0, "tol": 0.0}  # exact maximum likelihood, no early stop


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _gaussian(n: int = 5, s: int = 4, seed: int = 0) -> MixtureCircuit:
    g = _gen(seed)
    mean = torch.rand(n, s, generator=g, dtype=torch.float64)
    std = 0.1 + 0.3 * torch.rand(n, s, generator=g, dtype=torch.float64)
    return MixtureCircuit(Gaussian(mean, std), torch.zeros(n, dtype=torch.float64))


def _categorical(n: int = 4, s: int = 3, levels: int = 3, seed: int = 0) -> MixtureCircuit:
    g = _gen(seed)
    logits = torch.randn(n, s, levels, generator=g, dtype=torch.float64)
    return MixtureCircuit(Categorical(logits), torch.zeros(n, dtype=torch.float64))


def _bernoulli(n: int = 4, s: int = 5, seed: int = 0) -> MixtureCircuit:
    g = _gen(seed)
    return MixtureCircuit(
        Bernoulli(2 * torch.randn(n, s, generator=g, dtype=torch.float64)), torch.zeros(n, dtype=torch.float64)
    )


def _data(kind: str, seed: int, rows: int = 300) -> tuple[MixtureCircuit, torch.Tensor]:
    """A random circuit and data from a DIFFERENT random circuit of the same kind (so EM has work to do)."""
    make = {"gaussian": _gaussian, "categorical": _categorical, "bernoulli": _bernoulli}[kind]
    truth = make(seed=seed + 100)
    return make(seed=seed), truth.sample(rows, generator=_gen(seed + 7))


def _non_decreasing(values: list[float]) -> bool:
    return all(b >= a - 1e-6 * abs(a) for a, b in itertools.pairwise(values))


@pytest.mark.parametrize("kind", ["gaussian", "categorical", "bernoulli"])
@pytest.mark.parametrize("leaves", [False, True])
def test_ml_em_never_decreases_train_log_likelihood(kind: str, leaves: bool) -> None:
    circuit, x = _data(kind, seed=1)
    cfg = EMConfig(iterations=8, leaves=leaves, batch_size=64, min_std=1e-2, **ML)
    refined, history = em_refine(circuit, x, cfg)
    assert len(history) == 9
    assert _non_decreasing(history), history
    assert history[-1] > history[0] + 1e-3  # it actually moved
    assert refined.meta["em"]["history"] == history
    # history[k] is the log-likelihood of the circuit after k updates: the last one is the returned circuit.
    assert abs(refined.log_prob(x).mean().item() - history[-1]) < 1e-9 * abs(history[-1]) + 1e-9


@pytest.mark.parametrize("kind", ["gaussian", "categorical", "bernoulli"])
def test_map_em_never_decreases_penalized_objective(kind: str) -> None:
    """With smoothing α > 0 and a leaf/weight prior (a = 3) the log-likelihood alone need not be
    monotone, but log-likelihood + log prior / n is (MAP-EM)."""
    circuit, x = _data(kind, seed=2, rows=60)
    cfg = EMConfig(iterations=8, leaves=True, prior_strength=3.0, smoothing=0.5, tol=0.0, batch_size=25)
    refined, _ = em_refine(circuit, x, cfg)
    objective = refined.meta["em"]["objective"]
    assert _non_decreasing(objective), objective
    assert objective[-1] > objective[0] + 1e-3
    # the reported objective is recomputable from the returned circuit
    again = refined.log_prob(x).mean().item() + log_prior(refined, circuit.leaf, cfg) / x.shape[0]
    assert abs(again - objective[-1]) < 1e-8 * abs(again)


@pytest.mark.parametrize("smoothing", [0.0, 0.3])
def test_refined_categorical_circuit_is_normalized(smoothing: float) -> None:
    circuit, x = _data("categorical", seed=3, rows=40)
    refined, _ = em_refine(circuit, x, EMConfig(iterations=3, leaves=True, smoothing=smoothing, prior_strength=2.0))
    xs = torch.tensor(list(itertools.product(range(3), repeat=3)), dtype=torch.float64)
    assert abs(torch.logsumexp(refined.log_prob(xs), 0).item()) < 1e-10
    assert abs(torch.logsumexp(refined.log_weights, 0).item()) < 1e-12


def test_bernoulli_refined_circuit_is_normalized() -> None:
    circuit, x = _data("bernoulli", seed=4, rows=40)
    refined, _ = em_refine(circuit, x, EMConfig(iterations=3, leaves=True, **ML))
    xs = torch.tensor(list(itertools.product(range(2), repeat=5)), dtype=torch.float64)
    assert abs(torch.logsumexp(refined.log_prob(xs), 0).item()) < 1e-10


def test_em_recovers_mixture_weights_of_known_components() -> None:
    mean = torch.tensor([[0.2, 0.3, 0.7], [0.8, 0.6, 0.2]], dtype=torch.float64)
    std = torch.full_like(mean, 0.1)
    truth = MixtureCircuit(Gaussian(mean, std), torch.tensor([0.3, 0.7], dtype=torch.float64).log())
    x = truth.sample(5000, generator=_gen(5))
    start = MixtureCircuit(Gaussian(mean, std), torch.tensor([0.9, 0.1], dtype=torch.float64).log())
    refined, history = em_refine(start, x, EMConfig(iterations=50, tol=1e-10, prior_strength=1.0))
    w = refined.log_weights.exp()
    assert abs(w[0].item() - 0.3) < 0.02, w
    assert history[-1] > history[0]
    # with the leaves refined too, EM also recovers means and stds
    refined, _ = em_refine(start, x, EMConfig(iterations=50, tol=1e-10, leaves=True, smoothing=0.0))
    assert abs(refined.log_weights.exp()[0].item() - 0.3) < 0.02
    assert torch.allclose(refined.leaf.loc, mean, atol=0.01)
    assert torch.allclose(refined.leaf.scale, std, atol=0.01)


def _brute_responsibilities(c: MixtureCircuit, x: torch.Tensor) -> torch.Tensor:
    """[n, N] p(n | x) by a Python loop over components (leaf.log_prob of one row at a time)."""
    cols = [c.log_weights[k] + c.leaf[k : k + 1].log_prob(x).sum(-1) for k in range(len(c))]
    joint = torch.stack(cols, 1)
    return torch.exp(joint - torch.logsumexp(joint, 1, keepdim=True))


@pytest.mark.parametrize("prior_strength", [1.0, 2.5, 0.5])
def test_weights_m_step_matches_brute_force_loop(prior_strength: float) -> None:
    circuit, x = _data("gaussian", seed=6, rows=50)
    refined, _ = em_refine(circuit, x, EMConfig(iterations=1, prior_strength=prior_strength, batch_size=7))
    r = _brute_responsibilities(circuit, x)
    expected = []
    for k in range(len(circuit)):
        expected.append(max(float(r[:, k].sum()) + prior_strength - 1.0, 0.0))
    total = sum(expected)
    got = refined.log_weights.exp()
    assert torch.allclose(got, torch.tensor([e / total for e in expected], dtype=torch.float64), atol=1e-12)
    assert torch.equal(refined.leaf.loc, circuit.leaf.loc)  # weights only: leaves untouched


def test_leaf_m_steps_match_brute_force_loop() -> None:
    """Gaussian moments and categorical counts of one M-step (κ = 1 pseudo-observation, α = 0.2)."""
    cfg = EMConfig(iterations=1, leaves=True, prior_strength=2.0, smoothing=0.2, batch_size=9, min_std=1e-6)
    circuit, x = _data("gaussian", seed=7, rows=40)
    refined, _ = em_refine(circuit, x, cfg)
    r = _brute_responsibilities(circuit, x)
    for k in range(len(circuit)):
        w, mu0, sd0 = r[:, k : k + 1], circuit.leaf.loc[k], circuit.leaf.scale[k]
        mean = ((w * x).sum(0) + mu0) / (w.sum() + 1)
        var = ((w * x * x).sum(0) + sd0**2 + mu0**2) / (w.sum() + 1) - mean**2
        assert torch.allclose(refined.leaf.loc[k], mean, atol=1e-12)
        assert torch.allclose(refined.leaf.scale[k], var.sqrt(), atol=1e-12)
    circuit, x = _data("categorical", seed=8, rows=40)
    refined, _ = em_refine(circuit, x, cfg)
    r = _brute_responsibilities(circuit, x)
    for k in range(len(circuit)):
        for s in range(3):
            counts = torch.stack([r[x[:, s] == v, k].sum() for v in range(3)])
            p = counts + circuit.leaf.logits[k, s].exp() + 0.2
            assert torch.allclose(refined.leaf.logits[k, s].exp(), p / p.sum(), atol=1e-12)


def test_e_step_batches_do_not_change_statistics() -> None:
    circuit, x = _data("categorical", seed=9, rows=33)
    a = e_step(circuit, x, batch_size=5, leaves=True)
    b = e_step(circuit, x, batch_size=1000, leaves=True)
    assert torch.allclose(a.resp, b.resp, atol=1e-12) and torch.allclose(a.leaf, b.leaf, atol=1e-12)
    assert abs(a.resp.sum().item() - 33) < 1e-9


def test_empty_component_keeps_its_leaf_and_prior_revives_its_weight() -> None:
    mean = torch.tensor([[0.2, 0.2], [0.8, 0.8], [0.5, 0.5]], dtype=torch.float64)
    c = MixtureCircuit(
        Gaussian(mean, torch.full_like(mean, 0.05)), torch.tensor([0.0, 0.0, -torch.inf], dtype=torch.float64)
    )
    x = c.sample(100, generator=_gen(10))
    refined, _ = em_refine(c, x, EMConfig(iterations=2, leaves=True, prior_strength=1.0))
    assert torch.equal(refined.leaf.loc[2], mean[2]) and refined.log_weights[2] == -torch.inf
    revived, _ = em_refine(c, x, EMConfig(iterations=1, prior_strength=2.0))
    assert torch.isfinite(revived.log_weights).all()


def test_input_circuit_untouched_and_meta_extended() -> None:
    circuit, x = _data("categorical", seed=11, rows=30)
    circuit.meta["levels"] = 3
    before = circuit.leaf.logits.clone(), circuit.log_weights.clone()
    refined, history = em_refine(circuit, x, EMConfig(iterations=2, leaves=True))
    assert torch.equal(circuit.leaf.logits, before[0]) and torch.equal(circuit.log_weights, before[1])
    assert refined.meta["levels"] == 3 and refined.meta["em"]["updates"] == len(history) - 1
    zero, h0 = em_refine(circuit, x, EMConfig(iterations=0))
    assert len(h0) == 1 and torch.equal(zero.log_weights, circuit.log_weights)


def test_errors() -> None:
    circuit, x = _data("categorical", seed=12, rows=10)
    with pytest.raises(ValueError, match="expected"):
        em_refine(circuit, x[:, :2])  # wrong S
    with pytest.raises(ValueError, match="levels"):
        em_refine(circuit, x + 5)  # out of support
    with pytest.raises(ValueError, match="iterations"):
        EMConfig(iterations=-1)
    with pytest.raises(ValueError, match="min_std"):
        EMConfig(min_std=0.0)
    cfg = EMConfig()
    cfg.iterations = -2  # mutated after construction: em_refine re-validates
    with pytest.raises(ValueError, match="iterations"):
        em_refine(circuit, x, cfg)
    gauss, xg = _data("gaussian", seed=12, rows=10)
    with pytest.raises(ValueError, match="NaN"):
        em_refine(gauss, torch.full_like(xg, float("nan")))
    with pytest.raises(ValueError, match="removes every component"):
        weights_m_step(torch.full((5,), 0.5, dtype=torch.float64), 0.0)  # every R_n + a - 1 < 0
    zero = MixtureCircuit(
        Categorical(torch.tensor([[[0.0, -torch.inf, 0.0]]] * 2, dtype=torch.float64)), torch.zeros(2)
    )
    with pytest.raises(ValueError, match="zero probability"):
        em_refine(zero, torch.tensor([[1.0]]))


def _digits_circuit(path, levels: int = 17) -> None:
    """A 16-component uniform-weight Gaussian circuit on digits (component means = training images)."""
    from vq2pc.data import load_dataset, to_model_space

    sp = load_dataset("digits", limit=16)
    mean = to_model_space(sp.train_x, "gaussian", sp.levels, _gen(0)).reshape(16, -1)
    c = MixtureCircuit(Gaussian(mean, torch.full_like(mean, 0.2)), torch.zeros(16), meta={"levels": levels})
    c.save(path)


def test_cli_refine_writes_circuit_and_reports_history(tmp_path, capsys) -> None:
    import json

    from vq2pc.cli import main

    _digits_circuit(tmp_path / "c.safetensors")
    out = tmp_path / "r.safetensors"
    argv = [
        "refine",
        str(tmp_path / "c.safetensors"),
        "--limit",
        "80",
        "--iterations",
        "3",
        "--leaves",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    history = report["history"]
    assert report["train_rows"] == 80 and 1 <= report["updates"] <= 3
    assert _non_decreasing(history) and history[-1] > history[0]
    refined = MixtureCircuit.load(out)
    assert refined.meta["em"]["history"] == history and refined.meta["levels"] == 17
    # 80 rows and leaves refined: the test likelihood may well drop (overfitting), but it is reported
    assert all(isinstance(report[k], float) for k in ("test_ll_before", "test_ll_after", "test_bpd_after"))

    _digits_circuit(tmp_path / "bad.safetensors", levels=256)
    assert main(["refine", str(tmp_path / "bad.safetensors"), "--limit", "20", "--out", str(out)]) == 1
    assert "256 levels" in capsys.readouterr().err
