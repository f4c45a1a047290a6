"""Deprecated import paths of vq2pc 0.1 (flat modules), kept for one release.

``import vq2pc.prior`` and ``from vq2pc.leaves import Gaussian`` still work and return the
module at its new home, with a :class:`DeprecationWarning`. Removed in vq2pc 0.3.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from types import ModuleType
from typing import Any

__all__ = ["OLD_PATHS", "install"]

OLD_PATHS: dict[str, str] = {
    "vq2pc.leaves": "vq2pc.core.leaves",
    "vq2pc.checkpoint": "vq2pc.core.checkpoint",
    "vq2pc.datasets.idx": "vq2pc.data.idx",
    "vq2pc.masks": "vq2pc.data.masks",
    "vq2pc.nets": "vq2pc.models.nets",
    "vq2pc.vqvae": "vq2pc.models.vqvae",
    "vq2pc.prior": "vq2pc.models.priors.pixelcnn",
    "vq2pc.train": "vq2pc.models.train",
    "vq2pc.quantizers": "vq2pc.models.quantizers",
    "vq2pc.enumerate": "vq2pc.latents.enumerate",
    "vq2pc.beam": "vq2pc.latents.beam",
    "vq2pc.selection": "vq2pc.latents.selection",
    "vq2pc.circuit_io": "vq2pc.circuit.io",
    "vq2pc.circuit_kernels": "vq2pc.circuit.kernels",
    "vq2pc.streaming": "vq2pc.circuit.streaming",
    "vq2pc.distillation": "vq2pc.circuit.distill",
    "vq2pc.exact": "vq2pc.circuit.exact",
    "vq2pc.refine": "vq2pc.circuit.refine",
    "vq2pc.export": "vq2pc.circuit.export",
    "vq2pc.config": "vq2pc.pipeline.config",
}


class _OldPathFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves an old module path to the module at its new path."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname in OLD_PATHS or fullname == "vq2pc.datasets":
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        if spec.name == "vq2pc.datasets":
            return importlib.import_module("vq2pc.data")
        new = OLD_PATHS[spec.name]
        warnings.warn(f"{spec.name} is deprecated; import {new}", DeprecationWarning, stacklevel=3)
        return importlib.import_module(new)

    def exec_module(self, module: ModuleType) -> None:
        """The module was executed at its new path."""


def install() -> None:
    """Add the finder once (idempotent)."""
    if not any(isinstance(f, _OldPathFinder) for f in sys.meta_path):
        sys.meta_path.append(_OldPathFinder())
