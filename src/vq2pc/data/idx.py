"""IDX files (MNIST-style): reader, md5 check, lookup in data directories, download.

Lookup: for every directory in ``data_dir`` (argument), ``$VQ2PC_DATA``,
the user cache dir (``$XDG_CACHE_HOME/vq2pc`` or ``~/.cache/vq2pc``), a file is
accepted as ``<dir>/<dataset>/<file>`` or ``<dir>/<file>``. Every file is
md5-verified. A file found nowhere is downloaded (when allowed) from the
dataset's public mirrors into ``<cache>/<dataset>/``, md5-checked before it is
moved into place atomically.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vq2pc.core.files import atomic_write

__all__ = [
    "IdxSource",
    "IDX_SOURCES",
    "read_idx",
    "md5sum",
    "cache_dir",
    "search_dirs",
    "find_file",
    "download_file",
    "load_idx_dataset",
]

IMAGES_MAGIC = 0x00000803  # uint8, 3 dims
LABELS_MAGIC = 0x00000801  # uint8, 1 dim
DOWNLOAD_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class IdxSource:
    """The four IDX files of one dataset: role -> (file name, md5), plus mirror base URLs."""

    files: dict[str, tuple[str, str]]
    mirrors: tuple[str, ...]


_MNIST_STYLE = ("train_images", "train_labels", "test_images", "test_labels")
_FILE_NAMES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)

IDX_SOURCES: dict[str, IdxSource] = {
    "mnist": IdxSource(
        files=dict(
            zip(
                _MNIST_STYLE,
                zip(
                    _FILE_NAMES,
                    (
                        "f68b3c2dcbeaaa9fbdd348bbdeb94873",
                        "d53e105ee54ea40749a09fcbcd1e9432",
                        "9fb629c4189551a2d022fa330f9573f3",
                        "ec29112dd5afa0611ce80d1b7f02629c",
                    ),
                ),
            )
        ),
        mirrors=(
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "https://storage.googleapis.com/cvdf-datasets/mnist/",
        ),
    ),
    # md5 sums as published with Fashion-MNIST (zalandoresearch/fashion-mnist) and
    # used by torchvision and other loaders; several independent sources agree.
    "fashion-mnist": IdxSource(
        files=dict(
            zip(
                _MNIST_STYLE,
                zip(
                    _FILE_NAMES,
                    (
                        "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                        "25c81989df183df01b3e8a0aad5dffbe",
                        "bef4ecab320f06d8554ea6380940ec79",
                        "bb300cfdad3c16e7a12a480ee83cd310",
                    ),
                ),
            )
        ),
        mirrors=(
            "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
            "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
        ),
    ),
}


def read_idx(path: str | Path, magic: int) -> np.ndarray:
    """Read a gzip-compressed IDX file of unsigned bytes whose header is ``magic``.

    Returns a ``uint8`` array of the shape in the header (``[n, rows, cols]``
    for images, ``[n]`` for labels). Raises ``ValueError`` naming the file when
    it is not valid gzip, is truncated, or has the wrong magic number or size.
    """
    path = Path(path)
    try:
        with gzip.open(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError, zlib.error) as exc:
        raise ValueError(f"{path}: not a readable gzip IDX file (corrupt or truncated?): {exc}") from None
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: file too short for an IDX header ({len(raw)} bytes)")
    (found,) = struct.unpack(">I", raw[:4])
    if found != magic:
        raise ValueError(f"{path}: wrong IDX magic number 0x{found:08x}, expected 0x{magic:08x}")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(shape))
    if len(raw) - header != expected:
        raise ValueError(f"{path}: IDX header says {shape} = {expected} bytes of data, file holds {len(raw) - header}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape).copy()


def md5sum(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex md5 digest of a file."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_dir() -> Path:
    """The user cache dir of vq2pc: ``$XDG_CACHE_HOME/vq2pc`` or ``~/.cache/vq2pc``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "vq2pc"


def search_dirs(data_dir: str | Path | None) -> list[Path]:
    """Directories searched, in order: ``data_dir``, ``$VQ2PC_DATA``, :func:`cache_dir`."""
    dirs = [Path(d) for d in (data_dir, os.environ.get("VQ2PC_DATA")) if d]
    dirs.append(cache_dir())
    return list(dict.fromkeys(dirs))


def find_file(name: str, file: str, md5: str, dirs: list[Path]) -> Path | None:
    """First ``<dir>/<name>/<file>`` or ``<dir>/<file>`` that exists, md5-verified; ``None`` if none.

    Raises ``ValueError`` when the file found has the wrong md5.
    """
    for d in dirs:
        for candidate in (d / name / file, d / file):
            if candidate.is_file():
                found = md5sum(candidate)
                if found != md5:
                    raise ValueError(
                        f"{candidate}: md5 {found} does not match the {name} file {file} "
                        f"(expected {md5}); delete it or point --data-dir elsewhere"
                    )
                return candidate
    return None


def _fetch(url: str) -> bytes:
    """The body of ``url`` (network access; tests replace this)."""
    with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:  # noqa: S310 (fixed https/http mirrors)
        return response.read()


def download_file(file: str, md5: str, mirrors: tuple[str, ...], dest: Path) -> Path:
    """Download ``file`` from the first working mirror to ``dest`` atomically, md5-checked.

    Raises ``OSError`` listing every mirror's failure when none gives the right bytes.
    """
    errors = []
    for base in mirrors:
        url = base + file
        try:
            body = _fetch(url)
        except Exception as exc:  # urllib raises URLError, HTTPError, timeouts, ...
            errors.append(f"{url}: {exc}")
            continue
        found = hashlib.md5(body, usedforsecurity=False).hexdigest()
        if found != md5:
            errors.append(f"{url}: md5 {found} != expected {md5}")
            continue
        return atomic_write(dest, lambda p: p.write_bytes(body))
    raise OSError("; ".join(errors))


def _locate(name: str, file: str, md5: str, source: IdxSource, data_dir: str | Path | None, download: bool) -> Path:
    dirs = search_dirs(data_dir)
    path = find_file(name, file, md5, dirs)
    if path is not None:
        return path
    searched = ", ".join(str(p) for d in dirs for p in (d / name, d))
    if not download:
        raise FileNotFoundError(f"{name} file {file} not found (searched {searched}); downloading is disabled")
    dest = cache_dir() / name / file
    try:
        return download_file(file, md5, source.mirrors, dest)
    except OSError as exc:
        raise FileNotFoundError(
            f"{name} file {file} not found (searched {searched}) and the download into {dest.parent} failed "
            f"({exc}); put the four IDX files in one of these directories or pass --data-dir"
        ) from None


def load_idx_dataset(name: str, data_dir: str | Path | None = None, *, download: bool = True) -> dict[str, np.ndarray]:
    """The four arrays of IDX dataset ``name``: ``train_images [60000, 28, 28]``, ``train_labels [60000]``,
    ``test_images``, ``test_labels`` (``uint8``). Raises ``ValueError`` when images and labels disagree.
    """
    source = IDX_SOURCES[name]
    arrays = {}
    for role, (file, md5) in source.files.items():
        path = _locate(name, file, md5, source, data_dir, download)
        arrays[role] = read_idx(path, IMAGES_MAGIC if role.endswith("images") else LABELS_MAGIC)
    for split in ("train", "test"):
        if arrays[f"{split}_images"].shape[0] != arrays[f"{split}_labels"].shape[0]:
            raise ValueError(f"{name}: {split} images and labels have different counts")
    return arrays
