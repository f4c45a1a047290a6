"""vq2pc: distill a VQ-VAE into a tractable probabilistic circuit and query it exactly.

The public API is imported lazily, so ``import vq2pc`` stays cheap::

    from vq2pc import VQVAE, PixelCNNPrior, MixtureCircuit, distill, select, load_dataset
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "MixtureCircuit": "vq2pc.circuit",
    "distill": "vq2pc.distillation",
    "ExactModel": "vq2pc.exact",
    "VQVAE": "vq2pc.vqvae",
    "VQVAEConfig": "vq2pc.vqvae",
    "PixelCNNPrior": "vq2pc.prior",
    "PriorConfig": "vq2pc.prior",
    "Selection": "vq2pc.selection",
    "select": "vq2pc.selection",
    "load_dataset": "vq2pc.data",
    "DataSplits": "vq2pc.data",
    "Gaussian": "vq2pc.leaves",
    "Categorical": "vq2pc.leaves",
    "Bernoulli": "vq2pc.leaves",
    "TrainConfig": "vq2pc.train",
    "fit": "vq2pc.train",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'vq2pc' has no attribute {name!r}")
