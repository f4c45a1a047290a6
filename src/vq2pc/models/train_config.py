"""The settings and the result of a training run (:class:`TrainConfig`, :class:`TrainResult`) and the data
helpers every trainer shares: batch order, resume position and step-seeded dequantization. The loop itself
is :func:`vq2pc.models.train.fit`."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from vq2pc.core.checkpoint import load_checkpoint
from vq2pc.core.random import step_seed
from vq2pc.core.validate import is_positive_number
from vq2pc.data.datasets import to_model_space

__all__ = [
    "SCHEDULES",
    "TrainConfig",
    "TrainResult",
    "batches",
    "completed_steps",
    "step_dequantizer",
    "dequantize_once",
]

Batch = tuple[Tensor, ...]
SCHEDULES = ("constant", "cosine")


@dataclass
class TrainConfig:
    """Optimization settings shared by every trainer."""

    epochs: int = 30
    patience: int = 15
    lr: float = 1e-3
    batch_size: int = 128
    seed: int = 0
    device: str = "cpu"
    progress: bool = True
    max_seconds: float | None = None  # stop (keeping the best weights) after this wall time
    amp: str | None = None  # "bf16" or "fp16": autocast on CUDA (refused on other devices)
    compile: bool = False  # torch.compile the training step
    schedule: str = "constant"  # constant | cosine (the learning rate decays to 0 over ``epochs`` epochs, per step)
    clip: float | None = None  # max global gradient norm per step (None: no clipping)

    def __post_init__(self) -> None:
        """Impossible settings fail here, when the config is built, not an epoch into training."""
        for name, low in (("epochs", 1), ("patience", 0), ("batch_size", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {list(SCHEDULES)}, got {self.schedule!r}")
        for name in ("lr", "max_seconds", "clip"):
            value = getattr(self, name)
            if (value is not None or name == "lr") and not is_positive_number(value):
                raise ValueError(f"{name} must be a positive number, got {value!r}")


@dataclass
class TrainResult:
    best_val_loss: float
    epochs_run: int
    stopped_early: bool
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)
    time_capped: bool = False  # training ended because ``max_seconds`` ran out (not by early stopping or epochs)
    best_epoch: int = 0  # the epoch whose weights were kept (0: the starting weights, under ``score_start``)
    start_val_loss: float | None = None  # the starting weights' validation loss (under ``score_start``)

    def summary(self) -> dict[str, Any]:
        """The JSON-able record a report gives of this training: its cost and how it ended."""
        return {
            "train_seconds": round(self.seconds, 3),
            "train_epochs": self.epochs_run,
            "stopped_early": self.stopped_early,
            "time_capped": self.time_capped,
        }


def batches(data: Sequence[Tensor], batch_size: int, generator: torch.Generator | None = None) -> list[Batch]:
    """Split tensors of equal first dimension into (shuffled if ``generator``) mini-batches."""
    n = data[0].shape[0]
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    return [tuple(t[order[i : i + batch_size]] for t in data) for i in range(0, n, batch_size)]


def completed_steps(checkpoint: str | Path | None, kind: str, num_train: int, batch_size: int) -> int:
    """Training steps already run by an interrupted :func:`fit` with this checkpoint (0 if none): a resumed
    run continues the per-step random draws where the interrupted one stopped."""
    if checkpoint is None or not Path(checkpoint).exists():
        return 0
    epochs = int(load_checkpoint(checkpoint, kind).get("train_state", {}).get("epoch", 0))
    return epochs * math.ceil(num_train / batch_size)


def step_dequantizer(leaf: str, levels: int, seed: int, first_step: int = 0) -> Callable[[Batch], Batch]:
    """``prepare`` for :func:`fit`: a global training batch of raw levels (first tensor) in model space,
    the noise of step ``t`` from a generator seeded by :func:`step_seed` — the same whatever the number
    of ranks, and the same after a resume (start at :func:`completed_steps`)."""
    step = [int(first_step)]

    def dequantize(batch: Batch) -> Batch:
        x = batch[0]
        gen = torch.Generator(device=x.device).manual_seed(step_seed(seed, step[0]))
        step[0] += 1
        return (to_model_space(x, leaf, levels, gen), *batch[1:])

    return dequantize


def dequantize_once(v: Tensor, leaf: str, levels: int, seed: int) -> Tensor:
    """Validation levels ``v`` in model space with fixed noise (seed ``seed + 1``): losses comparable across epochs."""
    return to_model_space(v, leaf, levels, torch.Generator().manual_seed(int(seed) + 1))
