"""Random draws that work whatever device the tensors and the generator live on."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["gumbel_noise"]


def gumbel_noise(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> Tensor:
    """Standard Gumbel noise of ``shape`` on ``device``, drawn with ``generator`` (on its own device)."""
    gen_device = generator.device if generator is not None else device
    u = torch.rand(shape, generator=generator, device=gen_device).to(device)
    return -torch.log(-torch.log(u.clamp_min(torch.finfo(u.dtype).tiny)))
