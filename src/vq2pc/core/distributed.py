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
from contextlib import contextmanager
from datetime import timedelta
from typing import Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = [
    "is_distributed",
    "rank",
    "world_size",
    "is_main",
    "barrier",
    "init_from_env",
    "shutdown",
    "shard_range",
    "all_reduce_logsumexp",
    "all_reduce_sum",
    "all_reduce_max_",
    "gather_rows",
    "GlobalBatchNorm2d",
    "global_batchnorm",
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


def shutdown(wait: bool = False) -> None:
    """Destroy the process group, if one was started. ``wait``: first wait for every rank (after a
    success, so that no rank tears its connections down while another still talks to it; never after
    a failure, where the other ranks may never arrive)."""
    if dist.is_available() and dist.is_initialized():
        if wait:
            dist.barrier()
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


def gather_rows(local: Tensor) -> Tensor:
    """Concatenate in rank order every rank's rows ``local [n_r, ...]`` (sizes may differ) -> ``[Σ n_r, ...]``
    on every rank. With contiguous :func:`shard_range` slices this reassembles the global order."""
    if not is_distributed():
        return local
    p = world_size()
    sizes = [torch.zeros(1, dtype=torch.long, device=local.device) for _ in range(p)]
    dist.all_gather(sizes, torch.tensor([local.shape[0]], device=local.device))
    counts = [int(c) for c in sizes]
    padded = local.new_zeros((max(counts), *local.shape[1:]))
    padded[: local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in range(p)]
    dist.all_gather(parts, padded)
    return torch.cat([part[:c] for part, c in zip(parts, counts)])


class _SumOverRanks(torch.autograd.Function):
    """Differentiable sum over ranks: the gradient of every rank's input is the sum of the output gradients."""

    @staticmethod
    def forward(ctx, t: Tensor) -> Tensor:  # noqa: ANN001
        return all_reduce_sum(t)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # noqa: ANN001
        return all_reduce_sum(grad.contiguous())


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """``BatchNorm2d`` whose training statistics are those of the global batch over all ranks.

    Same parameters, buffers and state-dict keys as ``nn.BatchNorm2d`` (see :func:`global_batchnorm`);
    outside a process group, or in eval mode, it is ``BatchNorm2d`` itself. Unlike ``nn.SyncBatchNorm``
    it runs on CPU (gloo) too: two differentiable all-reduces (sum, then squared deviations) per call,
    so the gradients are those of the global batch, as in one process.
    """

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and is_distributed()):
            return super().forward(x)
        dims = (0, 2, 3)
        count = float(all_reduce_sum(torch.tensor(float(x.numel() // x.shape[1]), device=x.device)))
        mean = _SumOverRanks.apply(x.sum(dims)) / count
        centred = x - mean[None, :, None, None]
        var = _SumOverRanks.apply(centred.pow(2).sum(dims)) / count
        if self.track_running_stats:
            self._update_running(mean.detach(), var.detach() * count / max(count - 1.0, 1.0))
        y = centred * torch.rsqrt(var + self.eps)[None, :, None, None]
        return y * self.weight[None, :, None, None] + self.bias[None, :, None, None] if self.affine else y

    @torch.no_grad()
    def _update_running(self, mean: Tensor, var_unbiased: Tensor) -> None:
        self.num_batches_tracked += 1
        f = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        self.running_mean.mul_(1 - f).add_(mean, alpha=f)
        self.running_var.mul_(1 - f).add_(var_unbiased, alpha=f)


@contextmanager
def global_batchnorm(model: nn.Module) -> Iterator[nn.Module]:
    """While a process group runs, every ``BatchNorm2d`` of ``model`` normalizes with global-batch
    statistics (:class:`GlobalBatchNorm2d`, swapped in place: same parameters and buffers);
    restored on exit. A no-op in one process."""
    swapped = [m for m in model.modules() if type(m) is nn.BatchNorm2d] if is_distributed() else []
    for m in swapped:
        m.__class__ = GlobalBatchNorm2d
    try:
        yield model
    finally:
        for m in swapped:
            m.__class__ = nn.BatchNorm2d
