"""Class-conditional gated PixelCNN prior p(z | c) over the H×W grid of VQ-VAE codes.

Architecture (van den Oord et al. 2016b, "Conditional Image Generation with
PixelCNN Decoders", arXiv:1606.05328): a vertical stack (rows above) and a horizontal stack (the
current row, to the left) with gated activations ``tanh(a) ⊙ σ(b)`` and no blind
spot. The vertical stack at row ``r`` sees input rows ``≤ r``; its pre-activation
is shifted down by one row before it feeds the horizontal stack, so position
``(r, c)`` only ever sees rows ``< r`` through it. The horizontal stack's first
layer (mask A) sees columns ``< c``; later layers (mask B) also see ``c``, which
by then carries only information from ``< c``. The class ``c`` enters as a learned
bias (an embedding) added to every gate; ``C = 1`` is the unlabeled mode.

Positions are numbered row-major, ``i = r·W + col``. ``p(z) = Σ_c p(c) p(z|c)``
with ``log p(c)`` in the buffer ``class_log_prior`` (training-label frequencies).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vq2pc.core.settings import AsTuple, Count, settings
from vq2pc.models.priors.base import AutoregressivePrior, fit_prior
from vq2pc.models.train import TrainConfig, TrainResult

__all__ = ["PriorConfig", "PixelCNNPrior", "train_prior"]


@settings
class PriorConfig:
    """Prior hyper-parameters: ``K`` codes on a ``latent_hw`` grid, ``num_classes`` classes."""

    K: Count
    latent_hw: Annotated[tuple[Count, Count], AsTuple]
    num_classes: Count = 1
    hidden: Count = 64
    layers: Count = 4


class _GatedLayer(nn.Module):
    """One gated PixelCNN layer: vertical + horizontal stack, class bias in both gates."""

    def __init__(self, hidden: int, half: int, first: bool, num_classes: int) -> None:
        super().__init__()
        self.half, self.first, self.hidden = half, first, hidden
        self.v_conv = nn.Conv2d(hidden, 2 * hidden, (half + 1, 2 * half + 1))
        self.h_conv = nn.Conv2d(hidden, 2 * hidden, (1, half if first else half + 1))
        self.v_to_h = nn.Conv2d(2 * hidden, 2 * hidden, 1)
        self.h_out = nn.Conv2d(hidden, hidden, 1)
        self.cond = nn.Embedding(num_classes, 4 * hidden)

    @staticmethod
    def _gate(a: Tensor) -> Tensor:
        t, s = a.chunk(2, dim=1)
        return torch.tanh(t) * torch.sigmoid(s)

    def forward(self, v: Tensor, h: Tensor, c: Tensor, h_start: int = 0) -> tuple[Tensor, Tensor]:
        """One layer on a vertical stack of the top rows and a horizontal stack of some rows.

        ``v``: [B,hidden,Rv,W] rows ``0..Rv-1``; ``h``: [B,hidden,Rh,Wh] rows ``h_start..h_start+Rh-1``,
        columns ``0..Wh-1`` (``Wh ≤ W``, ``h_start ≤ Rv``); ``c``: [B]. Horizontal row ``r`` receives
        the vertical pre-activation of row ``r - 1`` (zero above the grid). Returns the new ``(v, h)``.
        """
        rows_h, width_h = h.shape[-2:]
        cond_v, cond_h = self.cond(c)[:, :, None, None].chunk(2, dim=1)
        if v.shape[-2] > 0:
            v_pre = self.v_conv(F.pad(v, (self.half, self.half, self.half, 0)))
        else:  # nothing above: the vertical stack is empty
            v_pre = v.new_zeros((v.shape[0], 2 * self.hidden, 0, v.shape[-1]))
        v_down = F.pad(v_pre, (0, 0, 1, 0))[:, :, h_start : h_start + rows_h, :width_h]
        # mask A: pad left by `half` with a width-`half` kernel, drop the last column -> columns < col
        h_pre = self.h_conv(F.pad(h, (self.half, 0, 0, 0)))[..., :width_h]
        h_gated = self.h_out(self._gate(h_pre + self.v_to_h(v_down) + cond_h))
        return self._gate(v_pre + cond_v), h_gated if self.first else h + h_gated


@dataclass
class _GridState:
    """PixelCNN decoding state: the partial grids ``[B, P]`` (filled below ``t``), classes ``[B, M]``."""

    grid: Tensor
    classes: Tensor
    t: int
    batch_size: int


class PixelCNNPrior(AutoregressivePrior, nn.Module):
    """Class-conditional gated PixelCNN over ``[B, h, w]`` code grids (see module docstring).

    Incremental decoding recomputes from the partial grid (the state holds only the grid): a
    PixelCNN has no cache, but :meth:`next_log_probs` crops its input to the rows that reach
    position ``t``.
    """

    checkpoint_kind = "prior"
    config_class = PriorConfig

    def __init__(self, cfg: PriorConfig) -> None:
        super().__init__()
        h, w = cfg.latent_hw
        first_half = max(1, min(3, max(h, w) - 1))  # taps beyond the grid would only see padding
        self.embed = nn.Embedding(cfg.K, cfg.hidden)
        self.layers = nn.ModuleList(
            _GatedLayer(cfg.hidden, first_half if j == 0 else 1, j == 0, cfg.num_classes) for j in range(cfg.layers)
        )
        self.head = nn.Sequential(
            nn.ReLU(), nn.Conv2d(cfg.hidden, cfg.hidden, 1), nn.ReLU(), nn.Conv2d(cfg.hidden, cfg.K, 1)
        )
        self._init_prior(cfg)

    # ------------------------------------------------------------------ forward passes
    def embed_codes(self, z: Tensor) -> Tensor:
        """Codes ``[B,h,w]`` -> input embedding ``[B,hidden,h,w]`` (the differentiable input)."""
        return self.embed(z).permute(0, 3, 1, 2)

    def features(self, e: Tensor, c: Tensor) -> Tensor:
        """Embedding ``[B,hidden,h',w]`` -> horizontal-stack features ``[B,hidden,h',w]`` (any h' ≤ h)."""
        v, h = e, e
        for layer in self.layers:
            v, h = layer(v, h, c)
        return h

    def logits_from_embedding(self, e: Tensor, c: Tensor) -> Tensor:
        """Embedding ``[B,hidden,h,w]`` and classes ``[B]`` -> logits ``[B,K,h,w]``."""
        return self.head(self.features(e, c))

    def logits(self, z: Tensor, c: Tensor) -> Tensor:
        """Codes ``[B,h,w]``, classes ``[B]`` -> logits ``[B,K,h,w]`` of p(z_i | z_<i, c) (no log-softmax)."""
        z = self.check_codes(z)
        c = self.check_classes(c, z.shape[0]).to(z.device)
        return self.logits_from_embedding(self.embed_codes(z), c)

    def log_prob_given_class(self, z: Tensor, c: Tensor) -> Tensor:
        """``[B]`` log p(z | c) for codes ``[B,h,w]`` and classes ``[B]``."""
        logp = F.log_softmax(self.logits(z, c), dim=1)
        return logp.gather(1, z.long()[:, None]).flatten(1).sum(1)

    def next_log_probs(self, z: Tensor, c: Tensor, i: int) -> Tensor:
        """``[B, K]`` log p(z_i = k | z_<i, c) at row-major position ``i``; codes at positions ≥ i are ignored."""
        if not 0 <= int(i) < self.num_positions:
            raise ValueError(f"position i={i} outside [0, {self.num_positions}) for grid {self.latent_hw}")
        z = self.check_codes(z)
        return self._next_log_probs(z, self.check_classes(c, z.shape[0]).to(z.device), int(i))

    def _next_log_probs(self, z: Tensor, c: Tensor, i: int) -> Tensor:
        """:meth:`next_log_probs` of checked ``z`` (long) and ``c`` (long, on z's device): no host sync."""
        row, col = divmod(i, self.latent_hw[1])
        # causality: only the vertical stack of rows < row and the horizontal stack of row `row`,
        # columns <= col, reach position i -- everything else is cropped away (exact, and 2x+ faster)
        e = self.embed_codes(z[:, : row + 1])
        v, h = e[:, :, :row], e[:, :, row : row + 1, : col + 1]
        for layer in self.layers:
            v, h = layer(v, h, c, h_start=row)
        return F.log_softmax(self.head(h[:, :, :, col:]).flatten(1), dim=1)

    def next_log_probs_all_classes(self, z: Tensor, i: int) -> Tensor:
        """``[B, C, K]`` log p(z_i = k | z_<i, c) for every class (z repeated over classes in one call;
        the codes are checked before the repeat, with one host sync)."""
        if not 0 <= int(i) < self.num_positions:
            raise ValueError(f"position i={i} outside [0, {self.num_positions}) for grid {self.latent_hw}")
        z, C = self.check_codes(z), self.num_classes
        classes = torch.arange(C, device=z.device).repeat(z.shape[0])
        return self._next_log_probs(z.repeat_interleave(C, dim=0), classes, int(i)).view(z.shape[0], C, self.K)

    # ------------------------------------------------------------------ incremental decoding
    def start(self, classes: Tensor, prefix: Tensor | None = None, batch_size: int = 8192) -> tuple[_GridState, Tensor]:
        """Partial grids from ``prefix [B, t]`` under ``classes [B, M]``; returns ``[B, M, K]`` log-probs at ``t``."""
        classes, prefix = self.check_start(classes, prefix)
        grid = torch.zeros((classes.shape[0], self.num_positions), dtype=torch.long, device=self.device)
        grid[:, : prefix.shape[1]] = prefix
        state = _GridState(grid, classes, prefix.shape[1], max(1, int(batch_size)))
        return state, self._state_log_probs(state)

    def step(self, state: _GridState, tokens: Tensor) -> tuple[_GridState, Tensor | None]:
        """Write ``tokens [B]`` at position ``t`` (in place); ``[B, M, K]`` log-probs at ``t + 1`` or None at the end."""
        state.grid[:, state.t] = tokens.to(state.grid.device)
        state.t += 1
        return state, self._state_log_probs(state) if state.t < self.num_positions else None

    def reorder(self, state: _GridState, index: Tensor) -> _GridState:
        """The sequences ``index [B']`` of ``state`` (a new state)."""
        index = index.to(state.grid.device)
        return _GridState(state.grid[index], state.classes[index], state.t, state.batch_size)

    def _state_log_probs(self, state: _GridState) -> Tensor:
        """``[B, M, K]`` log p(z_t | grid, c) for every sequence and class, ≤ ``batch_size`` rows a pass."""
        B, M = state.classes.shape
        seqs = max(1, state.batch_size // M)
        parts = [
            self.next_log_probs(
                state.grid[a : a + seqs].repeat_interleave(M, 0).view(-1, *self.latent_hw),
                state.classes[a : a + seqs].reshape(-1),
                state.t,
            )
            for a in range(0, B, seqs)
        ]
        return torch.cat(parts).view(B, M, self.K) if parts else state.grid.new_zeros((0, M, self.K), dtype=torch.float)


def train_prior(
    codes: Tensor,
    labels: Tensor | None,
    cfg: PriorConfig,
    train_cfg: TrainConfig,
    val_codes: Tensor,
    val_labels: Tensor | None,
    checkpoint: str | Path | None = None,
) -> tuple[PixelCNNPrior, TrainResult]:
    """Fit the PixelCNN on codes ``[n,h,w]`` (labels ``[n]`` or None), see :func:`~vq2pc.models.priors.base.fit_prior`."""
    return fit_prior(PixelCNNPrior, codes, labels, cfg, train_cfg, val_codes, val_labels, checkpoint)
