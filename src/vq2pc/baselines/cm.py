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
``[B, M]`` are :func:`vq2pc.core.leaf_ops.component_log_likelihoods`, shared with
fine-tuned distillation (Gaussian: one float64 product ``[x², x] @ [a; b]``;
categorical: indexed log-probabilities).

:func:`compile_cm` fixes ``num_points`` Sobol points (2^14 in the paper), decodes
their leaves once and returns a ``MixtureCircuit`` with uniform weights, so every
query of the CM is answered by the same engine as the distilled models.
``ContinuousMixture.num_params`` is the decoder size (what the paper plots);
the compiled circuit's size is ``MixtureCircuit.num_params``.

``recipe="paper"`` is the recipe of the distillation paper's own CM code instead
(:mod:`vq2pc.baselines.cm_paper` trains it): a convolutional decoder (a linear layer to a
``channels × feature_hw`` map, then the VQ-VAE decoder's blocks of :mod:`vq2pc.models.nets` and its
pixel head), a FIXED grid of ``points`` Sobol points drawn once from ``grid_seed`` (a buffer of the model,
uniform weights: the model is the compiled mixture, trained and tested alike), and training on each
image's top-``top_k`` grid points by posterior. Its batch norms are frozen (statistics of the grid's
first points at initialization), so a component's leaves do not depend on the batch that decodes it.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Callable, Literal, get_args

import numpy as np
import torch
from pydantic import AfterValidator, model_validator
from scipy.stats import norm, qmc
from torch import Tensor, nn

from vq2pc.baselines.cm_paper import GridLoss
from vq2pc.circuit.distill import decode_leaf
from vq2pc.circuit.mixture import MixtureCircuit
from vq2pc.core.checkpoint import SavableModel
from vq2pc.core.devices import flush_denormals
from vq2pc.core.leaf_ops import component_log_likelihoods
from vq2pc.core.leaves import Categorical, Gaussian, Leaf
from vq2pc.core.random import step_seed
from vq2pc.core.settings import AsTuple, Count, Levels, Natural, Positive, settings
from vq2pc.core.validate import rows
from vq2pc.data.datasets import DataSplits, check_fits
from vq2pc.models.nets import (
    STD_MAX,
    STD_MIN,
    Decoder,
    halving_sizes,
    head_channels,
    head_leaf,
    init_head,
    num_downsamplings,
)
from vq2pc.models.train import TrainConfig, TrainResult, completed_steps, dequantize_once, fit, step_dequantizer

__all__ = ["CMConfig", "ContinuousMixture", "sobol_normal", "train_cm", "compile_cm", "CM_RECIPES"]

Recipe = Literal["mlp", "paper"]
CM_RECIPES: tuple[str, ...] = get_args(Recipe)


def _power_of_two(n: int, name: str = "") -> int:
    """``n``, unless it is not a power of 2 (a Sobol sequence's length)."""
    if int(n) < 1 or int(n) & (int(n) - 1):
        raise ValueError(f"{name + ' ' if name else ''}must be a power of 2 (Sobol points), got {n}")
    return n


SobolPoints = Annotated[int, AfterValidator(_power_of_two)]
"""A number of Sobol points: a power of 2."""


@settings
class CMConfig:
    """A continuous mixture: latent size, decoder and how it trains (``recipe``, see the module docstring).

    ``mlp``: an MLP of width ``hidden`` trained on ``train_points`` fresh integration points per step.
    ``paper``: a convolutional decoder (``channels``, ``feature_hw``, ``res_blocks``) over a fixed grid of
    ``points`` Sobol points (``grid_seed``), trained on each image's ``top_k`` grid points by a posterior
    refreshed every ``refresh`` steps (the paper code: top 1, re-scored every step)."""

    image_shape: Annotated[tuple[Count, Count, Count], AsTuple]
    leaf: Literal["gaussian", "categorical"] = "gaussian"
    levels: Levels = 256
    latent_dim: Count = 16
    hidden: Count = 64
    train_points: SobolPoints = 2**10
    min_std: Positive = 1e-3
    max_std: Positive = 1.0
    recipe: Recipe = "mlp"
    channels: Count = 32  # paper: channels of the convolutional decoder
    # paper: the linear layer's map, upsampled by transposed convs to H×W
    feature_hw: Annotated[tuple[Count, Count], AsTuple] = (4, 4)
    res_blocks: Natural = 1  # paper: residual blocks at feature_hw
    points: SobolPoints = 2**14  # paper: the fixed grid (= the compiled circuit's components)
    grid_seed: Natural = 0  # paper: seed of the grid's scrambled Sobol sequence
    refresh: Count = 100  # paper: training steps between re-decodes of the whole grid (to find the top-k)
    top_k: Count = 1  # paper: grid points per image that get gradients

    @model_validator(mode="after")
    def _agree(self) -> CMConfig:
        """The std range is not empty; the paper recipe's grid, head and feature map fit together."""
        if not self.min_std < self.max_std:
            raise ValueError(f"need min_std < max_std, got {self.min_std}, {self.max_std}")
        if self.recipe != "paper":
            return self
        if self.top_k > self.points:
            raise ValueError(f"the paper recipe's top_k must be <= points ({self.points}), got {self.top_k}")
        if (self.min_std, self.max_std) != (STD_MIN, STD_MAX):
            raise ValueError(
                f"the paper recipe uses the VQ-VAE's Gaussian head, stds in [{STD_MIN:g}, {STD_MAX:g}]; "
                f"got min_std={self.min_std:g}, max_std={self.max_std:g}"
            )
        if num_downsamplings(self.image_shape[1:], self.feature_hw) < 1:  # raises if H×W is not reached by doubling
            raise ValueError(f"the paper recipe's feature_hw must be smaller than the image, got {self.feature_hw}")
        return self

    @property
    def num_variables(self) -> int:
        return math.prod(self.image_shape)

    def record(self) -> dict:
        """The config as a checkpoint records it; an MLP recipe's without the paper recipe's fields, as
        before those existed (so a checkpoint written then still resumes)."""
        out = asdict(self)
        return {k: v for k, v in out.items() if k not in PAPER_FIELDS} if self.recipe == "mlp" else out


