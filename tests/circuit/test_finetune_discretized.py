"""Fine-tuning on the exact discrete likelihood: a Gaussian decoder trained through its discretized twins."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_vqvae

from vq2pc.circuit.distill import distill
from vq2pc.circuit.finetune import FineTuneConfig, finetune_distill
from vq2pc.core.discretized import component_sums
from vq2pc.core.leaves import DiscretizedGaussian
from vq2pc.data.datasets import load_dataset
from vq2pc.latents.selection import Selection


def test_component_sums_equal_the_broadcast_sum_with_the_same_gradients() -> None:
    g = torch.Generator().manual_seed(0)
    loc = (torch.rand(7, 5, generator=g, dtype=torch.float64)).requires_grad_(True)
    scale = (torch.rand(7, 5, generator=g, dtype=torch.float64) * 0.3 + 0.01).requires_grad_(True)
    v = torch.randint(0, 16, (6, 5), generator=g).double()
    fast = component_sums(v, loc, scale, 16, "gaussian", block=40)  # blocks of one component, checkpointed
    slow = DiscretizedGaussian(loc, scale, 16).log_prob(v[:, None]).sum(-1)
    assert torch.allclose(fast, slow, rtol=1e-12)
    w = torch.randn(6, 7, generator=g, dtype=torch.float64)
    assert all(
        torch.allclose(a, b, rtol=1e-10)
        for a, b in zip(
            torch.autograd.grad((fast * w).sum(), [loc, scale]),
            torch.autograd.grad((slow * w).sum(), [loc, scale]),
        )
    )


def test_discretized_finetuning_raises_the_discrete_likelihood() -> None:
    digits = load_dataset("digits", seed=0, limit=300)
    vqvae = tiny_vqvae(digits, epochs=2)
    codes = torch.unique(
        torch.randint(0, 8, (16, 2, 2), generator=torch.Generator().manual_seed(0)),
        dim=0,
    )
    selection = Selection(codes, torch.zeros(codes.shape[0]), "sample")
    before = distill(vqvae, selection, discretized=digits.levels)
    ft = FineTuneConfig(
        epochs=2,
        patience=2,
        lr=3e-3,
        batch_size=50,
        top_k=2,
        refresh=2,
        progress=False,
        discretized=digits.levels,
    )
    after, res = finetune_distill(vqvae, selection, digits, ft)
    assert after.leaf.kind == "discretized-gaussian" and after.meta["finetune"]["discretized"] == digits.levels
    v = digits.train_x.flatten(1).float()
    assert float(after.log_prob(v).mean()) > float(before.log_prob(v).mean()) + 1.0
    assert res.best_val_log_prob > res.start_val_log_prob
    with pytest.raises(ValueError, match="discretized must be >= 2, got 1"):
        FineTuneConfig(discretized=1)
