"""The file format of a :class:`~vq2pc.circuit.tree.TreeCircuit`: ONE ``.safetensors`` file.

Tensors: ``parent [M]`` and ``owner [S]`` (int64), and the normalized log-parameters ``root [K]``,
``edges [M − 1, K, K]`` and ``leaves [S, L, K]``. The safetensors string metadata holds
``format = "vq2pc/tree-circuit"``, ``format_version`` and ``meta`` (JSON of the user's metadata dict).
Writes are atomic; a foreign, corrupt or inconsistent file raises
:class:`~vq2pc.core.checkpoint.CheckpointError`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from vq2pc.core.checkpoint import CheckpointError
from vq2pc.core.files import atomic_write

__all__ = ["TREE_FORMAT_TAG", "TreeParams", "TreeFile", "write_tree", "read_tree"]

TREE_FORMAT_TAG = "vq2pc/tree-circuit"
_VERSION = "1"
_NAMES = ("parent", "owner", "root", "edges", "leaves")


class TreeParams(NamedTuple):
    """Normalized log-parameters: ``root [K]``, ``edges [E, K, K]``, ``leaves [S, L, K]``."""

    root: Tensor
    edges: Tensor
    leaves: Tensor


@dataclass
class TreeFile:
    """The contents of a tree circuit file: ``parent [M]``, ``owner [S]``, the parameters and ``meta``."""

    parent: Tensor
    owner: Tensor
    params: TreeParams
    meta: dict[str, Any]


def write_tree(path: str | Path, f: TreeFile) -> Path:
    """Write ``f`` to ``path`` (atomically)."""
    values = (f.parent, f.owner, *f.params)
    tensors = {name: t.detach().cpu().contiguous() for name, t in zip(_NAMES, values)}
    header = {"format": TREE_FORMAT_TAG, "format_version": _VERSION, "meta": json.dumps(f.meta)}
    return atomic_write(path, lambda p: save_file(tensors, str(p), metadata=header))


def read_tree(path: str | Path) -> TreeFile:
    """Read a file written by :func:`write_tree` (on the CPU)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"tree circuit file not found: {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    except Exception as exc:  # safetensors raises several types for corrupt files
        raise CheckpointError(f"{path} is not a readable vq2pc tree circuit (corrupt or foreign): {exc}") from None
    if header.get("format") != TREE_FORMAT_TAG:
        raise CheckpointError(f"{path} is not a vq2pc tree circuit (format tag: {header.get('format')!r})")
    if header.get("format_version") != _VERSION:
        raise CheckpointError(f"{path}: unsupported tree circuit format version {header.get('format_version')!r}")
    missing = [n for n in _NAMES if n not in tensors]
    if missing:
        raise CheckpointError(f"{path}: missing tensors {missing}")
    try:
        meta = json.loads(header.get("meta", "{}"))
    except ValueError as exc:
        raise CheckpointError(f"{path}: bad metadata: {exc}") from None
    params = TreeParams(tensors["root"], tensors["edges"], tensors["leaves"])
    return TreeFile(tensors["parent"], tensors["owner"], params, meta)
