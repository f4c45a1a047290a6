"""The few ``torch.distributed`` helpers vq2pc needs; every one is a no-op in a single process.

vq2pc scales out on the engine PyTorch users already run: ``torchrun`` starts P
processes with ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT`` in their environment; :func:`init_from_env` turns that into a process
group (``nccl`` on CUDA, ``gloo`` on CPU). Without those variables nothing happens and
every helper below answers as a world of one.

Contract: in a process group, every rank calls the same collective helpers in the same
order (:func:`all_reduce_logsumexp`, :func:`barrier`, the sharded enumeration and ExM
passes, :func:`vq2pc.core.files.atomic_write`); a helper called on one rank only hangs.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "is_distributed", "rank", "world_size", "is_main", "barrier", "init_from_env", "shutdown",
    "shard_range", "all_reduce_logsumexp", "all_reduce_sum", "all_reduce_max_", "gather_rows",
]


def is_distributed() -> bool:
    """Whether a process group with more than one rank is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Number of ranks P (1 without a process group)."""
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Whether this process writes files and prints: rank 0, or the only process."""
    return rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op in one process)."""
    if is_distributed():
        dist.barrier()


def init_from_env(device: str = "cpu", timeout_s: float = 1800.0) -> str:
    """Start the process group when launched by ``torchrun`` (``WORLD_SIZE`` > 1 in the environment).

    Returns the device this rank computes on: ``cuda`` becomes ``cuda:<LOCAL_RANK>``. Backend:
    ``nccl`` for CUDA devices, ``gloo`` otherwise. Idempotent; without ``torchrun`` it returns
    ``device`` unchanged.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device
    cuda = torch.device(device).type == "cuda"
    if cuda:
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but CUDA is not available on this node")
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s))
    return device


def shutdown() -> None:
    """Destroy the process group, if one was started."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def shard_range(n: int, r: int | None = None, p: int | None = None) -> tuple[int, int]:
    """Rank ``r``'s contiguous slice ``[lo, hi)`` of ``n`` items out of ``p`` near-equal slices
    (defaults: this rank of this world). The slices tile ``[0, n)`` in rank order."""
    r = rank() if r is None else int(r)
    p = world_size() if p is None else int(p)
    return n * r // p, n * (r + 1) // p


def all_reduce_sum(t: Tensor) -> Tensor:
    """Sum of ``t`` over ranks (a new tensor; ``t`` itself without a process group)."""
    if not is_distributed():
        return t
    out = t.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def all_reduce_max_(t: Tensor) -> Tensor:
    """Elementwise maximum over ranks, in place; returns ``t``."""
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def all_reduce_logsumexp(t: Tensor) -> Tensor:
    """Elementwise ``log Σ_ranks exp(t)``, exact: an all-reduce of the maximum ``m``, then one of
    ``Σ exp(t - m)``. ``t`` any shape; entries that are ``-inf`` on every rank stay ``-inf``."""
    if not is_distributed():
        return t
    m = all_reduce_max_(t.clone())
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    s = all_reduce_sum(torch.exp(t - m))
    return m + torch.log(s)


def gather_rows(local: Tensor, n: int) -> Tensor:
    """Concatenate in rank order the rows each rank computed for its :func:`shard_range` of ``n``
    rows: ``local [hi-lo, ...]`` -> ``[n, ...]`` on every rank."""
    if not is_distributed():
        return local
    p = world_size()
    sizes = [shard_range(n, r, p) for r in range(p)]
    width = max(hi - lo for lo, hi in sizes)
    padded = local.new_zeros((width, *local.shape[1:]))
    padded[: local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in range(p)]
    dist.all_gather(parts, padded)
    return torch.cat([part[: hi - lo] for part, (lo, hi) in zip(parts, sizes)])

