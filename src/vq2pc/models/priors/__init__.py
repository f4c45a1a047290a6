"""Priors p(z | c) over a grid of codes; each satisfies :class:`vq2pc.core.protocols.Prior`.

* :mod:`~vq2pc.models.priors.base` — the shared half (validation, log p(c), sampling, the trainer);
* :mod:`~vq2pc.models.priors.pixelcnn` — class-conditional gated PixelCNN (``pixelcnn``);
* :mod:`~vq2pc.models.priors.transformer` — class-conditional causal Transformer with a
  key/value cache (``transformer``).

One registry: :data:`PRIOR_NAMES`, :func:`prior_config` (a config from shared size keys),
:func:`train_prior` (dispatch on the config) and :func:`load_prior` (dispatch on the checkpoint).

May import: :mod:`vq2pc.core`, :mod:`vq2pc.data`, :mod:`vq2pc.models`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["PRIOR_NAMES", "prior_classes", "prior_config", "train_prior", "load_prior"]

PRIOR_NAMES: tuple[str, ...] = ("pixelcnn", "transformer")


def prior_classes() -> dict[str, type]:
    """Prior name -> model class."""
    from vq2pc.models.priors.pixelcnn import PixelCNNPrior
    from vq2pc.models.priors.transformer import TransformerPrior

    return {"pixelcnn": PixelCNNPrior, "transformer": TransformerPrior}


def _check_name(name: str) -> str:
    if name not in PRIOR_NAMES:
        raise ValueError(f"unknown prior {name!r}; expected one of {list(PRIOR_NAMES)}")
    return name


def prior_config(
    name: str, K: int, latent_hw: tuple[int, int], num_classes: int, hidden: int = 64, layers: int = 4, heads: int = 4
) -> Any:
    """The config of prior ``name``: ``hidden`` channels (PixelCNN) or model width (Transformer),
    ``layers`` gated layers or blocks, ``heads`` attention heads (Transformer only)."""
    if _check_name(name) == "pixelcnn":
        from vq2pc.models.priors.pixelcnn import PriorConfig

        return PriorConfig(K=K, latent_hw=latent_hw, num_classes=num_classes, hidden=hidden, layers=layers)
    from vq2pc.models.priors.transformer import TransformerPriorConfig

    return TransformerPriorConfig(
        K=K, latent_hw=latent_hw, num_classes=num_classes, d_model=hidden, layers=layers, heads=heads
    )


def train_prior(
    codes: Tensor,
    labels: Tensor | None,
    cfg: Any,
    train_cfg: Any,
    val_codes: Tensor,
    val_labels: Tensor | None,
    checkpoint: str | Path | None = None,
) -> tuple[Any, Any]:
    """Fit the prior whose config ``cfg`` is (see :func:`vq2pc.models.priors.base.fit_prior`)."""
    from vq2pc.models.priors.base import fit_prior

    by_config = {cls.config_class: cls for cls in prior_classes().values()}
    if type(cfg) not in by_config:
        raise ValueError(f"not a prior config: {type(cfg).__name__}")
    return fit_prior(by_config[type(cfg)], codes, labels, cfg, train_cfg, val_codes, val_labels, checkpoint)


def load_prior(path: str | Path, device: str | torch.device | None = None) -> Any:
    """Load a prior checkpoint of any kind (the file's format tag picks the class)."""
    classes = prior_classes()
    try:  # only the tag is read; the tensors stay memory-mapped
        tag = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("format", "")
    except Exception:  # missing, corrupt or not a dict: the PixelCNN's load names the problem
        tag = ""
    by_kind = {cls.checkpoint_kind: cls for cls in classes.values()}
    return by_kind.get(str(tag).removeprefix("vq2pc/"), classes["pixelcnn"]).load(path, device)