PAPER_FIELDS = ("recipe", "channels", "feature_hw", "res_blocks", "points", "grid_seed", "refresh", "top_k")


def sobol_normal(num_points: int, dim: int, seed: int | np.random.Generator | None = None) -> Tensor:
    """``[num_points, dim]`` float32 randomized-QMC standard-normal points (scrambled Sobol + Φ⁻¹)."""
    _power_of_two(num_points, "num_points")
    u = qmc.Sobol(d=dim, scramble=True, seed=seed).random_base2(m=int(num_points).bit_length() - 1)
    eps = np.finfo(np.float32).eps
    return torch.from_numpy(norm.ppf(np.clip(u, eps, 1.0 - eps))).float()


class ConvDecoder(nn.Module):
    """``z [M, d] -> [M, head_channels, H, W]``: a linear layer to a ``channels × feature_hw`` map, then the
    VQ-VAE decoder (:class:`vq2pc.models.nets.Decoder`: 1×1 conv, residual blocks, transposed convs up to
    H×W) whose last transposed conv is the head, as in the paper's CM decoder (``head_upsamples``: 6× less
    work per point than a full-resolution layer and a head conv); the Gaussian std starts near ``STD_INIT``."""

    def __init__(self, cfg: CMConfig) -> None:
        super().__init__()
        image_hw = cfg.image_shape[1:]
        self.map_shape = (cfg.channels, *cfg.feature_hw)
        self.linear = nn.Linear(cfg.latent_dim, math.prod(self.map_shape))
        sizes = halving_sizes(image_hw, num_downsamplings(image_hw, cfg.feature_hw))
        out = head_channels(cfg.leaf, cfg.image_shape[0], cfg.levels)
        self.net = Decoder(cfg.channels, cfg.channels, out, sizes, cfg.res_blocks, head_upsamples=True)
        init_head(self.net.head, cfg.leaf, cfg.image_shape[0])

    def forward(self, z: Tensor) -> Tensor:
        return self.net(self.linear(z).reshape(-1, *self.map_shape))


