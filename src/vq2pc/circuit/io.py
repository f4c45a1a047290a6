"""Saving and loading :class:`~vq2pc.circuit.MixtureCircuit` files, and input validation.

File format: ONE ``.safetensors`` file. Tensors: ``log_weights [N]`` and the leaf
tensors under ``leaf.<name>`` (``leaf.mean``/``leaf.std`` ``[N, S]``,
``leaf.logits`` ``[N, S, L]`` or ``[N, S]``). The safetensors string metadata
holds ``format = "vq2pc/circuit"``, ``format_version``, ``kind``, ``N``, ``S``,
``L`` (0 unless categorical or discretized) and ``meta`` (JSON of the user's metadata dict,
e.g. ``image_shape`` and ``levels``). Writes are atomic.

Optional extra tensors (any other name, e.g. a class-aware circuit's ``class_log_weights [N, C]``)
are written beside them; :func:`read_circuit` ignores them, :func:`read_extra` reads them, so a
reader that does not know an extra still loads the circuit (a class-aware file as its class marginal).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from vq2pc.core import validate
from vq2pc.core.checkpoint import CheckpointError
from vq2pc.core.files import atomic_write
from vq2pc.core.head_leaf import HeadCategorical  # noqa: F401  (registers its leaf kind)
from vq2pc.core.leaves import CIRCUIT_LEAF_KINDS, Leaf

__all__ = [
    "FORMAT_TAG",
    "FORMAT_VERSION",
    "write_circuit",
    "read_circuit",
    "read_extra",
    "prepare_input",
    "check_sample_args",
]

FORMAT_TAG = "vq2pc/circuit"
FORMAT_VERSION = 1


def write_circuit(
    path: str | Path, leaf: Leaf, log_weights: Tensor, meta: dict[str, Any], extra: dict[str, Tensor] | None = None
) -> Path:
    """Write the circuit's tensors and metadata to ``path`` (atomically); ``extra``: more named tensors."""
    tensors = {f"leaf.{k}": v.detach().cpu().contiguous() for k, v in leaf.tensors().items()}
    tensors["log_weights"] = log_weights.detach().cpu().contiguous()
    for name, t in (extra or {}).items():
        if name in tensors or name.startswith("leaf."):
            raise ValueError(f"extra tensor name {name!r} clashes with the circuit's own tensors")
        tensors[name] = t.detach().cpu().contiguous()
    n, s = int(leaf.batch_shape[0]), int(leaf.batch_shape[1])
    levels = int(getattr(leaf, "num_levels", 0))
    header = {
        "format": FORMAT_TAG,
        "format_version": str(FORMAT_VERSION),
        "kind": leaf.kind,
        "N": str(n),
        "S": str(s),
        "L": str(levels),
        "meta": json.dumps(meta),
    }
    return atomic_write(path, lambda p: save_file(tensors, str(p), metadata=header))


def read_circuit(
    path: str | Path, device: str | torch.device | None
) -> tuple[str, dict[str, Tensor], Tensor, dict, int]:
    """Read ``(kind, leaf tensors, log_weights, meta, L)``; raise :class:`CheckpointError` for bad files."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"circuit file not found: {path}")
    try:
        with safe_open(str(path), framework="pt", device=str(device or "cpu")) as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    except Exception as exc:  # safetensors raises several types for corrupt files
        raise CheckpointError(
            f"{path} is not a readable vq2pc circuit (corrupt, truncated or foreign): {exc}"
        ) from None
    if header.get("format") != FORMAT_TAG:
        raise CheckpointError(f"{path} is not a vq2pc circuit (format tag: {header.get('format')!r})")
    if header.get("format_version") != str(FORMAT_VERSION):
        raise CheckpointError(f"{path}: unsupported circuit format version {header.get('format_version')!r}")
    kind = header.get("kind", "")
    if kind not in CIRCUIT_LEAF_KINDS or "log_weights" not in tensors:
        raise CheckpointError(f"{path}: unknown leaf kind {kind!r} or missing log_weights")
    try:
        meta = json.loads(header.get("meta", "{}"))
        n, s, levels = int(header["N"]), int(header["S"]), int(header.get("L", "0"))
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"{path}: bad circuit metadata: {exc}") from None
    leaf_tensors = {k[len("leaf.") :]: v for k, v in tensors.items() if k.startswith("leaf.")}
    names = getattr(CIRCUIT_LEAF_KINDS[kind], "batch_tensors", None) or tuple(leaf_tensors)  # shaped [N, S, ...]
    shapes = {tuple(t.shape[:2]) for name, t in leaf_tensors.items() if name in names}
    if shapes != {(n, s)} or tuple(tensors["log_weights"].shape) != (n,):
        raise CheckpointError(f"{path}: tensor shapes do not match the metadata N={n}, S={s}")
    return kind, leaf_tensors, tensors["log_weights"], meta, levels


def read_extra(path: str | Path, names: tuple[str, ...], device: str | torch.device | None = None) -> dict[str, Tensor]:
    """The extra tensors ``names`` of a circuit file that holds them (absent names are left out)."""
    try:
        with safe_open(str(path), framework="pt", device=str(device or "cpu")) as f:
            return {k: f.get_tensor(k) for k in names if k in set(f.keys())}
    except Exception as exc:  # safetensors raises several types for corrupt files
        raise CheckpointError(
            f"{path} is not a readable vq2pc circuit (corrupt, truncated or foreign): {exc}"
        ) from None


def prepare_input(
    x: Tensor, mask: Tensor | None, leaf: Leaf, fill: Tensor, require_mask: bool = False
) -> tuple[Tensor, Tensor | None]:
    """Validate and flatten ``x`` and ``mask`` for a circuit over ``S = leaf.num_variables``.

    Returns ``x [B, S]`` (leaf dtype/device; unobserved entries replaced by ``fill [S]``)
    and ``mask [B, S]`` bool or ``None`` (everything observed). Only observed entries are
    checked against the leaf's support, so unobserved entries may hold anything (e.g. NaN).
    ``mask`` may be ``[B, S]``, the shape of ``x``, or ``S`` entries shared by all rows
    (:func:`vq2pc.core.validate.observed_mask`).
    """
    s = leaf.num_variables
    x = validate.rows(x, s).to(device=fill.device, dtype=fill.dtype)
    if mask is None:
        if require_mask:
            raise ValueError("mask is required")
        leaf.validate_data(x, "x")
        return x, None
    mask = validate.observed_mask(mask, x.shape[0], s).to(fill.device)
    leaf.validate_data(x[mask], "x (observed entries)")
    return torch.where(mask, x, fill), mask


def check_sample_args(n: int | None, x: Tensor | None, mask: Tensor | None, rows: int | None = None) -> int | None:
    """Validate the arguments of a ``sample(n, x=, mask=)`` query; returns ``n`` as an int (None if not given).

    Unconditional (``x is None``): ``n >= 1`` and no mask. Conditional: ``n``, when given, must equal
    the ``rows`` of the prepared ``x`` (one conditional sample per row).
    """
    if x is None:
        if mask is not None:
            raise ValueError("mask given without x")
        if n is None or int(n) < 1:
            raise ValueError(f"n must be a positive number of samples, got {n}")
        return int(n)
    if n is not None and rows is not None and int(n) != rows:
        raise ValueError(f"n={n} does not match the {rows} rows of x (one conditional sample per row)")
    return None if n is None else int(n)
