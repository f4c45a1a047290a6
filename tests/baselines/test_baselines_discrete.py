"""Discrete twins of the Gaussian baselines: the EiNet with discretized input units, the compiled CM."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from vq2pc.baselines.cm import CMConfig, ContinuousMixture, compile_cm


def _all_images(levels: int, s: int) -> torch.Tensor:
    return torch.tensor(list(itertools.product(range(levels), repeat=s)), dtype=torch.float32)


def test_einet_twin_normalizes_marginalizes_and_bounds_the_dequantized_bpd() -> None:
    pytest.importorskip("cirkit", reason="EiNet needs libcirkit (pip install libcirkit==0.3.1)")
    from vq2pc.baselines.einet import EiNet, EiNetConfig

    levels = 4
    cfg = EiNetConfig(
        (1, 2, 2),
        leaf="gaussian",
        levels=levels,
        pieces=(2,),
        num_input_units=3,
        num_sum_units=3,
        min_std=0.05,
        max_std=0.5,
    )
    model = EiNet(cfg)
    twin = model.discretized(levels)
    images = _all_images(levels, 4)
    with torch.no_grad():
        lp = twin.log_prob(images).double()
        assert abs(float(torch.logsumexp(lp, 0))) < 1e-5
        mask = torch.tensor([True, False, True, False])
        marg = twin.log_prob(images, mask).double().reshape(levels, levels, levels, levels)[:, 0, :, 0]
        ref = torch.logsumexp(lp.reshape(levels, levels, levels, levels), (1, 3))
        assert torch.allclose(marg, ref, atol=1e-5)
        many = images.repeat(3, 1)  # more rows than one chunk of the twin: the same values, row by row
        assert torch.allclose(twin.log_prob(many).double(), lp.repeat(3), atol=1e-6)
        masks = torch.rand(many.shape, generator=torch.Generator().manual_seed(1)) < 0.5
        assert torch.allclose(twin.log_prob(many, masks)[:256], twin.log_prob(images, masks[:256]), atol=1e-6)
        draws = 2000  # E_u over each image's bin: the dequantized log-density is below log P(v) − S log L
        x = (
            images.repeat(draws, 1) + torch.rand(draws * len(images), 4, generator=torch.Generator().manual_seed(0))
        ) / levels
        deq = model.log_prob(x).double().reshape(draws, -1).mean(0) - 4 * math.log(levels)
    assert float((lp - deq).mean()) > 0 and bool((lp > deq - 0.05).all())
    with pytest.raises(ValueError, match="integer levels"):
        twin.log_prob(images + 0.5)
    with pytest.raises(ValueError, match="only a Gaussian EiNet"):
        EiNet(EiNetConfig((1, 2, 2), leaf="categorical", levels=3, pieces=(2,))).discretized(3)


def test_compiled_cm_twin_sums_to_one() -> None:
    levels = 4
    model = ContinuousMixture(CMConfig((1, 1, 3), leaf="gaussian", levels=levels, hidden=8, train_points=8))
    circuit = compile_cm(model, num_points=16, seed=1)
    twin = circuit.discretized(levels)
    assert twin.leaf.kind == "discretized-gaussian" and twin.leaf.loc is circuit.leaf.loc
    assert abs(float(torch.logsumexp(twin.log_prob(_all_images(levels, 3)).double(), 0))) < 1e-5
