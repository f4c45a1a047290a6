"""Safe saves and loads of checkpoints (atomic writes: :mod:`vq2pc.core.files`).

Checkpoints are loaded with ``torch.load(weights_only=True)``:
a file a user hands in is never unpickled.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch

from vq2pc.core.files import atomic_write, write_json

__all__ = ["CheckpointError", "atomic_write", "save_checkpoint", "load_checkpoint", "write_json", "SavableModel"]


class CheckpointError(ValueError):
    """A checkpoint is missing, truncated, corrupt or of another kind."""


def save_checkpoint(path: str | Path, kind: str, payload: dict[str, Any]) -> Path:
    """Save ``payload`` (tensors, dicts, lists, numbers, strings) tagged ``vq2pc/<kind>``."""
    data = {"format": f"vq2pc/{kind}", **payload}
    return atomic_write(path, lambda p: torch.save(data, p))


def load_checkpoint(path: str | Path, kind: str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` and check its kind.

    Raises :class:`CheckpointError` naming the file when it is missing, not a
    torch file, truncated, or a checkpoint of another kind.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        data = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt files
        raise CheckpointError(f"{path} is not a readable vq2pc checkpoint (corrupt or truncated?): {exc}") from None
    fmt = data.get("format") if isinstance(data, dict) else None
    if fmt != f"vq2pc/{kind}":
        raise CheckpointError(f"{path} is not a vq2pc {kind} checkpoint (format tag: {fmt!r})")
    return data


_M = TypeVar("_M", bound="SavableModel")


class SavableModel:
    """Mixin for ``nn.Module`` models built from one dataclass config (``self.cfg``).

    ``save`` writes ``{"config", "state_dict"}`` as a ``vq2pc/<checkpoint_kind>`` checkpoint;
    ``load`` reads that or a :func:`vq2pc.models.train.fit` checkpoint (config under ``meta``, best
    weights), and turns every mismatch into one :class:`CheckpointError` naming the file.
    """

    checkpoint_kind: ClassVar[str]
    config_class: ClassVar[type]

    def save(self, path: str | Path) -> Path:
        """Write config + weights atomically."""
        return save_checkpoint(
            path, self.checkpoint_kind, {"config": asdict(self.cfg), "state_dict": self.state_dict()}
        )

    @classmethod
    def load(cls: type[_M], path: str | Path, device: str | torch.device | None = None) -> _M:
        """Load a model saved by :meth:`save` or trained with a checkpoint; eval mode, on ``device``."""
        payload = load_checkpoint(path, cls.checkpoint_kind, map_location=device or "cpu")
        config = payload.get("config") or (payload.get("meta") or {}).get("config")
        if not isinstance(config, dict) or "state_dict" not in payload:
            raise CheckpointError(f"{path} is a {cls.checkpoint_kind} checkpoint without a config or weights")
        try:
            model = cls(cls.config_class(**config))
            model.load_state_dict(payload["state_dict"])
        except (TypeError, RuntimeError, ValueError) as exc:
            raise CheckpointError(f"{path}: config and weights do not make a {cls.__name__}: {exc}") from None
        return model.to(device or "cpu").eval()
