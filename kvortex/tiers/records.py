"""The disk tier's on-disk format: records in segment files, and the sealed-segment index.

A segment file ``seg-<id:012d>.kvx`` is a sequence of records, each starting at a multiple of
4096 bytes (O_DIRECT alignment)::

    offset  size  field (little endian)
    0       8     magic b"KVXCHNK1"
    8       4     format version (1)
    12      4     header bytes (4096)
    16      16    namespace fingerprint: SHA-256(Namespace.encode())[:16]
    32      32    chunk key
    64      8     payload bytes (the chunk, unpadded)
    72      4     payload CRC-32 (zlib's polynomial; kvortex.diskio.crc32)
    76      4     reserved, 0
    80      8     sequence number (per tier, increasing: the newest copy of a key wins)
    88      4     header CRC-32 over bytes 0..87
    92      4004  zero
    4096    P     payload, padded with anything to a multiple of 4096

A record is served only if its header CRC, magic, version, namespace, key and length match
and the payload's CRC-32 is right: a torn write (a process killed mid-record), a bit flip or a
truncated file reads as a miss, never as wrong bytes.

When every record of a segment has been written, the segment is sealed: its entries are written
to ``seg-<id>.idx`` (atomically: a temporary file renamed into place), so a restart reads one
small file per segment instead of every header::

    0   8   magic b"KVXINDX1"
    8   4   format version (1)
    12  4   entry count n
    16  n*72  entries (numpy structured, little endian: ns 16, key 32, offset u8,
              payload u8, seq u8)
    ..  4   CRC-32 of everything before it

An index file that is missing or fails its CRC is ignored and the segment's headers are scanned.
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from dataclasses import dataclass

import numpy as np

__all__ = [
    "ENTRY_DTYPE",
    "HEADER_BYTES",
    "Header",
    "namespace_fingerprint",
    "pack_header",
    "pack_index",
    "record_bytes",
    "unpack_header",
    "unpack_index",
]

ALIGN = 4096
HEADER_BYTES = 4096
MAGIC = b"KVXCHNK1"
INDEX_MAGIC = b"KVXINDX1"
VERSION = 1
_HEAD = struct.Struct("<8sII16s32sQIIQ")  # bytes 0..87
_HEAD_CRC = struct.Struct("<I")
_INDEX_HEAD = struct.Struct("<8sII")

ENTRY_DTYPE = np.dtype(
    [
        ("ns", "V16"),
        ("key", "V32"),
        ("offset", "<u8"),
        ("payload", "<u8"),
        ("seq", "<u8"),
    ]
)


def namespace_fingerprint(encoded_namespace: bytes) -> bytes:
    """The 16 bytes that tie a record to one namespace (model, layout, dtype, TP shard, salt)."""
    return hashlib.sha256(encoded_namespace).digest()[:16]


def record_bytes(payload: int) -> int:
    """Bytes one record of ``payload`` bytes takes in a segment (header + padded payload)."""
    return HEADER_BYTES + -(-payload // ALIGN) * ALIGN


@dataclass(frozen=True)
class Header:
    """A record header's fields (see the module docstring)."""

    ns: bytes
    key: bytes
    payload: int
    crc: int
    seq: int


def pack_header(h: Header, out: memoryview | None = None) -> bytes:
    """The 4096 header bytes of ``h`` (written into ``out`` too when given)."""
    head = _HEAD.pack(MAGIC, VERSION, HEADER_BYTES, h.ns, h.key, h.payload, h.crc, 0, h.seq)
    raw = head + _HEAD_CRC.pack(zlib.crc32(head)) + bytes(HEADER_BYTES - _HEAD.size - 4)
    if out is not None:
        out[:HEADER_BYTES] = raw
    return raw


def unpack_header(raw: bytes | memoryview) -> Header | None:
    """The header in ``raw`` (at least 92 bytes), or None when it is not a valid header."""
    if len(raw) < _HEAD.size + 4:
        return None
    head = bytes(raw[: _HEAD.size])
    (crc,) = _HEAD_CRC.unpack_from(raw, _HEAD.size)
    if zlib.crc32(head) != crc:
        return None
    magic, version, hbytes, ns, key, payload, pcrc, _, seq = _HEAD.unpack(head)
    if magic != MAGIC or version != VERSION or hbytes != HEADER_BYTES:
        return None
    return Header(ns, key, payload, pcrc, seq)


def pack_index(entries: np.ndarray) -> bytes:
    """A sealed segment's index file (entries of :data:`ENTRY_DTYPE`)."""
    body = (
        _INDEX_HEAD.pack(INDEX_MAGIC, VERSION, len(entries))
        + entries.astype(ENTRY_DTYPE, copy=False).tobytes()
    )
    return body + _HEAD_CRC.pack(zlib.crc32(body))


def unpack_index(raw: bytes) -> np.ndarray | None:
    """The entries of an index file, or None when it is damaged or of another version."""
    if len(raw) < _INDEX_HEAD.size + 4:
        return None
    body, (crc,) = raw[:-4], _HEAD_CRC.unpack(raw[-4:])
    if zlib.crc32(body) != crc:
        return None
    magic, version, count = _INDEX_HEAD.unpack_from(body)
    if magic != INDEX_MAGIC or version != VERSION:
        return None
    if len(body) != _INDEX_HEAD.size + count * ENTRY_DTYPE.itemsize:
        return None
    return np.frombuffer(body, dtype=ENTRY_DTYPE, offset=_INDEX_HEAD.size, count=count)
