"""The file formats of a :class:`~vq2pc.circuit.tree.TreeCircuit` and a
:class:`~vq2pc.circuit.tree_mixture.TreeMixture`: ONE ``.safetensors`` file each.

A tree: tensors ``parent [M]`` and ``owner [S]`` (int64), and the normalized log-parameters ``root [K]``,
``edges [M − 1, K, K]`` and ``leaves [S, L, K]``; the safetensors string metadata holds
``format = "vq2pc/tree-circuit"``, ``format_version`` and ``meta`` (JSON of the user's metadata dict).
A mixture of ``C`` trees: ``log_weights [C]`` and each component's five tensors prefixed ``"{c}."``;
``format = "vq2pc/tree-mixture"`` and ``meta`` the JSON list of the components' dicts.
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

__all__ = [
    "TREE_FORMAT_TAG",
    "MIXTURE_FORMAT_TAG",
    "TreeParams",
    "TreeFile",
    "write_tree",
    "read_tree",
    "write_tree_mixture",
    "read_tree_mixture",
]

TREE_FORMAT_TAG = "vq2pc/tree-circuit"
MIXTURE_FORMAT_TAG = "vq2pc/tree-mixture"
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


def _tensors(f: TreeFile, prefix: str = "") -> dict[str, Tensor]:
    values = (f.parent, f.owner, *f.params)
    return {prefix + name: t.detach().cpu().contiguous() for name, t in zip(_NAMES, values)}


def write_tree(path: str | Path, f: TreeFile) -> Path:
    """Write ``f`` to ``path`` (atomically)."""
    header = {"format": TREE_FORMAT_TAG, "format_version": _VERSION, "meta": json.dumps(f.meta)}
    tensors = _tensors(f)
    return atomic_write(path, lambda p: save_file(tensors, str(p), metadata=header))


def write_tree_mixture(path: str | Path, log_weights: Tensor, files: list[TreeFile]) -> Path:
    """Write a mixture: ``log_weights [C]`` and the ``C`` components ``files`` to ``path`` (atomically)."""
    header = {"format": MIXTURE_FORMAT_TAG, "format_version": _VERSION, "meta": json.dumps([f.meta for f in files])}
    tensors = {"log_weights": log_weights.detach().cpu().contiguous()}
    for c, f in enumerate(files):
        tensors.update(_tensors(f, f"{c}."))
    return atomic_write(path, lambda p: save_file(tensors, str(p), metadata=header))


def _read(path: Path, tag: str, kind: str) -> tuple[dict[str, Tensor], object]:
    """The tensors and the parsed ``meta`` of a file of format ``tag``."""
    if not path.is_file():
        raise CheckpointError(f"{kind} file not found: {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    except Exception as exc:  # safetensors raises several types for corrupt files
        raise CheckpointError(f"{path} is not a readable vq2pc {kind} (corrupt or foreign): {exc}") from None
    if header.get("format") != tag:
        raise CheckpointError(f"{path} is not a vq2pc {kind} (format tag: {header.get('format')!r})")
    if header.get("format_version") != _VERSION:
        raise CheckpointError(f"{path}: unsupported {kind} format version {header.get('format_version')!r}")
    try:
        return tensors, json.loads(header.get("meta", "{}"))
    except ValueError as exc:
        raise CheckpointError(f"{path}: bad metadata: {exc}") from None


def _file(path: Path, tensors: dict[str, Tensor], meta: object, prefix: str = "") -> TreeFile:
    missing = [prefix + n for n in _NAMES if prefix + n not in tensors]
    if missing or not isinstance(meta, dict):
        raise CheckpointError(f"{path}: missing tensors {missing}" if missing else f"{path}: bad metadata")
    t = [tensors[prefix + n] for n in _NAMES]
    return TreeFile(t[0], t[1], TreeParams(*t[2:]), meta)


def read_tree(path: str | Path) -> TreeFile:
    """Read a file written by :func:`write_tree` (on the CPU)."""
    tensors, meta = _read(Path(path), TREE_FORMAT_TAG, "tree circuit")
    return _file(Path(path), tensors, meta)


def read_tree_mixture(path: str | Path) -> tuple[Tensor, list[TreeFile]]:
    """``(log_weights [C], components)`` of a file written by :func:`write_tree_mixture` (on the CPU)."""
    tensors, meta = _read(Path(path), MIXTURE_FORMAT_TAG, "tree mixture")
    weights = tensors.get("log_weights")
    if weights is None or weights.dim() != 1 or not isinstance(meta, list) or len(meta) != weights.numel():
        raise CheckpointError(f"{path}: the weights and the components' metadata do not match")
    return weights, [_file(Path(path), tensors, m, f"{c}.") for c, m in enumerate(meta)]
