"""What every vq2pc prior shares: validation, ``log p(c)``, derived queries, sampling, training.

:class:`AutoregressivePrior` is a mixin for an ``nn.Module`` prior built from a dataclass config
with fields ``K``, ``latent_hw`` and ``num_classes``. A subclass implements
``log_prob_given_class(z, c)`` and the incremental API ``start`` / ``step`` / ``reorder`` of
:class:`vq2pc.core.protocols.Prior`; the mixin derives the rest of the protocol from them
(``log_prob_all_classes``, ``log_prob``, ``next_log_probs_all_classes``, ``sample``).
:func:`fit_prior` is the one trainer of every prior (NLL in nats per latent, :func:`vq2pc.models.train.fit`).
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from vq2pc.core.checkpoint import SavableModel
from vq2pc.core.protocols import DecodingState, check_codes
from vq2pc.core.random import gumbel_noise
from vq2pc.models.train import TrainConfig, TrainResult, fit

__all__ = ["AutoregressivePrior", "fit_prior", "length"]


def length(t: Tensor) -> int:
    """Length of a 1-D tensor, or -1 (so that validation reports the bad shape)."""
    return t.shape[0] if isinstance(t, Tensor) and t.dim() == 1 else -1


class AutoregressivePrior(SavableModel):
    """Mixin: the shared half of a class-conditional prior over ``[B, h, w]`` code grids (module docstring)."""

    class_log_prior: Tensor

    def _init_prior(self, cfg: Any) -> None:
        """Set ``cfg``, ``K``, ``num_classes``, ``latent_hw`` and a uniform ``class_log_prior`` buffer."""
        self.cfg = cfg
        self.K, self.num_classes = cfg.K, cfg.num_classes
        self.latent_hw = cfg.latent_hw
        uniform = torch.full((cfg.num_classes,), -torch.log(torch.tensor(float(cfg.num_classes))).item())
        self.register_buffer("class_log_prior", uniform)

    # ------------------------------------------------------------------ structure and validation
    @property
    def num_positions(self) -> int:
        return self.latent_hw[0] * self.latent_hw[1]

    @property
    def device(self) -> torch.device:
        return self.class_log_prior.device

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def check_codes(self, z: Tensor, name: str = "z") -> Tensor:
        """Validate a ``[B, h, w]`` integer code grid with values in ``[0, K)``; return it as long."""
        return check_codes(z, self.K, self.latent_hw, name)

    def check_classes(self, c: Tensor, n: int, name: str = "c") -> Tensor:
        """Validate ``[n]`` integer class labels in ``[0, C)``; return them as long."""
        if not isinstance(c, Tensor) or c.dim() != 1 or c.shape[0] != n:
            shape = tuple(c.shape) if isinstance(c, Tensor) else type(c).__name__
            raise ValueError(f"{name} must have shape [{n}], got {shape}")
        if c.dtype.is_floating_point or c.dtype == torch.bool:
            raise ValueError(f"{name} must be an integer tensor, got {c.dtype}")
        if n and (int(c.min()) < 0 or int(c.max()) >= self.num_classes):
            raise ValueError(f"{name} has classes outside [0, C={self.num_classes}): {int(c.min())}..{int(c.max())}")
        return c.long()

    def check_start(self, classes: Tensor, prefix: Tensor | None) -> tuple[Tensor, Tensor]:
        """Validate :meth:`start`'s ``classes [B, M]`` and ``prefix [B, t]`` (``t < P``); return both as long."""
        if not isinstance(classes, Tensor) or classes.dim() != 2:
            raise ValueError(f"classes must have shape [B, M], got {getattr(classes, 'shape', type(classes).__name__)}")
        B = classes.shape[0]
        self.check_classes(classes.reshape(-1), classes.numel(), "classes")
        if prefix is None:
            prefix = torch.zeros((B, 0), dtype=torch.long, device=classes.device)
        if (
            not isinstance(prefix, Tensor)
            or prefix.dim() != 2
            or prefix.shape[0] != B
            or prefix.shape[1] >= self.num_positions
        ):
            raise ValueError(
                f"prefix must have shape [{B}, t] with t < {self.num_positions}, "
                f"got {getattr(prefix, 'shape', type(prefix).__name__)}"
            )
        if prefix.numel():
            check_codes(prefix[:, None], self.K, (1, prefix.shape[1]), "prefix")
        return classes.long().to(self.device), prefix.long().to(self.device)

    # ------------------------------------------------------------------ derived queries
    def log_prob_given_class(self, z: Tensor, c: Tensor) -> Tensor:
        """``[B]`` log p(z | c) for codes ``[B,h,w]`` and classes ``[B]`` (implemented by each prior)."""
        raise NotImplementedError

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

    def next_log_probs_all_classes(self, z: Tensor, i: int) -> Tensor:
        """``[B, C, K]`` log p(z_i = k | z_<i, c) for every class (codes at positions ≥ i are ignored)."""
        if not 0 <= int(i) < self.num_positions:
            raise ValueError(f"position i={i} outside [0, {self.num_positions}) for grid {self.latent_hw}")
        z = self.check_codes(z)
        classes = torch.arange(self.num_classes, device=z.device).expand(z.shape[0], -1)
        return self.start(classes, z.flatten(1)[:, : int(i)], batch_size=max(1, z.shape[0] * self.num_classes))[1]

    def start(
        self, classes: Tensor, prefix: Tensor | None = None, batch_size: int = 8192
    ) -> tuple[DecodingState, Tensor]:
        raise NotImplementedError

    def step(self, state: DecodingState, tokens: Tensor) -> tuple[DecodingState, Tensor | None]:
        raise NotImplementedError

    def reorder(self, state: DecodingState, index: Tensor) -> DecodingState:
        raise NotImplementedError

    @torch.no_grad()
    def sample(self, c: Tensor, generator: torch.Generator | None = None, batch_size: int = 8192) -> Tensor:
        """Ancestral samples ``z ~ p(z | c)``: classes ``[n]`` -> codes ``[n,h,w]``, ``batch_size`` rows at a
        time, one incremental step per position (Gumbel-max draws of shape ``[rows, K]`` per position)."""
        c = self.check_classes(c, length(c)).to(self.device)
        out = torch.zeros((c.shape[0], self.num_positions), dtype=torch.long, device=self.device)
        for start in range(0, c.shape[0], batch_size):
            state, logp = self.start(c[start : start + batch_size, None], batch_size=batch_size)
            for i in range(self.num_positions):
                lp = logp[:, 0]
                token = (lp + gumbel_noise(tuple(lp.shape), generator, lp.device)).argmax(1)
                out[start : start + batch_size, i] = token
                state, logp = self.step(state, token)
        return out.view(-1, *self.latent_hw)

    # ------------------------------------------------------------------ class prior
    def set_class_prior(self, labels: Tensor | None) -> None:
        """Set ``log p(c)`` from training labels ``[n]`` (frequencies); ``None`` keeps uniform (C = 1: log 1)."""
        if labels is None:
            return
        labels = self.check_classes(labels, length(labels), "labels")
        if labels.numel() == 0:
            raise ValueError("labels is empty: cannot estimate p(c)")
        counts = torch.bincount(labels.cpu(), minlength=self.num_classes).double()
        self.class_log_prior.copy_((counts / counts.sum()).log().float())


