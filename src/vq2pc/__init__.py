"""vq2pc: distill a VQ-VAE into a tractable probabilistic circuit and query it exactly.

Hadžić, Papež, Pevný 2025, "Distillation of a tractable model from the VQ-VAE", arXiv:2509.01400.

The public API is imported lazily, so ``import vq2pc`` stays cheap::

    from vq2pc import VQVAE, PixelCNNPrior, MixtureCircuit, distill, select, load_dataset

The packages follow the data flow, each importing only from those before it::

    core → data → models → latents → circuit → baselines → evaluate → pipeline → cli
"""

from __future__ import annotations

import importlib
from typing import Any

from vq2pc import _compat

__version__ = "0.1.0"

_EXPORTS = {
    "MixtureCircuit": "vq2pc.circuit.mixture",
    "distill": "vq2pc.circuit.distill",
    "ExactModel": "vq2pc.circuit.exact",
    "ClassMixture": "vq2pc.circuit.classes",
    "class_weights": "vq2pc.circuit.class_weights",
    "load_circuit": "vq2pc.circuit.classes",
    "VQVAE": "vq2pc.models.vqvae",
    "VQVAEConfig": "vq2pc.models.vqvae",
    "PixelCNNPrior": "vq2pc.models.priors.pixelcnn",
    "PriorConfig": "vq2pc.models.priors.pixelcnn",
    "TransformerPrior": "vq2pc.models.priors.transformer",
    "TransformerPriorConfig": "vq2pc.models.priors.transformer",
    "load_prior": "vq2pc.models.priors",
    "Decoder": "vq2pc.core.protocols",
    "Prior": "vq2pc.core.protocols",
    "Selection": "vq2pc.latents.selection",
    "select": "vq2pc.latents.selection",
    "load_dataset": "vq2pc.data.datasets",
    "DataSplits": "vq2pc.data.datasets",
    "Gaussian": "vq2pc.core.leaves",
    "Categorical": "vq2pc.core.leaves",
    "Bernoulli": "vq2pc.core.leaves",
    "TrainConfig": "vq2pc.models.train",
    "fit": "vq2pc.models.train",
}

__all__ = sorted(_EXPORTS) + ["__version__"]

_compat.install()


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'vq2pc' has no attribute {name!r}")
