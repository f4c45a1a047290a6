"""The settings of fine-tuned distillation (:class:`FineTuneConfig`), declared once: types, ranges, choices
and help text, read by the run config, the YAML loader and the ``finetune`` verb alike."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Literal, get_args

from pydantic import Field

from vq2pc.core.settings import Count, Levels, Natural, Positive, settings
from vq2pc.models.train_config import Schedule

__all__ = ["FineTuneConfig", "COMPONENT_MODES"]

ComponentMode = Literal["posterior", "random"]
COMPONENT_MODES: tuple[str, ...] = get_args(ComponentMode)


@settings
class FineTuneConfig:
    """Settings of :func:`~vq2pc.circuit.finetune.finetune` (see its module docstring for ``components``).

    The defaults are the recipe of the MNIST configs (``configs/mnist-ft-2h-cpu.yaml``, docs/NOTES.md):
    each image's top-1 component gets gradients, Adam at 1e-3 decaying (cosine) to 0 over 12 epochs,
    the best validation epoch kept. Those configs also clip gradients (``clip: 300``, Gaussian MNIST
    pixels) and refresh less often above N = 4096 (``refresh_N``); both stay off by default."""

    epochs: Count = Field(12, description="maximum fine-tuning epochs")
    patience: Natural = Field(
        12,
        description="stop after this many epochs without a better validation likelihood (= epochs: the "
        "cosine rate's last epochs often win back a dip)",
    )
    lr: Positive = Field(1e-3, description="Adam learning rate")
    schedule: Schedule = Field(
        "cosine", description="learning rate: constant, or cosine decay to 0 over the epochs (per step)"
    )
    batch_size: Count = Field(64, description="training images per step")
    components: ComponentMode = Field(
        "posterior",
        description="which components get gradients each step: each image's top-k by posterior, or a random subset",
    )
    top_k: Count = Field(1, description="posterior: components per image")
    refresh: Count = Field(
        100,
        description="posterior: steps between re-decodes of all N components (to pick the top-k), counted from "
        "each epoch's start",
    )
    refresh_N: Count | None = Field(
        None,
        description="posterior: above this N, re-decode every refresh·N/refresh_N steps instead (the same "
        "decoding cost per step as at this N; at N = 16384 on MNIST, 4x less often gave a better circuit in "
        "30% less time; default: every refresh steps at any N)",
    )
    subset: Count = Field(256, description="random: components per step")
    clip: Positive | None = Field(
        None,
        description="clip each step's gradient to this global norm (images no component covers give rare huge "
        "gradients; 300 suits MNIST Gaussian pixels; default: no clipping)",
    )
    learn_weights: bool = Field(True, description="train the mixture weights jointly (else keep the selection's)")
    std_max: Positive | None = Field(
        None,
        description="Gaussian leaves: cap every std smoothly below this, in training and in the circuit "
        "(sharper, class-balanced samples at a cost in BPD; 0.125 on MNIST pixels in [0, 1]; default: no cap)",
    )
    discretized: Levels | None = Field(
        None,
        description="Gaussian leaves: train and build the exact discrete mixture, each leaf its L-level twin "
        "(L = this); data are integer levels, not dequantized",
    )
    train_limit: Count | None = Field(None, description="use only the first images of the training split")
    val_limit: Count | None = Field(None, description="use only the first images of the validation split")
    seed: Natural = 0
    device: str = "cpu"
    progress: bool = True

    def for_N(self, N: int) -> FineTuneConfig:
        """These settings for a mixture of ``N`` components: ``refresh_N`` resolved into ``refresh``."""
        if self.refresh_N is None or N <= self.refresh_N:
            return replace(self, refresh_N=None)
        return replace(self, refresh=math.ceil(self.refresh * N / self.refresh_N), refresh_N=None)
