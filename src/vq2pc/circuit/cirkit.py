"""The bridge to libcirkit (optional dependency): import check and an unclamped log-sum-exp semiring.

libcirkit's ``lse-sum`` semiring clamps every sum and product layer from below at
-708.3964 (log of the smallest normal float64), which makes an image's log-density
a constant and stops learning; ``lse-sum-unclamped`` is the same algebra without
the clamp (why: :mod:`vq2pc.baselines.einet`). Used by the export of circuits and
by the EiNet baseline.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor

__all__ = ["require_cirkit", "UNCLAMPED_SEMIRING"]

UNCLAMPED_SEMIRING = "lse-sum-unclamped"


def require_cirkit() -> Any:
    """Import libcirkit (with our unclamped semiring registered) or explain how to install it."""
    try:
        import cirkit  # noqa: F401
        from cirkit.backend.torch.semiring import (
            LSESumSemiring,
            SemiringImpl,
            SumProductSemiring,
        )
    except ImportError as exc:
        raise ModuleNotFoundError(
            "the EiNet baseline needs libcirkit: `pip install libcirkit==0.3.1` (or `pip install vq2pc[baselines]`)"
        ) from exc
    if UNCLAMPED_SEMIRING not in set(SemiringImpl.list()):
        _register_semiring(SemiringImpl, LSESumSemiring, SumProductSemiring)
    return cirkit


def _register_semiring(base: Any, lse: Any, sp: Any) -> None:
    """Register ``lse-sum-unclamped``: libcirkit's log-sum-exp semiring without its -708.4 floor."""

    class UnclampedLSESum(lse):  # type: ignore[misc, valid-type]
        @classmethod
        def sum(cls, x: Tensor, dim: int, *, keepdim: bool = False) -> Tensor:
            return x.logsumexp(dim=dim, keepdim=keepdim)

        @classmethod
        def add(cls, *xs: Tensor) -> Tensor:
            return functools.reduce(torch.logaddexp, xs)

        @classmethod
        def prod(cls, x: Tensor, dim: int, *, keepdim: bool = False) -> Tensor:
            return x.sum(dim=dim, keepdim=keepdim)

        @classmethod
        def mul(cls, *xs: Tensor) -> Tensor:
            return functools.reduce(torch.add, xs)

        @classmethod
        def apply_reduce(cls, func: Any, *xs: Tensor, dim: int, keepdim: bool) -> Tensor:
            tops = [torch.amax(x, dim=dim, keepdim=True).clamp(min=torch.finfo(x.dtype).min) for x in xs]
            out = func(*[torch.exp(x - t) for x, t in zip(xs, tops)])
            shift = functools.reduce(torch.add, tops)
            return torch.log(out) + (shift if keepdim else shift.squeeze(dim))

    base.register(UNCLAMPED_SEMIRING)(UnclampedLSESum)
    UnclampedLSESum.register_map_from(lse)(lambda x: x)
    lse.register_map_from(UnclampedLSESum)(lambda x: x)
    UnclampedLSESum.register_map_from(sp)(torch.log)
    sp.register_map_from(UnclampedLSESum)(torch.exp)
