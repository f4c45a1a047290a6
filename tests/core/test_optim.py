"""core.optim.adam: fused where torch can, the same update rule as torch's default Adam."""

from __future__ import annotations

import torch
from torch import nn

from vq2pc.core.optim import adam


def _train(opt_of, steps: int = 5) -> list[torch.Tensor]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    extra = nn.Parameter(torch.randn(4, dtype=torch.float64))  # fine-tuning's mixture logits are float64
    opt = opt_of([*net.parameters(), extra])
    x = torch.randn(16, 6)
    for _ in range(steps):
        opt.zero_grad()
        (net(x).pow(2).mean() + extra.pow(2).sum()).backward()
        opt.step()
    return [p.detach().clone() for p in [*net.parameters(), extra]]


def test_adam_is_fused_on_cpu_and_matches_the_default_update() -> None:
    assert adam([nn.Parameter(torch.zeros(2))], 1e-3).param_groups[0]["fused"] is True
    fused = _train(lambda ps: adam(ps, 1e-2))
    default = _train(lambda ps: torch.optim.Adam(ps, lr=1e-2))
    moved = _train(lambda ps: adam(ps, 1e-2), steps=0)
    for a, b, start in zip(fused, default, moved):
        assert not torch.equal(a, start)  # the steps did move the parameters
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_adam_falls_back_where_no_fused_kernel_exists() -> None:
    opt = adam([nn.Parameter(torch.zeros(2, device="meta"))], 1e-3)
    assert not opt.param_groups[0]["fused"]
