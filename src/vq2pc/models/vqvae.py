"""The VQ-VAE: encoder → quantizer → decoder → per-pixel leaf head (paper App. A, C).

Data enter in model space (:func:`vq2pc.data.to_model_space`): dequantized
``[0, 1)`` reals for the Gaussian head, integer levels for the categorical
head, ``{0, 1}`` for the Bernoulli head. ``decode(codes)`` returns a
:mod:`vq2pc.core.leaves` leaf with batch shape ``[B, S]`` — the same object the
distilled circuit is built from.
"""

from __future__ import annotations

import math
from dataclasses import asdict, field
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import model_validator
from torch import Tensor, nn

from vq2pc.core.checkpoint import SavableModel
from vq2pc.core.leaves import LEAF_KINDS, Leaf
from vq2pc.core.settings import AsTuple, Count, Levels, Natural, NonNegative, settings
from vq2pc.data.datasets import (
    DataSplits,
    check_fits,
    check_model_space,
    to_model_space,
)
from vq2pc.models.nets import (
    Decoder,
    Encoder,
    halving_sizes,
    head_channels,
    head_leaf,
    init_head,
    num_downsamplings,
)
from vq2pc.models.quantizers import QUANTIZER_NAMES, QuantizerOutput, make_quantizer
from vq2pc.models.train import TrainConfig, TrainResult, completed_steps, dequantize_once, fit, step_dequantizer

__all__ = ["VQVAEConfig", "VQVAE", "train_vqvae", "encode_images"]


@settings
class VQVAEConfig:
    """Architecture of a VQ-VAE. ``quantizer_opts`` go to :func:`vq2pc.models.quantizers.make_quantizer`."""

    image_shape: Annotated[tuple[Count, Count, Count], AsTuple]
    levels: Levels
    leaf: Literal[tuple(LEAF_KINDS)] = "gaussian"  # type: ignore[valid-type]
    latent_hw: Annotated[tuple[Count, Count], AsTuple] = (2, 2)
    K: Count = 16
    D: Count = 16
    hidden: Count = 64
    res_blocks: Natural = 2
    beta: NonNegative = 0.25
    quantizer: Literal[QUANTIZER_NAMES] = "vq"  # type: ignore[valid-type]
    quantizer_opts: dict[str, Any] = field(default_factory=dict)

    @model_validator(mode="after")
    def _agree(self) -> VQVAEConfig:
        """The latent grid is reached from the image by halvings."""
        num_downsamplings(self.image_shape[1:], self.latent_hw)  # raises if the grid is unreachable
        return self

    @property
    def num_variables(self) -> int:
        """``S = C·H·W``."""
        return math.prod(self.image_shape)


