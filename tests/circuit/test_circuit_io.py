"""MixtureCircuit persistence and input validation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vq2pc.circuit import MixtureCircuit
from vq2pc.circuit.kernels import categorical_table, normalized_categorical
from vq2pc.core.leaves import Bernoulli, Categorical, Gaussian


def _circuits() -> list[MixtureCircuit]:
    g = torch.Generator().manual_seed(0)
    lw = torch.randn(6, generator=g)
    return [
        MixtureCircuit(
            Gaussian(torch.rand(6, 12, generator=g), 0.1 + torch.rand(6, 12, generator=g)),
            lw,
            meta={"image_shape": [1, 3, 4]},
        ),
        MixtureCircuit(Categorical(torch.randn(6, 12, 4, generator=g)), lw, meta={"levels": 4}),
        MixtureCircuit(Bernoulli(torch.randn(6, 12, generator=g)), lw),
    ]


def _data(c: MixtureCircuit) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    if c.leaf.kind == "gaussian":
        return torch.rand(5, 12, generator=g)
    hi = 4 if c.leaf.kind == "categorical" else 2
    return torch.randint(0, hi, (5, 12), generator=g).float()


@pytest.mark.parametrize("idx", [0, 1, 2])
def test_save_load_round_trip_is_bit_exact(tmp_path: Path, idx: int) -> None:
    c = _circuits()[idx]
    path = c.save(tmp_path / "c.safetensors")
    d = MixtureCircuit.load(path)
    x = _data(c)
    mask = torch.rand(x.shape, generator=torch.Generator().manual_seed(2)) < 0.5
    assert d.meta == c.meta and len(d) == len(c) and d.num_params == c.num_params
    assert torch.equal(d.log_prob(x), c.log_prob(x))
    assert torch.equal(d.posterior(x, mask=mask), c.posterior(x, mask=mask))
    assert torch.equal(d.conditional_mean(x, mask=mask), c.conditional_mean(x, mask=mask))


def test_load_rejects_foreign_truncated_and_missing(tmp_path: Path) -> None:
    c = _circuits()[0]
    path = c.save(tmp_path / "c.safetensors")
    data = path.read_bytes()
    (tmp_path / "t.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"corrupt|truncated"):
        MixtureCircuit.load(tmp_path / "t.safetensors")
    torch.save({"a": torch.zeros(2)}, tmp_path / "f.pt")
    with pytest.raises(ValueError, match="not a readable vq2pc circuit"):
        MixtureCircuit.load(tmp_path / "f.pt")
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(2)}, str(tmp_path / "o.safetensors"))
    with pytest.raises(ValueError, match="not a vq2pc circuit"):
        MixtureCircuit.load(tmp_path / "o.safetensors")
    with pytest.raises(ValueError, match="not found"):
        MixtureCircuit.load(tmp_path / "missing.safetensors")


def test_constructor_rejects_bad_parameters() -> None:
    mean = torch.rand(3, 4)
    with pytest.raises(ValueError, match="N = 0"):
        MixtureCircuit(Gaussian(torch.rand(0, 4), torch.ones(0, 4)), torch.zeros(0))
    with pytest.raises(ValueError, match="std"):
        MixtureCircuit(Gaussian(mean, torch.zeros(3, 4)), torch.zeros(3))
    with pytest.raises(ValueError, match="log_weights has shape"):
        MixtureCircuit(Gaussian(mean, torch.ones(3, 4)), torch.zeros(4))
    with pytest.raises(ValueError, match="NaN"):
        MixtureCircuit(Gaussian(mean, torch.ones(3, 4)), torch.tensor([0.0, float("nan"), 0.0]))
    with pytest.raises(ValueError, match="memory_budget_mib"):
        MixtureCircuit(Gaussian(mean, torch.ones(3, 4)), torch.zeros(3), memory_budget_mib=0)
    with pytest.raises(ValueError, match="leaf batch shape"):
        MixtureCircuit(Gaussian(torch.rand(4), torch.ones(4)), torch.zeros(4))


@pytest.mark.parametrize(
    ("idx", "x", "mask", "match"),
    [
        (0, torch.rand(5, 11), None, "x has shape"),
        (0, torch.rand(5, 12), torch.ones(5, 11, dtype=torch.bool), "mask has shape"),
        (0, torch.full((5, 12), float("nan")), None, "NaN"),
        (0, torch.rand(0, 12), None, "empty batch"),
        (0, torch.rand(5, 12), torch.full((5, 12), 0.5), "mask must be boolean"),
        (1, torch.full((5, 12), 4.0), None, "integer levels"),
        (1, torch.full((5, 12), 1.5), None, "integer levels"),
        (2, torch.full((5, 12), 0.5), None, "binary"),
    ],
)
def test_queries_reject_bad_input(idx: int, x: torch.Tensor, mask: torch.Tensor | None, match: str) -> None:
    c = _circuits()[idx]
    for query in (c.log_prob, c.posterior, c.conditional_mean, c.map, c.log_likelihoods):
        with pytest.raises(ValueError, match=match):
            query(x, mask=mask)


def test_sample_rejects_bad_arguments() -> None:
    c = _circuits()[0]
    with pytest.raises(ValueError, match="n must be"):
        c.sample(0)
    with pytest.raises(ValueError, match="does not match"):
        c.sample(3, x=torch.rand(5, 12), mask=torch.ones(5, 12, dtype=torch.bool))
    assert c.sample(7, generator=torch.Generator().manual_seed(0)).shape == (7, 12)


def test_image_shaped_input_and_shared_mask() -> None:
    c = _circuits()[0]
    x = torch.rand(5, 1, 3, 4)
    m = torch.rand(1, 3, 4) < 0.5
    got = c.log_prob(x, mask=m.expand(5, 1, 3, 4))
    assert torch.equal(got, c.log_prob(x.reshape(5, 12), mask=m.reshape(12)))


def test_categorical_table_layout() -> None:
    logits = torch.randn(3, 5, 4)  # [N, S, L]; not normalized: normalized_categorical must not renormalize
    table = categorical_table(logits)
    assert table.shape == (5 * 4, 3) and table[2 * 4 + 3, 1] == logits[1, 2, 3]  # row i·L + l, column n
    leaf = normalized_categorical(logits)
    assert torch.equal(leaf.logits, logits)
    assert categorical_table(leaf.logits).data_ptr() == leaf.logits.data_ptr()  # the leaf is a view of its table
    with pytest.raises(ValueError, match=r"categorical logits must be \[N, S, L\]"):
        categorical_table(torch.randn(3, 5))
