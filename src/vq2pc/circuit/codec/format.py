"""The compressed file: header, block index, code words.

Layout (little endian)::

    MAGIC (8 bytes) | version u16 | reserved u16 | header length u32 | header JSON | crc32(header JSON) u32
    | offsets u64 [blocks + 1] (bytes, from the payload start) | crc32 u32 [blocks] | crc32(index) u32
    | payload: each block's range-coder words (u32)

The header names the circuit (SHA-256 of its parameters), the image shape, the levels, the image
count, the block size and the coder's constants. Every way a file can be unusable (foreign,
newer version, truncated, corrupt, made with another circuit) is one :class:`CodecError`.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import asdict, dataclass

import numpy as np

from vq2pc.circuit.codec.model import CUTOFF, FLOOR, GEMM_CLAMP, LOG_CLAMP, CodecError

__all__ = ["MAGIC", "VERSION", "Header", "pack", "unpack"]

MAGIC = b"VQ2PCZ\x00\x01"
VERSION = 2
_FIXED = struct.Struct("<8sHHI")
CODER = "constriction.stream.queue.RangeEncoder/u32 words/Categorical(perfect=False)/24-bit"


@dataclass(frozen=True)
class Header:
    """What a decoder must know besides the circuit (all of it JSON in the file)."""

    circuit_sha256: str
    leaf: str
    image_shape: tuple[int, ...]
    levels: int
    count: int
    rows: int
    coder: str = CODER
    floor: float = FLOOR
    cutoff: float = CUTOFF
    log_clamp: float = LOG_CLAMP
    gemm_clamp: float = GEMM_CLAMP

    @property
    def num_blocks(self) -> int:
        return -(-self.count // self.rows)

    def check_constants(self) -> None:
        """The constants this version of the codec computes with must be the file's."""
        ours = Header(self.circuit_sha256, self.leaf, self.image_shape, self.levels, self.count, self.rows)
        for name in ("coder", "floor", "cutoff", "log_clamp", "gemm_clamp"):
            if getattr(self, name) != getattr(ours, name):
                raise CodecError(
                    f"file was written with {name}={getattr(self, name)!r}; this codec uses "
                    f"{getattr(ours, name)!r} (written by another vq2pc version?)"
                )


def pack(header: Header, blocks: list[np.ndarray]) -> bytes:
    """The whole file for ``header`` and each block's ``uint32`` words."""
    text = json.dumps(asdict(header), sort_keys=True).encode()
    payload = [np.ascontiguousarray(b, dtype="<u4").tobytes() for b in blocks]
    offsets = np.zeros(len(payload) + 1, dtype="<u8")
    np.cumsum([len(p) for p in payload], out=offsets[1:])
    crcs = np.array([zlib.crc32(p) for p in payload], dtype="<u4")
    index = offsets.tobytes() + crcs.tobytes()
    return b"".join(
        [
            _FIXED.pack(MAGIC, VERSION, 0, len(text)),
            text,
            struct.pack("<I", zlib.crc32(text)),
            index,
            struct.pack("<I", zlib.crc32(index)),
            *payload,
        ]
    )


def unpack(data: bytes) -> tuple[Header, np.ndarray, np.ndarray, int]:
    """``(header, offsets [blocks + 1], crcs [blocks], payload start)``; :class:`CodecError` on a bad file."""
    data = memoryview(data)
    if len(data) < _FIXED.size or bytes(data[:8]) != MAGIC:
        raise CodecError("not a vq2pc compressed file (wrong magic bytes)")
    _, version, _, n_text = _FIXED.unpack_from(data)
    if version != VERSION:
        raise CodecError(f"compressed file has format version {version}; this vq2pc reads version {VERSION}")
    pos = _FIXED.size
    text = _take(data, pos, n_text, "header")
    if zlib.crc32(text) != struct.unpack_from("<I", _take(data, pos + n_text, 4, "header checksum"))[0]:
        raise CodecError("compressed file is corrupt: the header fails its checksum")
    header = _header(text)
    pos += n_text + 4
    n = header.num_blocks
    index = _take(data, pos, 12 * n + 8, "block index")
    if zlib.crc32(index) != struct.unpack_from("<I", _take(data, pos + len(index), 4, "index checksum"))[0]:
        raise CodecError("compressed file is corrupt: the block index fails its checksum")
    offsets = np.frombuffer(index, dtype="<u8", count=n + 1)
    crcs = np.frombuffer(index, dtype="<u4", count=n, offset=8 * (n + 1))
    start = pos + len(index) + 4
    if offsets[0] != 0 or (np.diff(offsets.astype(np.int64)) < 0).any() or (offsets % 4).any():
        raise CodecError("compressed file is corrupt: the block offsets are not increasing multiples of 4")
    if len(data) != start + int(offsets[-1]):
        what = "truncated" if len(data) < start + int(offsets[-1]) else "corrupt (bytes after the last block)"
        raise CodecError(f"compressed file is {what}: {len(data)} bytes, the index says {start + int(offsets[-1])}")
    return header, offsets, crcs, start


def block_words(data: bytes, offsets: np.ndarray, crcs: np.ndarray, start: int, b: int) -> np.ndarray:
    """Block ``b``'s code words, checked against its CRC."""
    raw = memoryview(data)[start + int(offsets[b]) : start + int(offsets[b + 1])]
    if zlib.crc32(raw) != int(crcs[b]):
        raise CodecError(f"compressed file is corrupt: block {b} fails its checksum")
    return np.frombuffer(raw, dtype="<u4").astype(np.uint32)


def _take(data: memoryview, pos: int, n: int, what: str) -> bytes:
    if pos + n > len(data):
        raise CodecError(f"compressed file is truncated (in the {what})")
    return bytes(data[pos : pos + n])


def _header(text: bytes) -> Header:
    try:
        d = json.loads(text)
        d["image_shape"] = tuple(int(v) for v in d["image_shape"])
        header = Header(**d)
    except (ValueError, TypeError, KeyError) as exc:
        raise CodecError(f"compressed file has a bad header: {exc}") from None
    if header.count < 1 or header.rows < 1 or header.levels < 2:
        raise CodecError(
            f"compressed file has a bad header: count={header.count}, rows={header.rows}, levels={header.levels}"
        )
    return header