class ContinuousMixture(SavableModel, nn.Module):
    """Decoder ``z [M, d] -> leaf [M, S]`` and the integration-point likelihood. ``recipe="mlp"``: an MLP
    (d -> h -> 2h -> S·P); ``recipe="paper"``: a :class:`ConvDecoder` and the fixed grid ``grid [M, d]``."""

    checkpoint_kind = "cm"
    config_class = CMConfig

    def __init__(self, cfg: CMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        if cfg.recipe == "paper":
            self.decoder: nn.Module = ConvDecoder(cfg)
            self.register_buffer("grid", sobol_normal(cfg.points, cfg.latent_dim, cfg.grid_seed))
            self._calibrate_batchnorm()
            return
        per_pixel = 2 if cfg.leaf == "gaussian" else cfg.levels
        h = cfg.hidden
        self.decoder = nn.Sequential(
            nn.Linear(cfg.latent_dim, h),
            nn.LeakyReLU(0.1),
            nn.Linear(h, 2 * h),
            nn.LeakyReLU(0.1),
            nn.Linear(2 * h, cfg.num_variables * per_pixel),
        )

    @torch.no_grad()
    def _calibrate_batchnorm(self, points: int = 1024) -> None:
        """Set every batch norm's statistics to those of the grid's first ``points`` points (a balanced
        Sobol subset), then freeze them (:meth:`train` keeps them in eval mode)."""
        norms = [m for m in self.decoder.modules() if isinstance(m, nn.BatchNorm2d)]
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # a cumulative average: one pass gives the batch's statistics
            m.train()
        self.decoder(self.grid[:points])
        for m in norms:
            m.momentum = 0.1
            m.eval()

    def train(self, mode: bool = True) -> ContinuousMixture:
        """``nn.Module.train``, except that the paper recipe's batch norms stay frozen."""
        super().train(mode)
        if self.cfg.recipe == "paper":
            for m in self.decoder.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()
        return self

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
        if self.cfg.recipe == "paper":
            return head_leaf(out, self.cfg.leaf, self.cfg.image_shape[0], self.cfg.levels)
        s = self.cfg.num_variables
        if self.cfg.leaf == "categorical":
            return Categorical(out.reshape(-1, s, self.cfg.levels))
        out = out.reshape(-1, s, 2)
        std = self.cfg.min_std + (self.cfg.max_std - self.cfg.min_std) * torch.sigmoid(out[..., 1])
        return Gaussian(torch.sigmoid(out[..., 0]), std)

    def component_log_likelihoods(self, x: Tensor, z: Tensor | None = None) -> Tensor:
        """``x [B, S]`` (model space), ``z [M, d]`` (default: the paper recipe's grid) -> ``[B, M]``
        log p(x | z_j), by matrix products."""
        z = self._points(z)
        s = self.cfg.num_variables
        x = rows(x, s).to(self.device, torch.float32)
        leaf = self.decode(z)
        leaf.validate_data(x)
        return component_log_likelihoods(leaf, x)

    def log_prob(self, x: Tensor, z: Tensor | None = None) -> Tensor:
        """``[B]`` integration-point estimate ``logsumexp_j log p(x | z_j) − log M`` (over the paper recipe's
        grid by default: then it is exact, the model's own likelihood)."""
        z = self._points(z)
        return torch.logsumexp(self.component_log_likelihoods(x, z), 1) - math.log(z.shape[0])

    def _points(self, z: Tensor | None) -> Tensor:
        if z is not None:
            return z
        if self.cfg.recipe != "paper":
            raise ValueError("an MLP-recipe CM has no grid of its own: pass the integration points z [M, d]")
        return self.grid


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
    """Fit a continuous mixture by maximum likelihood with :func:`train.fit` (kind ``cm``); dequantization
    noise is drawn per step (seeded by the step). ``recipe="mlp"``: the RQMC estimate over fresh integration
    points per step (seeded by the step); ``recipe="paper"``: the grid's top-k bound
    (:class:`~vq2pc.baselines.cm_paper.GridLoss`), early-stopped on the exact validation likelihood."""
    check_fits(cfg.image_shape, cfg.levels, splits)
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's global RNG
        torch.manual_seed(train_cfg.seed)
        model = ContinuousMixture(cfg)
    first = completed_steps(checkpoint, "cm", len(splits.train_x), train_cfg.batch_size)
    val = (dequantize_once(splits.val_x, cfg.leaf, cfg.levels, train_cfg.seed),)
    if cfg.recipe == "paper":
        loss: Callable[[nn.Module, tuple[Tensor, ...]], Tensor] = GridLoss(
            model, first, math.ceil(len(splits.train_x) / train_cfg.batch_size)
        )
    else:
        loss = _cm_loss(cfg, train_cfg.seed, first)
    with flush_denormals(train_cfg.device):  # the posterior's tiny gradients (~1.9x per step on MNIST)
        result = fit(
            model,
            loss,
            (splits.train_x,),
            val,
            train_cfg,
            checkpoint=checkpoint,
            kind="cm",
            meta={"config": cfg.record()},
            desc="cm",
            prepare=step_dequantizer(cfg.leaf, cfg.levels, train_cfg.seed, first),
        )
    return model, result


@torch.no_grad()
def compile_cm(
    model: ContinuousMixture,
    num_points: int = 2**14,
    seed: int = 0,
    *,
    batch_size: int = 1024,
    memory_budget_mib: float = 1024,
) -> MixtureCircuit:
    """A ``MixtureCircuit`` with ``num_points`` uniformly weighted components: the decoded Sobol points
    (seeded by ``seed``). A paper-recipe CM is its own grid: ``num_points`` and ``seed`` must be its
    ``points`` and ``grid_seed``."""
    cfg = model.cfg
    if cfg.recipe == "paper":
        if (num_points, seed) != (cfg.points, cfg.grid_seed):
            raise ValueError(
                f"a paper-recipe CM is the mixture over its own grid of {cfg.points} points (seed "
                f"{cfg.grid_seed}); got num_points={num_points}, seed={seed}"
            )
        z = model.grid
    else:
        z = sobol_normal(num_points, cfg.latent_dim, seed).to(model.device)
    leaf = decode_leaf(model, z, batch_size)
    meta = {
        "source": "continuous-mixture",
        "latent_dim": cfg.latent_dim,
        "num_points": int(num_points),
        "seed": int(seed),
        "decoder_params": model.num_params,
        "recipe": cfg.recipe,
    }
    return MixtureCircuit(
        leaf, torch.zeros(num_points, device=model.device), memory_budget_mib=memory_budget_mib, meta=meta
    )
