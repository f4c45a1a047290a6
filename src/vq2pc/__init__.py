"""vq2pc: distill a VQ-VAE into a tractable probabilistic circuit and query it exactly.

Hadžić, Papež, Pevný 2025, "Distillation of a tractable model from the VQ-VAE", arXiv:2509.01400.

The public API is imported lazily, so ``import vq2pc`` stays cheap::

    from vq2pc import VQVAE, PixelCNNPrior, MixtureCircuit, distill, select, load_dataset
    from vq2pc import compress, decompress   # lossless image files sized by the circuit's BPD

``vq2pc.__all__`` lists every public name; each lives in the module named in ``_EXPORTS``.

The packages follow the data flow, each importing only from those before it::

    core → data → models → latents → circuit → baselines → evaluate → pipeline → cli
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"  # equal to pyproject.toml's (tests/test_api.py)

_EXPORTS = {
    # data
    "load_dataset": "vq2pc.data.datasets",
    "DataSplits": "vq2pc.data.datasets",
    # models and their training
    # class-aware circuits
    "ClassMixture": "vq2pc.circuit.classes",
    "class_weights": "vq2pc.circuit.class_weights",
    "fit_class_weights": "vq2pc.circuit.class_fit",
    "load_circuit": "vq2pc.circuit.classes",
    "VQVAE": "vq2pc.models.vqvae",
    "VQVAEConfig": "vq2pc.models.vqvae",
    "train_vqvae": "vq2pc.models.vqvae",
    "PixelCNNPrior": "vq2pc.models.priors.pixelcnn",
    "PriorConfig": "vq2pc.models.priors.pixelcnn",
    "TransformerPrior": "vq2pc.models.priors.transformer",
    "TransformerPriorConfig": "vq2pc.models.priors.transformer",
    "train_prior": "vq2pc.models.priors",
    "load_prior": "vq2pc.models.priors",
    "TrainConfig": "vq2pc.models.train",
    "fit": "vq2pc.models.train",
    # the seams and the leaves
    "Decoder": "vq2pc.core.protocols",
    "Prior": "vq2pc.core.protocols",
    "Gaussian": "vq2pc.core.leaves",
    "Categorical": "vq2pc.core.leaves",
    "Bernoulli": "vq2pc.core.leaves",
    # selection, distillation, the circuit and its refinements
    "Selection": "vq2pc.latents.selection",
    "select": "vq2pc.latents.selection",
    "distill": "vq2pc.circuit.distill",
    "MixtureCircuit": "vq2pc.circuit.mixture",
    "ExactModel": "vq2pc.circuit.exact",
    "TreeCircuit": "vq2pc.circuit.tree",
    "GaussianTreeCircuit": "vq2pc.circuit.tree_gaussian",
    "TreeMixture": "vq2pc.circuit.tree_mixture",
    "distill_tree": "vq2pc.circuit.tree_fit",
    "FineTuneConfig": "vq2pc.circuit.finetune_config",
    "finetune_distill": "vq2pc.circuit.finetune",
    "EMConfig": "vq2pc.circuit.refine",
    "em_refine": "vq2pc.circuit.refine",
    "export_cirkit": "vq2pc.circuit.export",
    "export_npz": "vq2pc.circuit.export",
    "from_npz": "vq2pc.circuit.export",
    # the whole pipeline
    "RunConfig": "vq2pc.pipeline.config",
    "load_config": "vq2pc.pipeline.config",
    "run_pipeline": "vq2pc.pipeline",
    # lossless compression with a discrete circuit
    "compress": "vq2pc.circuit.codec",
    "decompress": "vq2pc.circuit.codec",
    "CodecError": "vq2pc.circuit.codec",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'vq2pc' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
