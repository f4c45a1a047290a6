"""The paper's baselines: EiNet (libcirkit, optional dependency) and the continuous mixture.

Imported lazily, so ``import vq2pc.baselines`` works without libcirkit; only using
the EiNet raises an error naming ``pip install libcirkit==0.3.1``.

Stage 5 of the flow. May import: every stage up to :mod:`vq2pc.circuit` (a continuous
mixture compiles to a :class:`~vq2pc.circuit.MixtureCircuit`).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "EiNet": "vq2pc.baselines.einet",
    "EiNetConfig": "vq2pc.baselines.einet",
    "train_einet": "vq2pc.baselines.einet",
    "ContinuousMixture": "vq2pc.baselines.cm",
    "CMConfig": "vq2pc.baselines.cm",
    "train_cm": "vq2pc.baselines.cm",
    "compile_cm": "vq2pc.baselines.cm",
    "sobol_normal": "vq2pc.baselines.cm",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'vq2pc.baselines' has no attribute {name!r}")
