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

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vq2pc.core.checkpoint import SavableModel
from vq2pc.core.random import gumbel_noise
from vq2pc.models.train import TrainConfig, TrainResult, fit

__all__ = ["PriorConfig", "PixelCNNPrior", "train_prior"]


@dataclass
class PriorConfig:
    """Prior hyper-parameters: ``K`` codes on a ``latent_hw`` grid, ``num_classes`` classes."""

    K: int
    latent_hw: tuple[int, int]
    num_classes: int = 1
    hidden: int = 64
    layers: int = 4

    def __post_init__(self) -> None:
        self.latent_hw = (int(self.latent_hw[0]), int(self.latent_hw[1]))
        for name in ("K", "num_classes", "hidden", "layers"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"PriorConfig.{name} must be >= 1, got {getattr(self, name)}")
        if min(self.latent_hw) < 1:
            raise ValueError(f"PriorConfig.latent_hw must be positive, got {self.latent_hw}")


def _length(t: Tensor) -> int:
    """Length of a 1-D tensor, or -1 (so that validation reports the bad shape)."""
    return t.shape[0] if isinstance(t, Tensor) and t.dim() == 1 else -1


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


class PixelCNNPrior(SavableModel, nn.Module):
    """Class-conditional gated PixelCNN over ``[B, h, w]`` code grids (see module docstring)."""

    checkpoint_kind = "prior"
    config_class = PriorConfig

    class_log_prior: Tensor

    def __init__(self, cfg: PriorConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.K, self.num_classes = cfg.K, cfg.num_classes
        self.latent_hw = cfg.latent_hw
        h, w = cfg.latent_hw
        first_half = max(1, min(3, max(h, w) - 1))  # taps beyond the grid would only see padding
        self.embed = nn.Embedding(cfg.K, cfg.hidden)
        self.layers = nn.ModuleList(
            _GatedLayer(cfg.hidden, first_half if j == 0 else 1, j == 0, cfg.num_classes) for j in range(cfg.layers)
        )
        self.head = nn.Sequential(
            nn.ReLU(), nn.Conv2d(cfg.hidden, cfg.hidden, 1), nn.ReLU(), nn.Conv2d(cfg.hidden, cfg.K, 1)
        )
        uniform = torch.full((cfg.num_classes,), -torch.log(torch.tensor(float(cfg.num_classes))).item())
        self.register_buffer("class_log_prior", uniform)

    # ------------------------------------------------------------------ validation
    @property
    def num_positions(self) -> int:
        return self.latent_hw[0] * self.latent_hw[1]

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def check_codes(self, z: Tensor, name: str = "z") -> Tensor:
        """Validate a ``[B, h, w]`` integer code grid with values in ``[0, K)``; return it as long."""
        if not isinstance(z, Tensor) or z.dim() != 3 or tuple(z.shape[1:]) != self.latent_hw:
            shape = tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__
            raise ValueError(f"{name} must have shape [B, {self.latent_hw[0]}, {self.latent_hw[1]}], got {shape}")
        if z.dtype.is_floating_point or z.dtype == torch.bool or z.is_complex():
            raise ValueError(f"{name} must be an integer tensor, got {z.dtype}")
        if z.numel() and bool(((z < 0) | (z >= self.K)).any()):  # one host sync
            raise ValueError(f"{name} has codes outside [0, K={self.K}): min {int(z.min())}, max {int(z.max())}")
        return z.long()

    def check_classes(self, c: Tensor, n: int, name: str = "c") -> Tensor:
        """Validate ``[n]`` integer class labels in ``[0, C)``; return them as long."""
        if not isinstance(c, Tensor) or c.dim() != 1 or c.shape[0] != n:
            shape = tuple(c.shape) if isinstance(c, Tensor) else type(c).__name__
            raise ValueError(f"{name} must have shape [{n}], got {shape}")
        if c.dtype.is_floating_point or c.dtype == torch.bool:
            raise ValueError(f"{name} must be an integer tensor, got {c.dtype}")
        if n and bool(((c < 0) | (c >= self.num_classes)).any()):
            raise ValueError(f"{name} has classes outside [0, C={self.num_classes}): {int(c.min())}..{int(c.max())}")
        return c.long()

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

    def log_prob_all_classes(self, z: Tensor, batch_size: int = 8192) -> Tensor:
        """``[B, C]`` log p(z | c) for every class; z is repeated over the classes, ``batch_size`` rows a call."""
        z = self.check_codes(z)
        C = self.num_classes
        step = max(1, batch_size // C)
        classes = torch.arange(C, device=z.device)
        out = []
        for start in range(0, z.shape[0], step):
            zc = z[start : start + step]
            rep = zc.repeat_interleave(C, dim=0)
            out.append(self.log_prob_given_class(rep, classes.repeat(zc.shape[0])).view(-1, C))
        return torch.cat(out) if out else z.new_zeros((0, C), dtype=torch.float32)

    def log_prob(self, z: Tensor, batch_size: int = 8192) -> Tensor:
        """``[B]`` log p(z) = log Σ_c p(c) p(z|c)."""
        return torch.logsumexp(self.log_prob_all_classes(z, batch_size) + self.class_log_prior, dim=1)

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

    @torch.no_grad()
    def sample(self, c: Tensor, generator: torch.Generator | None = None, batch_size: int = 8192) -> Tensor:
        """Ancestral samples ``z ~ p(z | c)``: classes ``[n]`` -> codes ``[n,h,w]`` (HW passes per chunk)."""
        c = self.check_classes(c, _length(c)).to(self.device)
        out = torch.zeros((c.shape[0], *self.latent_hw), dtype=torch.long, device=self.device)
        flat = out.view(c.shape[0], -1)
        for start in range(0, c.shape[0], batch_size):
            cc, zz = c[start : start + batch_size], flat[start : start + batch_size]
            for i in range(self.num_positions):
                logp = self._next_log_probs(out[start : start + batch_size], cc, i)  # c checked once, above
                zz[:, i] = (logp + gumbel_noise(tuple(logp.shape), generator, logp.device)).argmax(1)
        return out

    # ------------------------------------------------------------------ class prior, persistence
    def set_class_prior(self, labels: Tensor | None) -> None:
        """Set ``log p(c)`` from training labels ``[n]`` (frequencies); ``None`` keeps uniform (C = 1: log 1)."""
        if labels is None:
            return
        labels = self.check_classes(labels, _length(labels), "labels")
        if labels.numel() == 0:
            raise ValueError("labels is empty: cannot estimate p(c)")
        counts = torch.bincount(labels.cpu(), minlength=self.num_classes).double()
        self.class_log_prior.copy_((counts / counts.sum()).log().float())


def _nll_per_latent(model: nn.Module, batch: tuple[Tensor, ...]) -> Tensor:
    """Mean NLL of a batch of codes, in nats per latent position."""
    z, c = batch
    return -model.log_prob_given_class(z, c).mean() / z[0].numel()


def train_prior(
    codes: Tensor,
    labels: Tensor | None,
    cfg: PriorConfig,
    train_cfg: TrainConfig,
    val_codes: Tensor,
    val_labels: Tensor | None,
    checkpoint: str | Path | None = None,
) -> tuple[PixelCNNPrior, TrainResult]:
    """Fit the prior on codes ``[n,h,w]`` (labels ``[n]`` or None) with :func:`train.fit` (NLL, nats/latent)."""
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's global RNG
        torch.manual_seed(train_cfg.seed)
        model = PixelCNNPrior(cfg)
    codes, val_codes = model.check_codes(codes, "codes"), model.check_codes(val_codes, "val_codes")
    if labels is None:
        labels = torch.zeros(codes.shape[0], dtype=torch.long)
    if val_labels is None:
        val_labels = torch.zeros(val_codes.shape[0], dtype=torch.long)
    labels = model.check_classes(labels, codes.shape[0], "labels")
    val_labels = model.check_classes(val_labels, val_codes.shape[0], "val_labels")
    model.set_class_prior(labels)
    meta: dict[str, Any] = {"config": asdict(cfg)}
    result = fit(model, _nll_per_latent, (codes, labels), (val_codes, val_labels), train_cfg,
                 checkpoint=checkpoint, kind="prior", meta=meta, desc="prior")
    return model, result
