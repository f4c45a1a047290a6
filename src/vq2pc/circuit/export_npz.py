"""Export to a plain NumPy archive (``.npz``, readable from any language) and back; and the check of what
can be exported (a :class:`MixtureCircuit`, or a class-aware circuit's class marginal, with a head leaf kind)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from vq2pc.circuit.classes import CLASS_TENSOR, ClassMixture
from vq2pc.circuit.kernels import normalized_categorical
from vq2pc.circuit.mixture import MixtureCircuit
from vq2pc.core.checkpoint import CheckpointError
from vq2pc.core.files import atomic_write
from vq2pc.core.head_leaf import HeadCategorical
from vq2pc.core.leaves import LEAF_KINDS, Leaf, leaf_from_tensors

__all__ = ["NPZ_FORMAT", "NPZ_VERSION", "export_npz", "from_npz", "exportable"]

NPZ_FORMAT = "vq2pc/mixture-npz"
NPZ_VERSION = 1


def exportable(circuit: Any) -> MixtureCircuit:
    """``circuit`` itself, or a class-aware circuit's class marginal; decoder-head leaves as the categorical
    table they stand for (``[N, S, L]``: materialized)."""
    if isinstance(circuit, ClassMixture) and isinstance(circuit.model, MixtureCircuit):
        circuit = circuit.model
    if not isinstance(circuit, MixtureCircuit):
        raise ValueError(f"expected a MixtureCircuit, got {type(circuit).__name__}")
    if isinstance(circuit.leaf, HeadCategorical):
        return MixtureCircuit(circuit.leaf.categorical(), circuit.log_weights, meta=circuit.meta)
    if circuit.leaf.kind not in LEAF_KINDS:
        raise ValueError(
            f"{circuit.leaf.kind} leaves are not exported (libcirkit has no such input layer); "
            "save the circuit (MixtureCircuit.save) instead"
        )
    return circuit


def export_npz(circuit: MixtureCircuit | ClassMixture, path: str | Path) -> Path:
    """Write a plain ``.npz``: ``header`` (JSON string), ``log_weights [N]`` (normalized),
    ``raw_log_weights [N]`` (as given to the constructor; :func:`from_npz` uses them for a
    bit-exact reload) and the leaf arrays ``mean, std [N, S]`` / ``logits [N, S, L]``
    (normalized log-probabilities) / ``logits [N, S]`` (Bernoulli: p(x=1) = sigmoid); a
    :class:`ClassMixture` adds ``class_log_weights [N, C]`` (``log w_{n,c}``, normalized jointly)."""
    classes = circuit.log_weights.double() if isinstance(circuit, ClassMixture) else None
    circuit = exportable(circuit)
    leaf = circuit.leaf
    header = {
        "format": NPZ_FORMAT,
        "version": NPZ_VERSION,
        "kind": leaf.kind,
        "num_components": len(circuit),
        "num_variables": circuit.num_variables,
        "density": "p(x) = sum_n exp(log_weights[n]) prod_i p(x_i | leaf params [n, i])",
        "arrays": {k: list(v.shape) for k, v in leaf.tensors().items()},
        "meta": circuit.meta,
    }
    if classes is not None:
        header["num_classes"] = int(classes.shape[1])
        header["classes"] = (
            "p(x, c) = sum_n exp(class_log_weights[n, c]) prod_i p(x_i | leaf params [n, i]); "
            "log_weights = logsumexp over c of class_log_weights"
        )
    arrays = {k: v.detach().cpu().contiguous().numpy() for k, v in leaf.tensors().items()}
    arrays["log_weights"] = circuit.log_weights.detach().cpu().numpy()
    arrays["raw_log_weights"] = circuit._given_log_weights.detach().cpu().numpy()
    if classes is not None:
        arrays[CLASS_TENSOR] = classes.cpu().numpy()

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to the temporary name
            np.savez(f, header=np.array(json.dumps(header)), **arrays)

    return atomic_write(path, write)


def from_npz(
    path: str | Path, device: str | torch.device | None = None, classes: bool = False
) -> MixtureCircuit | ClassMixture:
    """The :class:`MixtureCircuit` of an archive written by :func:`export_npz` (``CheckpointError`` if bad);
    ``classes=True``: the :class:`ClassMixture` of an archive with class weights (its class marginal otherwise)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"npz file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            header = json.loads(str(npz["header"]))
            tensors = {k: torch.from_numpy(npz[k]).to(device or "cpu") for k in npz.files if k != "header"}
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{path} is not a readable npz archive: {exc}") from None
    if not isinstance(header, dict) or header.get("format") != NPZ_FORMAT or header.get("version") != NPZ_VERSION:
        raise CheckpointError(f"{path} is not a {NPZ_FORMAT} v{NPZ_VERSION} archive")
    try:
        kind = header["kind"]
        log_weights = tensors.pop("raw_log_weights", tensors["log_weights"])
        class_log_weights = tensors.pop(CLASS_TENSOR, None)
        circuit = MixtureCircuit(_npz_leaf(kind, tensors), log_weights, meta=header.get("meta"))
        if not classes:
            return circuit
        if class_log_weights is None:
            raise CheckpointError(f"{path} holds no class weights (not a class-aware circuit)")
        return ClassMixture(circuit, class_log_weights)
    except (KeyError, ValueError, IndexError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: invalid circuit contents: {exc}") from None


def _npz_leaf(kind: str, tensors: dict[str, Tensor]) -> Leaf:
    """The leaf of an npz archive; categorical logits are already normalized and are not renormalized."""
    if kind == "categorical":
        return normalized_categorical(tensors["logits"])
    return leaf_from_tensors(kind, tensors)
