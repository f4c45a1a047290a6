"""The settings and the result of a training run (:class:`TrainConfig`, :class:`TrainResult`) and the data
helpers every trainer shares: batch order, resume position and step-seeded dequantization. The loop itself
is :func:`vq2pc.models.train.fit`."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Sequence, get_args

import torch
from pydantic import Field
from torch import Tensor

from vq2pc.core.checkpoint import load_checkpoint
from vq2pc.core.random import step_seed
from vq2pc.core.settings import Count, Natural, Positive, settings
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
Schedule = Literal["constant", "cosine"]
SCHEDULES: tuple[str, ...] = get_args(Schedule)


@settings
class TrainConfig:
    """Optimization settings shared by every trainer (impossible values fail when the config is built,
    not an epoch into training)."""

    epochs: Count = Field(30, description="maximum epochs")
    patience: Natural = Field(15, description="early-stopping patience (epochs without improvement)")
    lr: Positive = Field(1e-3, description="Adam learning rate")
    batch_size: Count = Field(128, description="mini-batch size")
    seed: Natural = 0
    device: str = "cpu"
    progress: bool = True
    max_seconds: Positive | None = Field(
        None, description="stop training after this wall time, keeping the best weights"
    )
    amp: Literal["bf16", "fp16"] | None = Field(
        None, description="mixed-precision training (autocast) on CUDA; refused on CPU"
    )
    compile: bool = Field(False, description="torch.compile the training step")
    schedule: Schedule = Field(
        "constant", description="learning rate: constant, or cosine decay to 0 over the epochs (per step)"
    )
    clip: Positive | None = Field(None, description="clip each step's gradient to this global norm")


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
