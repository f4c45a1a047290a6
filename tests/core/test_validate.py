"""One definition per fact: the input checks of vq2pc.core.validate, and the same mistake giving the
same message in every stage that takes user data."""

from __future__ import annotations

import pytest
import torch

from vq2pc.circuit.mixture import MixtureCircuit
from vq2pc.core import validate
from vq2pc.core.leaves import Categorical, Gaussian
from vq2pc.data.datasets import check_model_space, to_model_space


def _message(fn, *args) -> str:
    with pytest.raises(ValueError) as info:
        fn(*args)
    return str(info.value)


def test_rows_flattens_images_and_names_bad_shapes() -> None:
    x = torch.rand(2, 1, 2, 3)
    assert torch.equal(validate.rows(x, 6), x.reshape(2, 6))
    assert "x is an empty batch" in _message(validate.rows, torch.rand(0, 6), 6)
    assert _message(validate.rows, torch.rand(2, 5), 6) == (
        "x has shape (2, 5); expected [B, 6] or [B, C, H, W] with C·H·W = 6"
    )


def test_observed_mask_per_row_shared_and_rejected() -> None:
    per_row = torch.rand(3, 1, 2, 2) > 0.5
    assert torch.equal(validate.observed_mask(per_row, 3, 4), per_row.reshape(3, 4))
    shared = torch.tensor([True, False, True, True])
    for given in (shared, shared[None], shared.reshape(1, 2, 2), shared.long()):
        out = validate.observed_mask(given, 3, 4)
        assert out.dtype == torch.bool and torch.equal(out, shared.expand(3, 4))
    assert "mask must be boolean" in _message(validate.observed_mask, torch.full((3, 4), 0.5), 3, 4)
    assert "mask must be boolean" in _message(validate.observed_mask, torch.full((3, 4), 2), 3, 4)
    assert "mask has shape (2, 4)" in _message(validate.observed_mask, torch.ones(2, 4, dtype=torch.bool), 3, 4)


def test_levels_and_binary() -> None:
    validate.check_levels(torch.tensor([0, 255], dtype=torch.uint8), 256)  # no uint8 overflow at L = 256
    validate.check_levels(torch.tensor([0.0, 16.0]), 17)
    for bad in (torch.tensor([17.0]), torch.tensor([-1.0]), torch.tensor([1.5]), torch.tensor([256])):
        assert "x must hold integer levels in [0, 16]" in _message(validate.check_levels, bad, 17)
    assert _message(validate.check_levels, torch.tensor([float("nan")]), 17) == "x contains NaN or inf"
    validate.check_binary(torch.tensor([0.0, 1.0]))
    assert _message(validate.check_binary, torch.tensor([0.5])) == "x must hold binary values 0 or 1"


def test_same_mistake_same_message_in_every_stage() -> None:
    S, L = 4, 5
    circuit = MixtureCircuit(Categorical(torch.randn(2, S, L)), torch.log(torch.full((2,), 0.5)))
    too_high = torch.full((1, S), float(L))
    expected = _message(validate.check_levels, too_high, L)
    assert _message(circuit.log_prob, too_high) == expected  # the circuit
    assert _message(check_model_space, too_high, "categorical", L) == expected  # what a VQ-VAE accepts
    assert _message(Categorical(torch.randn(S, L)).validate_data, too_high) == expected  # the leaf
    assert "v must hold integer levels in [0, 4]" in _message(to_model_space, too_high.long(), "gaussian", L)
    nan = torch.full((1, S), float("nan"))
    gaussian = MixtureCircuit(Gaussian(torch.rand(2, S), torch.ones(2, S)), torch.log(torch.full((2,), 0.5)))
    assert (
        _message(gaussian.log_prob, nan) == _message(check_model_space, nan, "gaussian", L) == "x contains NaN or inf"
    )
    assert _message(gaussian.log_prob, torch.rand(1, S + 1)) == _message(validate.rows, torch.rand(1, S + 1), S)


def test_check_images() -> None:
    validate.check_images(torch.zeros(1, 1, 2, 2))
    assert "images must have shape [n,C,H,W]" in _message(validate.check_images, torch.zeros(2, 4))
    assert "must be a torch.Tensor" in _message(validate.check_images, [1, 2])
