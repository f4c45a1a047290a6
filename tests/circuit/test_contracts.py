"""Contracts at the edges: mask=None queries, EM's returned iterate, normalization of loaded categorical circuits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import vq2pc.circuit.refine as refine
from vq2pc.circuit import MixtureCircuit
from vq2pc.circuit.refine import EMConfig, em_refine
from vq2pc.core.checkpoint import CheckpointError
from vq2pc.core.leaves import Bernoulli, Categorical, Gaussian


def circuits() -> dict[str, MixtureCircuit]:
    g = torch.Generator().manual_seed(0)
    return {
        "gaussian": MixtureCircuit(
            Gaussian(torch.rand(4, 6, generator=g), 0.1 + torch.rand(4, 6, generator=g)), torch.randn(4, generator=g)
        ),
        "categorical": MixtureCircuit(Categorical(torch.randn(4, 6, 5, generator=g)), torch.randn(4, generator=g)),
        "bernoulli": MixtureCircuit(Bernoulli(torch.randn(4, 6, generator=g)), torch.randn(4, generator=g)),
    }


@pytest.mark.parametrize("kind", ["gaussian", "categorical", "bernoulli"])
def test_mask_none_means_everything_observed(kind: str) -> None:
    """The docs: observed entries are copied through; without a mask every entry is observed."""
    c = circuits()[kind]
    x = c.sample(5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(c.conditional_mean(x), x) and torch.equal(c.map(x), x)
    everything = torch.ones_like(x, dtype=torch.bool)
    assert torch.equal(c.conditional_mean(x, everything), x) and torch.equal(c.map(x, everything), x)
    assert torch.equal(c.conditional_mean(x[:, None].reshape(5, 6)), x)
    with pytest.raises(ValueError):  # still validated: a NaN is not "observed data"
        c.conditional_mean(torch.full_like(x, float("nan")))


def test_em_returns_its_best_iterate_never_worse_than_the_start(monkeypatch: pytest.MonkeyPatch) -> None:
    """A step that lowers the objective (here forced: every weight on the worst component) is not returned."""
    c = circuits()["gaussian"]
    x = c.sample(200, generator=torch.Generator().manual_seed(2))
    real_m_step = refine.m_step
    calls = []

    def second_step_is_bad(current: MixtureCircuit, stats, cfg, init) -> MixtureCircuit:
        calls.append(1)
        good = real_m_step(current, stats, cfg, init)
        if len(calls) < 2:
            return good
        worst = int(c.log_likelihoods(x).mean(0).argmin())
        bad = torch.full((len(good),), -30.0)
        bad[worst] = 0.0
        return MixtureCircuit(good.leaf, bad)

    monkeypatch.setattr(refine, "m_step", second_step_is_bad)
    out, history = em_refine(c, x, EMConfig(iterations=3, tol=0.0, leaves=False))
    objective = out.meta["em"]["objective"]
    best = max(range(len(objective)), key=objective.__getitem__)
    assert objective[2] < objective[1] and best == out.meta["em"]["returned_iteration"] == 1
    assert float(out.log_prob(x).double().mean()) == pytest.approx(history[best], abs=1e-4)
    assert float(out.log_prob(x).double().mean()) >= float(c.log_prob(x).double().mean()) - 1e-5


def test_em_without_improvement_returns_the_start() -> None:
    c = circuits()["bernoulli"]
    x = c.sample(100, generator=torch.Generator().manual_seed(3))
    out, _ = em_refine(c, x, EMConfig(iterations=0))
    assert out.meta["em"]["returned_iteration"] == 0 and torch.equal(out.log_weights, c.log_weights)


def test_loaded_categorical_circuit_is_checked_for_normalization(tmp_path: Path) -> None:
    path = circuits()["categorical"].save(tmp_path / "c.safetensors")
    MixtureCircuit.load(path)  # a saved circuit is normalized
    with safe_open(str(path), framework="pt") as f:
        header, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not iterable)
    tensors["leaf.logits"] = tensors["leaf.logits"] + 0.5  # every level's probability scaled by e^0.5
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=header)
    with pytest.raises(CheckpointError, match="categorical leaves are not normalized"):
        MixtureCircuit.load(tmp_path / "bad.safetensors")


def test_normalization_is_checked_in_every_block_of_components(tmp_path: Path) -> None:
    """70 components of 300 × 200 log-probabilities are checked in two blocks (69 + 1): a defect in the
    last component's last pixel is still found."""
    logits = torch.log_softmax(torch.randn(70, 300, 200, generator=torch.Generator().manual_seed(0)), -1)
    path = MixtureCircuit(Categorical(logits), torch.zeros(70)).save(tmp_path / "c.safetensors")
    assert len(MixtureCircuit.load(path)) == 70
    with safe_open(str(path), framework="pt") as f:
        header, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not iterable)
    tensors["leaf.logits"][69, 299, 0] += 1.0
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=header)
    with pytest.raises(CheckpointError, match="categorical leaves are not normalized"):
        MixtureCircuit.load(tmp_path / "bad.safetensors")
