"""Atomic files: every file vq2pc writes goes to ``<name>.tmp`` first and is moved into place
with ``os.replace``, so an interrupted run never leaves a half-written file under the final name.

Under ``torchrun`` a write is collective: every rank calls it, rank 0 alone writes (the run
directory lies on a filesystem all ranks share), and no rank returns before the file is in
place, so all ranks read the same files and make the same caching decisions."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

from vq2pc.core.distributed import barrier, is_main

__all__ = ["atomic_write", "write_json", "check_writable"]


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


def check_writable(path: str | Path, directory: bool = False) -> None:
    """Raise ``ValueError`` naming ``path`` when it cannot be written (checked before any work, creating nothing).

    ``directory``: ``path`` is a folder to write into (else a file). The nearest existing ancestor must be a
    folder in which a file can be created (probed with a temporary file, so permissions, read-only file
    systems and root's exemptions are all judged by the system itself).
    """
    path = Path(path)
    if path.exists() and path.is_dir() != directory:
        raise ValueError(f"cannot write {path}: it is {'a file, not a folder' if directory else 'a folder'}")
    parent = path if directory and path.exists() else path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"cannot write {path}: {parent} is a file, not a folder")
    try:
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".vq2pc-write-test-"):
            pass
    except OSError as exc:
        raise ValueError(f"cannot write {path}: {exc.strerror or exc} ({parent})") from None
