"""Export of a MixtureCircuit to libcirkit (same likelihoods, normalization) and to npz (bit-exact round trip)."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

from vq2pc.circuit import MixtureCircuit, export
from vq2pc.circuit.export import (
    cirkit_log_prob,
    compile_cirkit,
    export_cirkit,
    export_npz,
    from_npz,
    load_cirkit,
    to_cirkit,
)
from vq2pc.cli import main
from vq2pc.core.checkpoint import CheckpointError
from vq2pc.core.leaves import Bernoulli, Categorical, Gaussian


@pytest.fixture(scope="module")
def cirkit():
    return pytest.importorskip("cirkit", reason="libcirkit export needs libcirkit (pip install libcirkit==0.3.1)")


def make_circuit(kind: str, n: int, s: int, levels: int = 5, seed: int = 0, dtype=torch.float32) -> MixtureCircuit:
    g = torch.Generator().manual_seed(seed)
    lw = torch.randn(n, generator=g, dtype=dtype)
    if kind == "gaussian":
        leaf = Gaussian(torch.randn(n, s, generator=g, dtype=dtype), torch.rand(n, s, generator=g, dtype=dtype) + 0.2)
    elif kind == "categorical":
        leaf = Categorical(2 * torch.randn(n, s, levels, generator=g, dtype=dtype))
    else:
        leaf = Bernoulli(3 * torch.randn(n, s, generator=g, dtype=dtype))
    return MixtureCircuit(leaf, lw, meta={"image_shape": [1, 1, s]})


def make_data(circuit: MixtureCircuit, b: int, seed: int = 1) -> torch.Tensor:
    """Samples of the circuit (second half) and off-model points (first half: uniform levels or wide normals)."""
    g = torch.Generator().manual_seed(seed)
    x = circuit.sample(b, generator=g)
    shape = (b // 2, circuit.num_variables)
    if circuit.leaf.kind == "gaussian":
        x[: b // 2] = 3 * torch.randn(shape, generator=g)
    else:
        levels = circuit.leaf.num_levels if circuit.leaf.kind == "categorical" else 2
        x[: b // 2] = torch.randint(0, levels, shape, generator=g).float()
    return x


@pytest.mark.parametrize("kind", ["gaussian", "categorical", "bernoulli"])
@pytest.mark.parametrize("s", [1, 6, 784])
def test_exported_log_likelihood_equals_ours(cirkit, kind, s):
    circuit = make_circuit(kind, n=8, s=s)
    compiled = compile_cirkit(circuit)
    x = make_data(circuit, 32)
    ours, theirs = circuit.log_prob(x), cirkit_log_prob(compiled, x)
    assert theirs.shape == (32,)
    assert torch.allclose(theirs, ours, rtol=1e-4, atol=0)
    assert compiled(x).shape == (32, 1, 1)  # libcirkit's own layout: [B, outputs, units]
    if s == 784:
        assert (ours < -708.5).any()  # below libcirkit's default clamp, still exact


def test_structure_and_parameters_are_the_circuits(cirkit):
    from cirkit.backend.torch.layers import (
        TorchGaussianLayer,
        TorchHadamardLayer,
        TorchSumLayer,
    )

    circuit = make_circuit("gaussian", n=4, s=6)
    symbolic = to_cirkit(circuit)
    assert symbolic.is_smooth and symbolic.is_decomposable and symbolic.num_variables == 6
    compiled = compile_cirkit(circuit)
    layers = {type(layer): layer for layer in compiled.layers}
    assert set(layers) == {TorchGaussianLayer, TorchHadamardLayer, TorchSumLayer}
    gauss = layers[TorchGaussianLayer]
    var = gauss.scope_idx[:, 0]  # fold f models variable var[f]
    assert torch.equal(gauss.stddev().detach(), circuit.leaf.scale.T[var])  # stddev: identity, bit for bit
    assert torch.equal(gauss.mean().detach(), circuit.leaf.loc.T[var])
    weights = layers[TorchSumLayer].weight().detach().reshape(-1)
    assert torch.allclose(weights, circuit.log_weights.exp(), rtol=1e-6)


def test_categorical_export_normalizes(cirkit):
    from cirkit.backend.torch.queries import IntegrateQuery
    from cirkit.utils.scope import Scope

    circuit = make_circuit("categorical", n=5, s=3, levels=4)
    compiled = compile_cirkit(circuit)
    everything = torch.tensor(list(itertools.product(range(4), repeat=3)), dtype=torch.float32)  # all 64 = L^S
    assert torch.logsumexp(cirkit_log_prob(compiled, everything), 0).abs() < 1e-5
    log_z = IntegrateQuery(compiled)(everything[:1], integrate_vars=Scope(range(3)))
    assert log_z.shape == (1, 1, 1) and log_z.abs().max() < 1e-6
    big = compile_cirkit(make_circuit("categorical", n=8, s=784, levels=16))
    log_z = IntegrateQuery(big)(torch.zeros(1, 784), integrate_vars=Scope(range(784)))
    assert log_z.abs().max() < 1e-4


def test_bernoulli_export_normalizes(cirkit):
    compiled = compile_cirkit(make_circuit("bernoulli", n=6, s=4))
    everything = torch.tensor(list(itertools.product(range(2), repeat=4)), dtype=torch.float32)
    assert torch.logsumexp(cirkit_log_prob(compiled, everything), 0).abs() < 1e-5


@pytest.mark.parametrize("kind", ["gaussian", "categorical"])
def test_marginals_by_libcirkit_integration(cirkit, kind):
    circuit = make_circuit(kind, n=8, s=20)
    x = make_data(circuit, 20)  # B == S == folds: a shape slip in libcirkit would broadcast silently here
    mask = torch.rand(20, 20, generator=torch.Generator().manual_seed(3)) < 0.5
    x_hidden_garbage = torch.where(mask, x, torch.full_like(x, float("nan")))
    theirs = cirkit_log_prob(compile_cirkit(circuit), x_hidden_garbage, mask)
    assert torch.allclose(theirs, circuit.log_prob(x, mask), rtol=1e-4, atol=1e-5)


def test_float64_circuit_compiles_in_float64(cirkit):
    circuit = make_circuit("gaussian", n=4, s=10, dtype=torch.float64)
    compiled = compile_cirkit(circuit)
    assert {p.dtype for p in compiled.parameters()} == {torch.float64}
    assert torch.get_default_dtype() == torch.float32  # restored
    x = make_data(circuit, 8)
    assert torch.allclose(cirkit_log_prob(compiled, x), circuit.log_prob(x), rtol=1e-12, atol=0)


def test_tiny_categorical_probabilities_need_float64(cirkit):
    logits = torch.zeros(3, 5, 4)
    logits[:, :, 3] = -100.0  # exp(-100) underflows float32's normal range (log tiny = -87.3)
    circuit = MixtureCircuit(Categorical(logits), torch.zeros(3))
    with pytest.raises(ValueError, match="float64"):
        compile_cirkit(circuit)
    compiled = compile_cirkit(circuit, dtype=torch.float64)
    x = torch.tensor([[3.0, 0, 1, 2, 3], [0, 0, 0, 0, 0]])
    assert torch.allclose(cirkit_log_prob(compiled, x).float(), circuit.log_prob(x), rtol=1e-6)


@pytest.mark.parametrize("kind", ["gaussian", "categorical"])
def test_export_cirkit_reloads(cirkit, tmp_path, kind):
    circuit = make_circuit(kind, n=8, s=12)
    path = export_cirkit(circuit, tmp_path / "c.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt"]  # atomic: no temporary left behind
    reloaded = load_cirkit(path)
    x = make_data(circuit, 16)
    assert torch.equal(cirkit_log_prob(reloaded, x), cirkit_log_prob(compile_cirkit(circuit), x))
    desc = json.loads(torch.load(path, weights_only=True)["description"])
    assert desc["kind"] == kind and desc["num_components"] == 8 and desc["semiring"] == "lse-sum-unclamped"


def test_load_cirkit_rejects_bad_files(cirkit, tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"junk\.pt"):
        load_cirkit(tmp_path / "junk.pt")
    path = export_cirkit(make_circuit("gaussian", n=4, s=3), tmp_path / "c.pt")
    data = torch.load(path, weights_only=True)
    data["state_dict"] = {k: v[:1] for k, v in data["state_dict"].items()}
    torch.save(data, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="not a valid exported"):
        load_cirkit(tmp_path / "bad.pt")


@pytest.mark.parametrize("kind", ["gaussian", "categorical", "bernoulli"])
def test_npz_round_trip_is_bit_exact(tmp_path, kind):
    circuit = make_circuit(kind, n=7, s=9, levels=6, seed=4)
    path = export_npz(circuit, tmp_path / "c.npz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.npz"]
    back = from_npz(path)
    x = make_data(circuit, 32)
    assert torch.equal(back.log_prob(x), circuit.log_prob(x))
    assert back.meta == circuit.meta and back.leaf.kind == kind
    with np.load(path, allow_pickle=False) as npz:  # readable without vq2pc
        header = json.loads(str(npz["header"]))
        assert header["kind"] == kind and header["num_components"] == 7
        assert np.isclose(np.logaddexp.reduce(npz["log_weights"].astype(np.float64)), 0.0, atol=1e-6)
        if kind == "categorical":
            assert np.allclose(np.exp(npz["logits"]).sum(-1), 1.0, atol=1e-5)


def test_from_npz_rejects_bad_files(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        from_npz(tmp_path / "missing.npz")
    np.savez(tmp_path / "foreign.npz", a=np.zeros(3))
    with pytest.raises(CheckpointError, match=r"foreign\.npz"):
        from_npz(tmp_path / "foreign.npz")


def test_clear_errors(cirkit):
    circuit = make_circuit("categorical", n=3, s=4, levels=5)
    with pytest.raises(ValueError, match="MixtureCircuit"):
        to_cirkit("circuit.safetensors")
    compiled = compile_cirkit(circuit)
    with pytest.raises(ValueError, match=r"\[B, 4\]"):
        cirkit_log_prob(compiled, torch.zeros(2, 5))
    with pytest.raises(ValueError, match="integer levels"):
        cirkit_log_prob(compiled, torch.full((2, 4), 5.0))


def test_missing_libcirkit_is_one_clear_error(tmp_path, monkeypatch, capsys):
    def missing() -> None:
        raise ModuleNotFoundError("No module named 'cirkit'")

    monkeypatch.setattr(export, "require_cirkit", missing)
    circuit = make_circuit("gaussian", n=3, s=4)
    with pytest.raises(ModuleNotFoundError, match=r"pip install libcirkit==0\.3\.1"):
        to_cirkit(circuit)
    path = circuit.save(tmp_path / "c.safetensors")
    assert main(["export", str(path), "--format", "cirkit", "--out", str(tmp_path / "c.pt")]) == 1
    err = capsys.readouterr().err
    assert "libcirkit" in err and "Traceback" not in err
    assert not (tmp_path / "c.pt").exists()
    assert main(["export", str(path), "--format", "npz", "--out", str(tmp_path / "c.npz")]) == 0  # npz needs nothing


def test_cli_export_cirkit(cirkit, tmp_path, capsys):
    circuit = make_circuit("gaussian", n=5, s=6)
    path = circuit.save(tmp_path / "c.safetensors")
    assert main(["export", str(path), "--format", "cirkit", "--out", str(tmp_path / "c.pt")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary == {"out": str(tmp_path / "c.pt"), "format": "cirkit", "N": 5, "S": 6, "kind": "gaussian"}
    x = make_data(circuit, 8)
    assert torch.allclose(cirkit_log_prob(load_cirkit(tmp_path / "c.pt"), x), circuit.log_prob(x), rtol=1e-4)
