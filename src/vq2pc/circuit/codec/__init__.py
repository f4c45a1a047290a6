"""Lossless image compression with a discrete circuit: the file's size is the circuit's ``-log2 p̂(x)``.

``encode(circuit, images) -> bytes``, ``decode(circuit, data, indices=None) -> images``; see
:mod:`.coder` (streams, file, why encoder and decoder agree), :mod:`.model` (the per-pixel
conditionals and how a new leaf plugs in) and :mod:`.format` (the file layout).
"""

from vq2pc.circuit.codec.coder import (
    DEFAULT_ROWS,
    dataset_images,
    decode,
    encode,
    load_compressed,
    read_header,
    save_compressed,
)
from vq2pc.circuit.codec.format import Header
from vq2pc.circuit.codec.model import CodecError, circuit_digest, pixel_tables

compress = encode
"""``vq2pc.compress(circuit, images) -> bytes`` (the package-level name of :func:`encode`)."""
decompress = decode
"""``vq2pc.decompress(circuit, data, indices=None) -> images`` (the package-level name of :func:`decode`)."""

__all__ = [
    "DEFAULT_ROWS",
    "CodecError",
    "Header",
    "circuit_digest",
    "compress",
    "dataset_images",
    "decode",
    "decompress",
    "encode",
    "load_compressed",
    "pixel_tables",
    "read_header",
    "save_compressed",
]
