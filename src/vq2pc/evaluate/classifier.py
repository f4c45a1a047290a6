"""A small CNN classifier (2 conv layers + linear) used to judge samples (paper App. E, Fig. 5).

It is trained in the project with the shared trainer (:func:`vq2pc.models.train.fit`,
checkpoint kind ``"classifier"``) on the dataset's images mapped to ``[0, 1]``
(``v / (L-1)``); model samples are mapped the same way before classification
(:func:`vq2pc.evaluate.common.to_unit`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from vq2pc.core.checkpoint import CheckpointError, load_checkpoint
from vq2pc.evaluate.common import check_images, images_to_unit
from vq2pc.models.train import TrainConfig, fit

__all__ = ["ClassifierConfig", "SmallCNN", "train_classifier", "classify", "accuracy", "load_classifier"]


@dataclass
class ClassifierConfig:
    """Architecture of :class:`SmallCNN`."""

    image_shape: tuple[int, int, int]
    num_classes: int
    channels: tuple[int, int] = (16, 32)


class SmallCNN(nn.Module):
    """conv3×3 → ReLU → maxpool2 → conv3×3 → ReLU → pool to ``⌈H/4⌉×⌈W/4⌉`` → linear.

    Input: images ``[n,C,H,W]`` in ``[0,1]``; output: class logits ``[n, num_classes]``.
    """

    def __init__(self, cfg: ClassifierConfig) -> None:
        super().__init__()
        c, h, w = cfg.image_shape
        c1, c2 = cfg.channels
        self.cfg = cfg
        self.conv1 = nn.Conv2d(c, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.pool_to = (max(1, -(-h // 4)), max(1, -(-w // 4)))
        self.head = nn.Linear(c2 * self.pool_to[0] * self.pool_to[1], cfg.num_classes)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.conv1(x))
        h = F.max_pool2d(h, 2) if min(h.shape[-2:]) >= 2 else h
        h = F.adaptive_avg_pool2d(F.relu(self.conv2(h)), self.pool_to)
        return self.head(h.flatten(1))


def _loss(model: nn.Module, batch: tuple[Tensor, ...]) -> Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


@torch.no_grad()
def classify(model: SmallCNN, images: Tensor, levels: int | None = None, batch_size: int = 1000) -> Tensor:
    """Predicted labels ``[n]`` (int64, CPU) for images ``[n,C,H,W]`` (uint8 levels with ``levels``, or ``[0,1]``)."""
    check_images(images, "images")
    if tuple(images.shape[1:]) != tuple(model.cfg.image_shape):
        raise ValueError(
            f"images of shape {tuple(images.shape[1:])} do not match the classifier's {tuple(model.cfg.image_shape)}"
        )
    model.eval()
    device = next(model.parameters()).device
    preds = [
        model(images_to_unit(images[i : i + batch_size], levels).to(device)).argmax(1).cpu()
        for i in range(0, images.shape[0], batch_size)
    ]
    return torch.cat(preds)


def accuracy(model: SmallCNN, images: Tensor, labels: Tensor, levels: int | None = None) -> float:
    """Fraction of ``images`` whose predicted label equals ``labels [n]``."""
    return float((classify(model, images, levels) == labels.cpu()).float().mean())


def train_classifier(
    splits: Any,
    train_cfg: TrainConfig,
    checkpoint: str | Path | None = None,
    cfg: ClassifierConfig | None = None,
) -> tuple[SmallCNN, float]:
    """Train (or resume / reload from ``checkpoint``) a :class:`SmallCNN` on ``splits``.

    ``splits``: a :class:`vq2pc.data.DataSplits` (uint8 images, int64 labels, ``levels``,
    ``image_shape``, ``num_classes``). Returns the best-validation model (eval mode,
    on ``train_cfg.device``) and its test accuracy.
    """
    cfg = cfg or ClassifierConfig(tuple(splits.image_shape), int(splits.num_classes))
    model = SmallCNN(cfg)
    scale = float(splits.levels - 1)
    train = (splits.train_x.float() / scale, splits.train_y.long())
    val = (splits.val_x.float() / scale, splits.val_y.long())
    meta = {"config": asdict(cfg), "dataset": getattr(splits, "name", "")}
    fit(model, _loss, train, val, train_cfg, checkpoint=checkpoint, kind="classifier", meta=meta, desc="classifier")
    return model, accuracy(model, splits.test_x, splits.test_y, splits.levels)


def load_classifier(path: str | Path, device: str | torch.device = "cpu") -> SmallCNN:
    """Rebuild a :class:`SmallCNN` from a ``vq2pc/classifier`` checkpoint written by :func:`train_classifier`."""
    ck = load_checkpoint(path, "classifier", map_location=device)
    try:
        raw = ck["meta"]["config"]
        cfg = ClassifierConfig(tuple(raw["image_shape"]), int(raw["num_classes"]), tuple(raw["channels"]))
        model = SmallCNN(cfg)
        model.load_state_dict(ck["state_dict"])
    except (KeyError, TypeError, RuntimeError) as exc:
        raise CheckpointError(f"{path} is a classifier checkpoint without a usable config/state: {exc}") from None
    return model.to(device).eval()
