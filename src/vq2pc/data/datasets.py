"""Datasets, splits, dequantization and bits per dimension.

Raw images are integer levels ``v ∈ {0..L-1}`` stored as ``uint8`` tensors
``[n, C, H, W]`` with ``int64`` labels ``[n]``. Datasets:

* ``digits``: scikit-learn's 8×8 digits (1797 images, L = 17, C = 10), embedded,
  split 1200 / 300 / 297 with a seeded permutation.
* ``mnist``, ``fashion-mnist``: the four standard IDX ``.gz`` files (L = 256,
  C = 10); 50k / 10k train / validation from the training file with a seeded
  permutation, the 10k test file as test. Files are looked up in ``data_dir``,
  ``$VQ2PC_DATA`` and the user cache dir (see :mod:`vq2pc.data.idx`),
  md5-verified, and downloaded into the cache when missing.

Model space (:func:`to_model_space`) and BPD (:func:`bpd`) follow
``docs/ARCHITECTURE.md``.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from vq2pc.core.leaves import check_leaf_kind
from vq2pc.core.random import uniform
from vq2pc.core.validate import check_binary, check_finite, check_levels
from vq2pc.data.idx import IDX_SOURCES, load_idx_dataset

__all__ = ["DataSplits", "DATASET_NAMES", "load_dataset", "to_model_space", "check_model_space", "bpd", "check_fits"]

DATASET_NAMES: tuple[str, ...] = ("digits", *IDX_SOURCES)


@dataclass
class DataSplits:
    """Train / validation / test images (``uint8 [n, C, H, W]``) and labels (``int64 [n]``)."""

    name: str
    levels: int
    image_shape: tuple[int, int, int]
    num_classes: int
    train_x: Tensor
    train_y: Tensor
    val_x: Tensor
    val_y: Tensor
    test_x: Tensor
    test_y: Tensor

    @property
    def num_variables(self) -> int:
        """``S = C·H·W``."""
        return math.prod(self.image_shape)

    def fingerprint(self) -> str:
        """SHA-256 of every split's images and labels (and the name and levels): equal exactly when the
        data a model is trained and evaluated on is the same, whatever file it came from."""
        h = hashlib.sha256(f"{self.name}|{self.levels}|{self.image_shape}|{self.num_classes}".encode())
        for t in (self.train_x, self.train_y, self.val_x, self.val_y, self.test_x, self.test_y):
            h.update(str(tuple(t.shape)).encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()


def check_fits(image_shape: tuple[int, ...], levels: int, splits: DataSplits, what: str = "config") -> None:
    """Raise ``ValueError`` unless a model made for ``image_shape`` / ``levels`` fits the data of ``splits``."""
    if tuple(image_shape) != tuple(splits.image_shape) or levels != splits.levels:
        raise ValueError(
            f"{what} (image shape {tuple(image_shape)}, L={levels}) does not match the data "
            f"{splits.name!r} (image shape {tuple(splits.image_shape)}, L={splits.levels})"
        )


def _permute_split(x: Tensor, y: Tensor, sizes: tuple[int, ...], seed: int) -> list[tuple[Tensor, Tensor]]:
    """Shuffle ``(x, y)`` with ``seed`` and cut consecutive pieces of the given sizes."""
    order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))
    pieces, start = [], 0
    for size in sizes:
        idx = order[start : start + size]
        pieces.append((x[idx], y[idx]))
        start += size
    return pieces


def _load_digits(seed: int) -> tuple[tuple[Tensor, Tensor], ...]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.from_numpy(np.asarray(bunch.images, dtype=np.uint8)).unsqueeze(1)  # [1797, 1, 8, 8], 0..16
    y = torch.from_numpy(np.asarray(bunch.target, dtype=np.int64))
    train, val, test = _permute_split(x, y, (1200, 300, x.shape[0] - 1500), seed)
    return train, val, test


def _load_idx(name: str, data_dir: str | Path | None, seed: int, download: bool) -> tuple[tuple[Tensor, Tensor], ...]:
    arrays = load_idx_dataset(name, data_dir, download=download)
    x = torch.from_numpy(arrays["train_images"]).unsqueeze(1)
    y = torch.from_numpy(arrays["train_labels"].astype(np.int64))
    n_val = 10_000
    train, val = _permute_split(x, y, (x.shape[0] - n_val, n_val), seed)
    test = (
        torch.from_numpy(arrays["test_images"]).unsqueeze(1),
        torch.from_numpy(arrays["test_labels"].astype(np.int64)),
    )
    return train, val, test


def load_dataset(
    name: str,
    data_dir: str | Path | None = None,
    seed: int = 0,
    limit: int | None = None,
    *,
    download: bool = True,
) -> DataSplits:
    """Load dataset ``name`` (one of :data:`DATASET_NAMES`) as fixed-seed splits.

    ``seed`` fixes the train/validation permutation; ``limit`` keeps the first
    ``limit`` images of each split (deterministic, for tests and quick runs);
    ``download`` allows fetching missing IDX files into the user cache dir.
    Raises ``ValueError`` for an unknown name or bad ``limit``, and
    ``FileNotFoundError`` when IDX files are missing and cannot be downloaded.
    """
    if name not in DATASET_NAMES:
        raise ValueError(f"unknown dataset {name!r}; expected one of {list(DATASET_NAMES)}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of images, got {limit}")
    if name == "digits":
        parts, levels = _load_digits(seed), 17
    else:
        parts, levels = _load_idx(name, data_dir, seed, download), 256
    cut = slice(None) if limit is None else slice(0, limit)
    (trx, tr_y), (vax, va_y), (tex, te_y) = ((x[cut].contiguous(), y[cut].contiguous()) for x, y in parts)
    return DataSplits(
        name=name,
        levels=levels,
        image_shape=tuple(int(s) for s in trx.shape[1:]),
        num_classes=10,
        train_x=trx,
        train_y=tr_y,
        val_x=vax,
        val_y=va_y,
        test_x=tex,
        test_y=te_y,
    )


def to_model_space(v: Tensor, leaf_kind: str, levels: int, generator: torch.Generator | None = None) -> Tensor:
    """Map integer levels ``v ∈ {0..L-1}`` (any shape) to the model space of ``leaf_kind``.

    * ``gaussian``: ``(v + u) / L`` with ``u ~ U[0, 1)`` (uniform dequantization), in ``[0, 1)``;
    * ``categorical``: ``v`` itself;
    * ``bernoulli``: ``v >= L / 2``.

    Returns float32 of ``v``'s shape on ``v``'s device. ``generator`` (on any
    device) drives the dequantization noise.
    """
    check_leaf_kind(leaf_kind)
    if levels < 2:
        raise ValueError(f"levels must be >= 2, got {levels}")
    if v.dtype.is_floating_point or v.dtype == torch.bool:
        raise ValueError(f"v must hold integer levels (e.g. uint8), got dtype {v.dtype}")
    check_levels(v, levels, "v")
    if leaf_kind == "categorical":
        return v.to(torch.float32)
    if leaf_kind == "bernoulli":
        return (v >= levels / 2).to(torch.float32)
    u = uniform(tuple(v.shape), generator, v.device)
    return (v.to(torch.float32) + u) / levels


def check_model_space(x: Tensor, leaf_kind: str, levels: int, name: str = "x") -> None:
    """``ValueError`` unless ``x`` (any shape) holds values of ``leaf_kind``'s model space, the values
    :func:`to_model_space` returns: floats in ``[0, 1]`` (gaussian), integer levels (categorical), 0/1 (bernoulli)."""
    if not x.dtype.is_floating_point:
        raise ValueError(f"{name} must be float model-space data (see data.to_model_space), got dtype {x.dtype}")
    if check_leaf_kind(leaf_kind) == "categorical":
        check_levels(x, levels, name)
    elif leaf_kind == "bernoulli":
        check_binary(x, name)
    else:
        check_finite(name, x)
        if x.numel() and (float(x.min()) < 0 or float(x.max()) > 1):
            raise ValueError(
                f"{name} must lie in [0, 1] for Gaussian leaves, got range "
                f"[{float(x.min()):g}, {float(x.max()):g}] (convert with data.to_model_space)"
            )


def bpd(log_prob_nats: Tensor, S: int, levels: int, leaf_kind: str) -> Tensor:
    """Bits per dimension of each log-likelihood (same shape as ``log_prob_nats``).

    Continuous (``gaussian``) models of dequantized data ``x = (v + u) / L``:
    ``-log2 p(x) / S + log2 L`` — for ``L = 256`` this is exactly the paper's
    Eq. 7 (``+ 8``), the discrete bits of ``v`` bounded through the density of
    the rescaled data. Discrete (``categorical`` / ``bernoulli``) models:
    ``-log2 P(x) / S``.
    """
    check_leaf_kind(leaf_kind)
    if S < 1 or levels < 2:
        raise ValueError(f"S must be >= 1 and levels >= 2, got S={S}, levels={levels}")
    bits = -log_prob_nats / (S * math.log(2.0))
    return bits + math.log2(levels) if leaf_kind == "gaussian" else bits