class VQVAE(SavableModel, nn.Module):
    """Encoder, quantizer and decoder with a ``cfg.leaf`` pixel head (see module docstring)."""

    checkpoint_kind = "vqvae"
    config_class = VQVAEConfig

    def __init__(self, cfg: VQVAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        C, H, W = cfg.image_shape
        steps = num_downsamplings((H, W), cfg.latent_hw)
        self.encoder = Encoder(C, cfg.hidden, cfg.D, steps, cfg.res_blocks)
        self.quantizer = make_quantizer(cfg.quantizer, cfg.K, cfg.D, cfg.beta, **cfg.quantizer_opts)
        out = head_channels(cfg.leaf, C, cfg.levels)
        self.decoder = Decoder(cfg.D, cfg.hidden, out, halving_sizes((H, W), steps), cfg.res_blocks)
        init_head(self.decoder.head, cfg.leaf, C)

    @property
    def K(self) -> int:
        """Codebook size (:class:`vq2pc.core.protocols.Decoder`)."""
        return self.cfg.K

    @property
    def latent_hw(self) -> tuple[int, int]:
        """Latent grid ``(h, w)`` (:class:`vq2pc.core.protocols.Decoder`)."""
        return self.cfg.latent_hw

    @property
    def num_params(self) -> int:
        """Number of trainable and codebook parameters."""
        return sum(p.numel() for p in self.parameters())

    # --- input checks -------------------------------------------------------------------------------
    def _check_x_shape(self, x: Tensor) -> None:
        """Shape and dtype of ``x`` (no host sync: cheap enough for every training step)."""
        if x.dim() != 4 or tuple(x.shape[1:]) != self.cfg.image_shape:
            raise ValueError(
                f"x must have shape [B, {', '.join(map(str, self.cfg.image_shape))}], got {tuple(x.shape)}"
            )
        if not x.dtype.is_floating_point:
            raise ValueError(f"x must be float model-space data (see data.to_model_space), got dtype {x.dtype}")

    def _check_x(self, x: Tensor) -> None:
        """Everything about user-given ``x``: shape, dtype, finite, within the leaf's support (host syncs)."""
        self._check_x_shape(x)
        check_model_space(x, self.cfg.leaf, self.cfg.levels)

    def _check_codes(self, codes: Tensor) -> None:
        h, w = self.cfg.latent_hw
        if codes.dim() != 3 or tuple(codes.shape[1:]) != (h, w):
            raise ValueError(f"codes must have shape [B, {h}, {w}], got {tuple(codes.shape)}")
        if codes.dtype.is_floating_point or codes.dtype == torch.bool:
            raise ValueError(f"codes must be integer indices, got dtype {codes.dtype}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.cfg.K):
            raise ValueError(f"codes must lie in [0, {self.cfg.K - 1}], got [{int(codes.min())}, {int(codes.max())}]")

    # --- model --------------------------------------------------------------------------------------
    def _encoder_input(self, x: Tensor) -> Tensor:
        """Model-space ``x`` rescaled to about ``[0, 1]`` (categorical levels divided by ``L − 1``)."""
        return x / (self.cfg.levels - 1) if self.cfg.leaf == "categorical" else x

    def encode(self, x: Tensor) -> Tensor:
        """``x [B, C, H, W]`` (model space) -> ``z_e [B, D, h, w]``."""
        self._check_x(x)
        return self.encoder(self._encoder_input(x))

    def codes(self, x: Tensor) -> Tensor:
        """``x [B, C, H, W]`` -> nearest-codeword indices ``[B, h, w]`` (long, in ``0..K-1``)."""
        return self.quantizer.nearest(self.encode(x))

    def _head(self, z_q: Tensor) -> Leaf:
        C = self.cfg.image_shape[0]
        return head_leaf(self.decoder(z_q).float(), self.cfg.leaf, C, self.cfg.levels)  # float32 leaves under AMP

    def decode(self, codes: Tensor) -> Leaf:
        """``codes [B, h, w]`` -> leaf ``p(x | z)`` with batch shape ``[B, S]`` (variables in C, H, W order)."""
        self._check_codes(codes)
        return self._head(self.quantizer.embed(codes.long()))

    def _terms(self, x: Tensor) -> tuple[Tensor, Tensor, QuantizerOutput]:
        self._check_x_shape(x)  # the value checks run in `loss` (a user call), not every training step
        z_e = self.encoder(self._encoder_input(x))
        with torch.autocast(z_e.device.type, enabled=False):  # codebook, k-means and EMA stay float32 under AMP
            q = self.quantizer(z_e.float())
        recon = -self._head(q.z_q).log_prob(x.reshape(x.shape[0], -1)).sum(1).mean()
        return recon + q.loss, recon, q

    def objective(self, x: Tensor) -> Tensor:
        """The scalar training loss of :meth:`loss` without the statistics and without the value checks of
        ``x`` (no host sync: the trainer's batches come from ``data.to_model_space``)."""
        return self._terms(x)[0]

    def loss(self, x: Tensor) -> tuple[Tensor, dict[str, float]]:
        """Mean over the batch of ``−Σ_S log p(x | z_q)`` + quantizer loss, and the statistics
        ``recon_nll`` (nats per image), ``vq_loss`` and ``perplexity`` (of the batch's codes)."""
        self._check_x(x)
        total, recon, q = self._terms(x)
        return total, {
            "recon_nll": float(recon.detach()),
            "vq_loss": float(q.loss.detach()),
            "perplexity": float(q.perplexity),
        }


def train_vqvae(
    splits: DataSplits,
    cfg: VQVAEConfig,
    train_cfg: TrainConfig,
    checkpoint: str | Path | None = None,
) -> tuple[VQVAE, TrainResult]:
    """Fit a VQ-VAE on ``splits.train_x`` with early stopping on ``splits.val_x``.

    Training batches (``uint8`` levels) are mapped to model space per batch with
    fresh dequantization noise; the noise of step ``t`` comes from a generator
    seeded by ``(train_cfg.seed, t)``, so a run resumed from ``checkpoint`` draws
    the same noise as an uninterrupted one. The validation set is dequantized
    once with a fixed seed so validation losses are comparable across epochs.
    """
    check_fits(cfg.image_shape, cfg.levels, splits)
    torch.manual_seed(train_cfg.seed)
    model = VQVAE(cfg)
    first = completed_steps(checkpoint, "vqvae", len(splits.train_x), train_cfg.batch_size)

    def loss_fn(m: nn.Module, batch: tuple[Tensor, ...]) -> Tensor:
        return m.objective(batch[0])

    val = (dequantize_once(splits.val_x, cfg.leaf, cfg.levels, train_cfg.seed),)
    result = fit(
        model,
        loss_fn,
        (splits.train_x,),
        val,
        train_cfg,
        checkpoint,
        kind="vqvae",
        meta={"config": asdict(cfg)},
        desc="vqvae",
        prepare=step_dequantizer(cfg.leaf, cfg.levels, train_cfg.seed, first),
    )
    return model, result


@torch.no_grad()
def encode_images(vqvae: VQVAE, v: Tensor, seed: int = 0, batch_size: int = 1024) -> Tensor:
    """Codes ``[n, h, w]`` of raw images ``v`` (``uint8 [n, C, H, W]`` levels), in batches.

    Continuous pixels are dequantized with one fixed draw (``seed``), so the codes are reproducible.
    """
    gen = torch.Generator().manual_seed(seed)
    device = next(vqvae.parameters()).device
    vqvae.eval()
    parts = [
        vqvae.codes(to_model_space(v[i : i + batch_size], vqvae.cfg.leaf, vqvae.cfg.levels, gen).to(device)).cpu()
        for i in range(0, len(v), batch_size)
    ]
    return torch.cat(parts)
