"""Encoder, decoder and residual blocks of the VQ-VAE (paper App. C).

Every downsampling layer is a 3×3 convolution with stride 2 and padding 1, so a
side of length ``n`` becomes ``ceil(n / 2)`` (28 → 14 → 7 → 4 → 2 → 1,
8 → 4 → 2 → 1). The decoder mirrors it with 3×3 transposed convolutions whose
``output_padding`` restores the encoder's exact sizes (1 → 2 → 4 → 7 → 14 → 28).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from vq2pc.core.leaves import Bernoulli, Categorical, Gaussian, Leaf

__all__ = [
    "halving_sizes",
    "reachable_grids",
    "num_downsamplings",
    "ResBlock",
    "Encoder",
    "Decoder",
    "head_channels",
    "head_leaf",
    "init_head",
    "STD_MIN",
    "STD_MAX",
    "STD_INIT",
]

STD_MIN, STD_MAX = 1e-3, 1.0  # Gaussian head: std is kept in [STD_MIN, STD_MAX] (paper App. C)
STD_INIT = 0.25  # Gaussian head: initial std (a zero bias would give 0.03 and first losses ~100 nats/pixel)


def _halve(n: int) -> int:
    return (n + 1) // 2


def halving_sizes(image_hw: tuple[int, int], steps: int) -> list[tuple[int, int]]:
    """The ``steps + 1`` grid sizes from ``image_hw`` through ``steps`` stride-2 layers (ceil halving)."""
    sizes = [tuple(image_hw)]
    for _ in range(steps):
        h, w = sizes[-1]
        sizes.append((_halve(h), _halve(w)))
    return sizes


def reachable_grids(image_hw: tuple[int, int]) -> list[tuple[int, int]]:
    """Every latent grid reachable from ``image_hw`` by stride-2 layers, down to ``1×1``."""
    grids = [tuple(image_hw)]
    while grids[-1] != (1, 1):
        grids.append((_halve(grids[-1][0]), _halve(grids[-1][1])))
    return grids


def num_downsamplings(image_hw: tuple[int, int], latent_hw: tuple[int, int]) -> int:
    """Number of stride-2 layers taking ``image_hw`` to ``latent_hw``; ``ValueError`` if unreachable."""
    grids = reachable_grids(image_hw)
    if tuple(latent_hw) not in grids:
        names = ", ".join(f"{h}x{w}" for h, w in grids)
        raise ValueError(
            f"latent grid {latent_hw[0]}x{latent_hw[1]} is not reachable from a "
            f"{image_hw[0]}x{image_hw[1]} image by halving; reachable grids: {names}"
        )
    return grids.index(tuple(latent_hw))


def _conv_bn_relu(conv: nn.Module, channels: int) -> nn.Sequential:
    return nn.Sequential(conv, nn.BatchNorm2d(channels), nn.ReLU())


class ResBlock(nn.Module):
    """``x + BN(conv1x1(ReLU(BN(conv3x3(ReLU(x))))))``; ``[B, c, h, w] -> [B, c, h, w]``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 1, bias=False),
            nn.BatchNorm2d(channels),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class Encoder(nn.Module):
    """``[B, in_channels, H, W] -> [B, D, h, w]``: stride-2 conv+BN+ReLU layers, residual blocks, 1×1 conv."""

    def __init__(self, in_channels: int, hidden: int, D: int, downsamplings: int, res_blocks: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for _ in range(downsamplings):
            layers.append(_conv_bn_relu(nn.Conv2d(channels, hidden, 3, stride=2, padding=1, bias=False), hidden))
            channels = hidden
        if downsamplings == 0:  # latent grid = image grid: one stride-1 layer lifts to ``hidden`` channels
            layers.append(_conv_bn_relu(nn.Conv2d(channels, hidden, 3, padding=1, bias=False), hidden))
        layers += [ResBlock(hidden) for _ in range(res_blocks)]
        layers += [nn.ReLU(), nn.Conv2d(hidden, D, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class Decoder(nn.Module):
    """``[B, D, h, w] -> [B, out_channels, H, W]``: 1×1 conv, residual blocks, transposed convs, head conv.

    ``sizes`` are the encoder's grid sizes from the image down to the latent
    grid (:func:`halving_sizes`); each transposed conv restores the next one up.
    ``head_upsamples``: the last transposed conv is the head (it outputs ``out_channels``; no full-resolution
    ``hidden``-channel layer, the costliest of the decoder, and no head conv), as the continuous mixture's
    decoder in the paper's code; it needs at least one upsampling.
    """

    def __init__(
        self,
        D: int,
        hidden: int,
        out_channels: int,
        sizes: list[tuple[int, int]],
        res_blocks: int,
        head_upsamples: bool = False,
    ) -> None:
        super().__init__()
        if head_upsamples and len(sizes) < 2:
            raise ValueError("head_upsamples needs a latent grid smaller than the image (one upsampling at least)")
        layers: list[nn.Module] = [nn.Conv2d(D, hidden, 1)]
        layers += [ResBlock(hidden) for _ in range(res_blocks)]
        layers.append(nn.ReLU())
        ups = list(zip(reversed(sizes[:-1]), reversed(sizes[1:])))
        for i, ((big_h, big_w), (h, w)) in enumerate(ups):
            pad = (big_h - (2 * h - 1), big_w - (2 * w - 1))  # (h-1)·2 - 2 + 3 + pad = big
            if head_upsamples and i == len(ups) - 1:
                layers.append(nn.ConvTranspose2d(hidden, out_channels, 3, stride=2, padding=1, output_padding=pad))
                break
            up = nn.ConvTranspose2d(hidden, hidden, 3, stride=2, padding=1, output_padding=pad, bias=False)
            layers.append(_conv_bn_relu(up, hidden))
        else:
            layers.append(nn.Conv2d(hidden, out_channels, 3, padding=1))
        self.net = nn.Sequential(*layers)

    @property
    def head(self) -> nn.Conv2d | nn.ConvTranspose2d:
        """The last (transposed) convolution, whose channels parametrize the pixel leaves."""
        return self.net[-1]

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z)


def head_channels(leaf: str, channels: int, levels: int) -> int:
    """Output channels of the decoder for a pixel head: gaussian ``2C``, categorical ``L·C``, bernoulli ``C``."""
    per_channel = {"gaussian": 2, "categorical": levels, "bernoulli": 1}
    if leaf not in per_channel:
        raise ValueError(f"unknown leaf kind {leaf!r}; expected one of {sorted(per_channel)}")
    return per_channel[leaf] * channels


@torch.no_grad()
def init_head(head: nn.Conv2d | nn.ConvTranspose2d, leaf: str, channels: int) -> None:
    """Start a Gaussian head's std near :data:`STD_INIT` by setting the bias of its std channels."""
    if leaf == "gaussian":
        lo, hi = math.log(STD_MIN), math.log(STD_MAX)
        t = (math.log(STD_INIT) - lo) / (hi - lo)
        head.bias[channels:] = math.log(t / (1.0 - t))


def head_leaf(out: Tensor, leaf: str, channels: int, levels: int) -> Leaf:
    """Turn decoder output ``[B, head_channels, H, W]`` into a leaf with batch shape ``[B, S]``.

    Variables are flattened in (C, H, W) order, ``S = C·H·W``.

    * gaussian: channels ``[:C]`` give ``mean = sigmoid(·)``; channels ``[C:]`` give
      ``log std = log STD_MIN + (log STD_MAX − log STD_MIN) · sigmoid(·)``, a smooth
      clamp of the std to ``[1e-3, 1]``: unlike a hard clamp it never zeroes the
      gradient of a pixel whose raw output starts outside the range.
    * categorical: ``L`` logits per pixel, channel ``c·L + l`` is level ``l`` of image channel ``c``.
    * bernoulli: one logit per pixel.
    """
    B, _, H, W = out.shape
    if leaf == "gaussian":
        mean = torch.sigmoid(out[:, :channels]).reshape(B, -1)
        lo, hi = math.log(STD_MIN), math.log(STD_MAX)
        std = torch.exp(lo + (hi - lo) * torch.sigmoid(out[:, channels:])).reshape(B, -1)
        return Gaussian(mean, std)
    if leaf == "categorical":
        logits = out.reshape(B, channels, levels, H, W).permute(0, 1, 3, 4, 2).reshape(B, channels * H * W, levels)
        return Categorical(logits)
    if leaf == "bernoulli":
        return Bernoulli(out.reshape(B, -1))
    raise ValueError(f"unknown leaf kind {leaf!r}")