def _nll_per_latent(model: nn.Module, batch: tuple[Tensor, ...]) -> Tensor:
    """Mean NLL of a batch of codes, in nats per latent position."""
    z, c = batch
    return -model.log_prob_given_class(z, c).mean() / z[0].numel()


_P = TypeVar("_P", bound=AutoregressivePrior)


def fit_prior(
    model_class: type[_P],
    codes: Tensor,
    labels: Tensor | None,
    cfg: Any,
    train_cfg: TrainConfig,
    val_codes: Tensor,
    val_labels: Tensor | None,
    checkpoint: str | Path | None = None,
) -> tuple[_P, TrainResult]:
    """Fit ``model_class(cfg)`` on codes ``[n,h,w]`` (labels ``[n]`` or None) with :func:`fit` (NLL, nats/latent)."""
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's global RNG
        torch.manual_seed(train_cfg.seed)
        model = model_class(cfg)
    codes, val_codes = model.check_codes(codes, "codes"), model.check_codes(val_codes, "val_codes")
    if labels is None:
        labels = torch.zeros(codes.shape[0], dtype=torch.long)
    if val_labels is None:
        val_labels = torch.zeros(val_codes.shape[0], dtype=torch.long)
    labels = model.check_classes(labels, codes.shape[0], "labels")
    val_labels = model.check_classes(val_labels, val_codes.shape[0], "val_labels")
    model.set_class_prior(labels)
    meta: dict[str, Any] = {"config": asdict(cfg)}
    result = fit(
        model,
        _nll_per_latent,
        (codes, labels),
        (val_codes, val_labels),
        train_cfg,
        checkpoint=checkpoint,
        kind=model.checkpoint_kind,
        meta=meta,
        desc=model.checkpoint_kind,
    )
    return model, result
