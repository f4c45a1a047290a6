"""Continuous-mixture (CM) baseline, Correia et al. (2023, arXiv:2209.10584), compiled into a ``MixtureCircuit``.

``p(x) = ∫ N(z; 0, I) Π_i p(x_i | φ_i(z)) dz`` with a ``latent_dim``-dimensional
``z`` (16 in the paper) and a decoder network ``φ`` mapping ``z`` to the leaf
parameters of every pixel (Gaussian: mean by a sigmoid, std squashed into
``[min_std, max_std] = [1e-3, 1]``; categorical: logits over ``L`` levels).

Training maximizes the integration-point estimate
``log p(x) ≈ logsumexp_j log p(x | z_j) − log M`` with ``M = train_points`` points
drawn by randomized quasi-Monte Carlo — a scrambled Sobol sequence mapped through
the standard-normal inverse CDF — freshly at every step (validation uses one fixed
set, so early stopping compares like with like). The per-point log-likelihoods
``[B, M]`` are :func:`vq2pc.core.leaves.component_log_likelihoods`, shared with
fine-tuned distillation (Gaussian: one float64 product ``[x², x] @ [a; b]``;
categorical: indexed log-probabilities).

:func:`compile_cm` fixes ``num_points`` Sobol points (2^14 in the paper), decodes
their leaves once and returns a ``MixtureCircuit`` with uniform weights, so every
query of the CM is answered by the same engine as the distilled models.
``ContinuousMixture.num_params`` is the decoder size (what the paper plots);
the compiled circuit's size is ``MixtureCircuit.num_params``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from scipy.stats import norm, qmc
from torch import Tensor, nn

from vq2pc.circuit.distill import decode_leaf
from vq2pc.circuit.mixture import MixtureCircuit
from vq2pc.core.checkpoint import SavableModel
from vq2pc.core.devices import flush_denormals
from vq2pc.core.leaves import Categorical, Gaussian, Leaf, component_log_likelihoods
from vq2pc.core.random import step_seed
from vq2pc.core.validate import rows
from vq2pc.data.datasets import DataSplits, check_fits
from vq2pc.models.train import TrainConfig, TrainResult, completed_steps, dequantize_once, fit, step_dequantizer

__all__ = ["CMConfig", "ContinuousMixture", "sobol_normal", "train_cm", "compile_cm"]


@dataclass
class CMConfig:
    """A continuous mixture: latent size, decoder width and training integration points (a power of 2)."""

    image_shape: tuple[int, int, int]
    leaf: str = "gaussian"
    levels: int = 256
    latent_dim: int = 16
    hidden: int = 64
    train_points: int = 2**10
    min_std: float = 1e-3
    max_std: float = 1.0

    def __post_init__(self) -> None:
        self.image_shape = tuple(int(s) for s in self.image_shape)  # type: ignore[assignment]
        if len(self.image_shape) != 3 or min(self.image_shape) < 1:
            raise ValueError(f"image_shape must be (C, H, W) with positive sizes, got {self.image_shape}")
        if self.leaf not in ("gaussian", "categorical"):
            raise ValueError(f"CM leaf must be 'gaussian' or 'categorical', got {self.leaf!r}")
        if self.levels < 2 or self.latent_dim < 1 or self.hidden < 1:
            raise ValueError("levels must be >= 2, latent_dim and hidden >= 1")
        _check_power_of_two(self.train_points, "train_points")
        if not 0 < self.min_std < self.max_std:
            raise ValueError(f"need 0 < min_std < max_std, got {self.min_std}, {self.max_std}")

    @property
    def num_variables(self) -> int:
        return math.prod(self.image_shape)


def _check_power_of_two(n: int, name: str) -> None:
    if int(n) < 1 or int(n) & (int(n) - 1):
        raise ValueError(f"{name} must be a power of 2 (Sobol points), got {n}")


def sobol_normal(num_points: int, dim: int, seed: int | np.random.Generator | None = None) -> Tensor:
    """``[num_points, dim]`` float32 randomized-QMC standard-normal points (scrambled Sobol + Φ⁻¹)."""
    _check_power_of_two(num_points, "num_points")
    u = qmc.Sobol(d=dim, scramble=True, seed=seed).random_base2(m=int(num_points).bit_length() - 1)
    eps = np.finfo(np.float32).eps
    return torch.from_numpy(norm.ppf(np.clip(u, eps, 1.0 - eps))).float()


class ContinuousMixture(SavableModel, nn.Module):
    """Decoder ``z [M, d] -> leaf [M, S]`` (MLP: d -> h -> 2h -> S·P) and the integration-point likelihood."""

    checkpoint_kind = "cm"
    config_class = CMConfig

    def __init__(self, cfg: CMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        per_pixel = 2 if cfg.leaf == "gaussian" else cfg.levels
        h = cfg.hidden
        self.decoder = nn.Sequential(
            nn.Linear(cfg.latent_dim, h), nn.LeakyReLU(0.1),
            nn.Linear(h, 2 * h), nn.LeakyReLU(0.1),
            nn.Linear(2 * h, cfg.num_variables * per_pixel),
        )

    @property
    def num_params(self) -> int:
        """Decoder parameters (the CM's size in the paper's Fig. 2)."""
        return sum(p.numel() for p in self.decoder.parameters())

    @property
    def device(self) -> torch.device:
        return next(self.decoder.parameters()).device

    def decode(self, z: Tensor) -> Leaf:
        """``z [M, d]`` -> ``Gaussian(mean, std [M, S])`` or ``Categorical(logits [M, S, L])``."""
        if z.dim() != 2 or z.shape[1] != self.cfg.latent_dim:
            raise ValueError(f"z must be [M, {self.cfg.latent_dim}], got {tuple(z.shape)}")
        out = self.decoder(z.to(self.device))
        s = self.cfg.num_variables
        if self.cfg.leaf == "categorical":
            return Categorical(out.reshape(-1, s, self.cfg.levels))
        out = out.reshape(-1, s, 2)
        std = self.cfg.min_std + (self.cfg.max_std - self.cfg.min_std) * torch.sigmoid(out[..., 1])
        return Gaussian(torch.sigmoid(out[..., 0]), std)

    def component_log_likelihoods(self, x: Tensor, z: Tensor) -> Tensor:
        """``x [B, S]`` (model space), ``z [M, d]`` -> ``[B, M]`` log p(x | z_j), by matrix products."""
        s = self.cfg.num_variables
        x = rows(x, s).to(self.device, torch.float32)
        leaf = self.decode(z)
        leaf.validate_data(x)
        return component_log_likelihoods(leaf, x)

    def log_prob(self, x: Tensor, z: Tensor) -> Tensor:
        """``[B]`` integration-point estimate ``logsumexp_j log p(x | z_j) − log M``."""
        return torch.logsumexp(self.component_log_likelihoods(x, z), 1) - math.log(z.shape[0])


def _cm_loss(cfg: CMConfig, seed: int, first_step: int) -> Callable[[nn.Module, tuple[Tensor, ...]], Tensor]:
    """Mean NLL (nats per dimension) of a batch in model space, with fresh RQMC points per training step
    (seeded by the step: the same on every rank and after a resume) and fixed ones for validation."""
    val_points = sobol_normal(cfg.train_points, cfg.latent_dim, seed + 1)
    step = [int(first_step)]

    def loss(model: nn.Module, batch: tuple[Tensor, ...]) -> Tensor:
        if model.training:
            z = sobol_normal(cfg.train_points, cfg.latent_dim, step_seed(seed, step[0]))
            step[0] += 1
        else:
            z = val_points
        x = batch[0].flatten(1)
        return -model.log_prob(x, z.to(x.device)).mean() / x.shape[1]

    return loss


def train_cm(
    splits: DataSplits, cfg: CMConfig, train_cfg: TrainConfig, checkpoint: str | Path | None = None
) -> tuple[ContinuousMixture, TrainResult]:
    """Fit a continuous mixture by maximum (RQMC-estimated) likelihood with :func:`train.fit` (kind ``cm``);
    dequantization noise and integration points are drawn per step (seeded by the step)."""
    check_fits(cfg.image_shape, cfg.levels, splits)
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's global RNG
        torch.manual_seed(train_cfg.seed)
        model = ContinuousMixture(cfg)
    first = completed_steps(checkpoint, "cm", len(splits.train_x), train_cfg.batch_size)
    val = (dequantize_once(splits.val_x, cfg.leaf, cfg.levels, train_cfg.seed),)
    with flush_denormals(train_cfg.device):  # the posterior's tiny gradients (~1.9x per step on MNIST)
        result = fit(model, _cm_loss(cfg, train_cfg.seed, first), (splits.train_x,), val, train_cfg,
                     checkpoint=checkpoint, kind="cm", meta={"config": asdict(cfg)}, desc="cm",
                     prepare=step_dequantizer(cfg.leaf, cfg.levels, train_cfg.seed, first))
    return model, result


@torch.no_grad()
def compile_cm(
    model: ContinuousMixture, num_points: int = 2**14, seed: int = 0, *, batch_size: int = 1024,
    memory_budget_mib: float = 1024,
) -> MixtureCircuit:
    """A ``MixtureCircuit`` with ``num_points`` uniformly weighted components: the decoded Sobol points."""
    z = sobol_normal(num_points, model.cfg.latent_dim, seed).to(model.device)
    leaf = decode_leaf(model, z, batch_size)
    meta = {"source": "continuous-mixture", "latent_dim": model.cfg.latent_dim, "num_points": int(num_points),
            "seed": int(seed), "decoder_params": model.num_params}
    return MixtureCircuit(leaf, torch.zeros(num_points, device=model.device), memory_budget_mib=memory_budget_mib, meta=meta)
