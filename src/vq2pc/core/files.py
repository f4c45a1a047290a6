"""Atomic files: every file vq2pc writes goes to ``<name>.tmp`` first and is moved into place
with ``os.replace``, so an interrupted run never leaves a half-written file under the final name.

Under ``torchrun`` a write is collective: every rank calls it, rank 0 alone writes (the run
directory lies on a filesystem all ranks share), and no rank returns before the file is in
place, so all ranks read the same files and make the same caching decisions."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

from vq2pc.core.distributed import barrier, is_main

__all__ = ["atomic_write", "write_json"]


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` then rename ``tmp_path`` to ``path``; clean up on failure.
    In a process group: rank 0 writes, between two barriers (see the module docstring)."""
    path = Path(path)
    barrier()  # every rank has made its decisions on the old files
    if is_main():
        _write(path, write)
    barrier()  # the new file is in place for every rank
    return path


def _write(path: Path, write: Callable[[Path], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as indented JSON, atomically."""
    text = json.dumps(obj, indent=2, sort_keys=False, default=str)
    return atomic_write(path, lambda p: p.write_text(text + "\n"))
