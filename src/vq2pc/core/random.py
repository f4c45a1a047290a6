"""Random draws that work whatever device the tensors and the generator live on — the one place every
leaf, circuit, selection and experiment draws from.

torch refuses a generator of one device for a draw on another (a CPU generator for a CUDA tensor). Each
helper draws on the generator's own device and moves the result to the requested device, so a seeded CPU
generator gives the same numbers whatever device the model runs on. Without a generator the draw uses the
global RNG of the requested device. A generator that is not a ``torch.Generator`` is a ``ValueError``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["step_seed", "check_generator", "uniform", "uniform_", "normal", "randint", "categorical", "gumbel_noise"]


def step_seed(seed: int, step: int) -> int:
    """The seed of step ``step``'s random draws in a run seeded ``seed`` (training noise, integration points,
    dead-code restarts): the same on every rank and after a resume at that step."""
    return int(seed) * 1_000_003 + int(step)


def check_generator(generator: object) -> torch.Generator | None:
    """``generator`` if it is a ``torch.Generator`` or None; else a ``ValueError`` naming what was passed."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    return generator


def _draw_device(generator: torch.Generator | None, device: torch.device | str) -> torch.device:
    return check_generator(generator).device if generator is not None else torch.device(device)


def uniform(
    shape: tuple[int, ...],
    generator: torch.Generator | None,
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """``U[0, 1)`` draws of ``shape`` on ``device``."""
    return torch.rand(shape, generator=generator, device=_draw_device(generator, device), dtype=dtype).to(device)


def uniform_(out: Tensor, generator: torch.Generator | None) -> Tensor:
    """Fill ``out`` with ``U[0, 1)`` in place (no temporary when the generator is on ``out``'s device)."""
    if generator is None or check_generator(generator).device == out.device:
        return out.uniform_(generator=generator)
    return out.copy_(uniform(tuple(out.shape), generator, generator.device, out.dtype))


def normal(
    shape: tuple[int, ...],
    generator: torch.Generator | None,
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Standard normal draws of ``shape`` on ``device``."""
    return torch.randn(shape, generator=generator, device=_draw_device(generator, device), dtype=dtype).to(device)


def randint(high: int, shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device | str) -> Tensor:
    """Integers uniform in ``[0, high)`` of ``shape`` (long) on ``device``."""
    return torch.randint(high, shape, generator=generator, device=_draw_device(generator, device)).to(device)


def categorical(probs: Tensor, generator: torch.Generator | None) -> Tensor:
    """One draw per row of ``probs [..., K]`` (non-negative, not necessarily normalized): indices ``[...]``
    (long) on ``probs``' device."""
    flat = probs.reshape(-1, probs.shape[-1]).to(_draw_device(generator, probs.device))
    return torch.multinomial(flat, 1, generator=generator).view(probs.shape[:-1]).to(probs.device)


def gumbel_noise(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device | str) -> Tensor:
    """Standard Gumbel noise of ``shape`` on ``device``, drawn with ``generator`` (on its own device)."""
    u = uniform(shape, generator, device)
    return -torch.log(-torch.log(u.clamp_min(torch.finfo(u.dtype).tiny)))
