"""The disk tier's I/O: segment files in one directory, records written and read in batches.

Format: :mod:`kvortex.tiers.records`. Threading: a :class:`SegmentStore` is driven by one
thread at a time (the disk tier's I/O thread); its batches run through
:class:`kvortex.diskio.BatchIO` (native: Linux AIO with the GIL released; fallback: a thread
pool of ``os.preadv``/``os.pwritev``), so one call keeps many requests in flight.

Failures never raise into the caller: a batch returns one ``bool`` per record; a read whose
header, namespace, key, length or payload CRC does not match is ``False`` (a miss), and so is
any I/O error (ENOSPC, EIO, a segment deleted or truncated under us). The caller counts them.

One process owns a directory at a time: :class:`SegmentStore` takes an exclusive ``flock`` on
``<dir>/LOCK`` and refuses with :class:`DiskTierError` while another process holds it.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import logging
import mmap
import os
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kvortex import diskio
from kvortex.errors import KVortexError
from kvortex.tiers.faults import RateLimitedLog
from kvortex.tiers.records import (
    ENTRY_DTYPE,
    HEADER_BYTES,
    Header,
    pack_header,
    pack_index,
    record_bytes,
    unpack_header,
    unpack_index,
)

__all__ = ["DiskTierError", "ReadJob", "SegmentStore", "WriteJob", "scan_directory"]

log = logging.getLogger("kvortex")

_SEGMENT_RE = re.compile(r"^seg-(\d{12})\.kvx$")
_BATCH = 64  # records per BatchIO call (one scratch header each)


class DiskTierError(KVortexError, OSError):
    """The disk tier cannot start: its directory is unusable or owned by another process."""


@dataclass(frozen=True)
class WriteJob:
    """Write ``payload`` bytes at ``address`` as a record of ``key`` at ``segment``/``offset``."""

    segment: int
    offset: int
    key: bytes
    address: int
    payload: int
    seq: int


@dataclass(frozen=True)
class ReadJob:
    """Read the record of ``key`` at ``segment``/``offset`` into ``address`` (which must have
    room for the payload rounded up to 4096 bytes)."""

    segment: int
    offset: int
    key: bytes
    address: int
    payload: int


class SegmentStore:
    """Segment files of one disk tier (one namespace writes; others' records are ignored).

    Args:
        directory: where the segments live (created if missing).
        namespace: the namespace fingerprint written into and checked in every header.
        backend: I/O and CRC implementation (``None``: the process default).
    """

    def __init__(
        self, directory: str | os.PathLike[str], namespace: bytes, *, backend: str | None = None
    ) -> None:
        self.directory = Path(directory)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DiskTierError(f"disk_path {str(directory)!r} is unusable: {exc}") from exc
        if not os.access(self.directory, os.W_OK | os.X_OK):
            raise DiskTierError(f"disk_path {str(directory)!r} is not writable")
        self._lock_fd = os.open(self.directory / "LOCK", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(self._lock_fd)
            raise DiskTierError(
                f"disk_path {str(directory)!r} is in use by another KVortex process ({exc})"
            ) from exc
        self.namespace = namespace
        self.direct = diskio.direct_io_supported(self.directory)
        self.backend = backend
        self._io = diskio.BatchIO(_BATCH * 2, backend=backend)
        self._payloads = ThreadPoolExecutor(1, thread_name_prefix="kvortex-disk-payload")
        self._crc_pool = ThreadPoolExecutor(
            max(1, min(8, (os.cpu_count() or 2) // 2)), thread_name_prefix="kvortex-disk-crc"
        )
        # Page-aligned scratch for headers (O_DIRECT needs aligned buffers): one per record.
        self._scratch = mmap.mmap(-1, HEADER_BYTES * _BATCH)
        self._scratch_ref: ctypes.c_char | None = ctypes.c_char.from_buffer(self._scratch)
        self._scratch_addr = ctypes.addressof(self._scratch_ref)
        self._fds: dict[int, int] = {}
        self.faults = 0

    # -- files --------------------------------------------------------------------------------

    def path(self, segment: int, suffix: str = ".kvx") -> Path:
        return self.directory / f"seg-{segment:012d}{suffix}"

    def _fd(self, segment: int, *, create: bool) -> int:
        fd = self._fds.get(segment)
        if fd is None:
            fd, _ = diskio.open_file(self.path(segment), write=create, direct=self.direct)
            self._fds[segment] = fd
        return fd

    def delete(self, segment: int) -> None:
        """Remove a segment and its index file (a missing file is not an error)."""
        fd = self._fds.pop(segment, None)
        if fd is not None:
            os.close(fd)
        for suffix in (".kvx", ".idx"):
            with contextlib.suppress(FileNotFoundError):
                self.path(segment, suffix).unlink()

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._payloads.shutdown()
        self._crc_pool.shutdown()
        self._io.close()
        self._scratch_ref = None  # the buffer export must go before the mapping can close
        self._scratch.close()
        os.close(self._lock_fd)

    # -- records ------------------------------------------------------------------------------

    def write(self, jobs: Sequence[WriteJob]) -> list[bool]:
        """Write records; one bool per job (False: the record must not be indexed)."""
        results: list[bool] = []
        for start in range(0, len(jobs), _BATCH):
            results += self._write_batch(jobs[start : start + _BATCH])
        return results

    def _write_batch(self, jobs: Sequence[WriteJob]) -> list[bool]:
        """Payloads first, checksummed while they are in flight, then the headers: the CRC-32
        of a large chunk costs as much as writing it, so the two overlap (both release the GIL)
        and a record becomes valid only once its header lands after its payload."""
        fds: list[int] = []
        for job in jobs:
            try:
                fds.append(self._fd(job.segment, create=True))
            except OSError as exc:
                self._fault("open", exc)
                fds.append(-1)
        padded = [record_bytes(j.payload) - HEADER_BYTES for j in jobs]
        payload_ops: list[diskio.IOOp] = [
            (True, fd, job.offset + HEADER_BYTES, job.address, size)
            for fd, job, size in zip(fds, jobs, padded, strict=True)
            if fd >= 0
        ]
        in_flight = self._payloads.submit(self._io.run, payload_ops)
        view = memoryview(self._scratch)
        head_ops: dict[int, diskio.IOOp] = {}
        for i, (fd, job) in enumerate(zip(fds, jobs, strict=True)):
            if fd < 0:
                continue
            crc = diskio.crc32(job.address, job.payload, backend=self.backend)
            pack_header(
                Header(self.namespace, job.key, job.payload, crc, job.seq),
                view[i * HEADER_BYTES : (i + 1) * HEADER_BYTES],
            )
            head_ops[i] = (
                True,
                fd,
                job.offset,
                self._scratch_addr + i * HEADER_BYTES,
                HEADER_BYTES,
            )
        body = iter(in_flight.result())
        body_res = {i: next(body) for i in head_ops}
        # A record whose payload failed gets no header: it stays invalid on disk.
        landed = [i for i in head_ops if body_res[i] == padded[i]]
        head_res = dict(zip(landed, self._io.run([head_ops[i] for i in landed]), strict=True))
        ok = [False] * len(jobs)
        for i in head_ops:
            result = head_res.get(i, body_res[i])
            if i in head_res and result == HEADER_BYTES:
                ok[i] = True
            else:
                self._fault("write", OSError(-min(result, 0) or errno.EIO, "short write"))
        return ok

    def read(self, jobs: Sequence[ReadJob]) -> list[bool]:
        """Read records into their addresses; True only for a complete, valid record."""
        results: list[bool] = []
        for start in range(0, len(jobs), _BATCH):
            results += self._read_batch(jobs[start : start + _BATCH])
        return results

    def _read_batch(self, jobs: Sequence[ReadJob]) -> list[bool]:
        ops: list[diskio.IOOp] = []
        usable = []
        for i, job in enumerate(jobs):
            try:
                fd = self._fd(job.segment, create=False)
            except OSError as exc:
                self._fault("open", exc)
                continue
            usable.append(i)
            padded = record_bytes(job.payload) - HEADER_BYTES
            ops.append((False, fd, job.offset, self._scratch_addr + i * HEADER_BYTES, HEADER_BYTES))
            ops.append((False, fd, job.offset + HEADER_BYTES, job.address, padded))
        done = self._io.run(ops) if ops else []
        ok = [False] * len(jobs)
        view = memoryview(self._scratch)
        checks: list[tuple[int, int]] = []  # (job index, CRC its header promises)
        for n, i in enumerate(usable):
            job = jobs[i]
            h_res, b_res = done[2 * n], done[2 * n + 1]
            if h_res != HEADER_BYTES or b_res < job.payload:
                self._fault("read", OSError(-min(h_res, b_res, 0) or errno.EIO, "short read"))
                continue
            header = unpack_header(view[i * HEADER_BYTES : (i + 1) * HEADER_BYTES])
            if (
                header is None
                or header.ns != self.namespace
                or header.key != job.key
                or header.payload != job.payload
            ):
                self._fault("checksum", None)
                continue
            checks.append((i, header.crc))
        # The payloads' CRC-32s run in parallel (the native CRC releases the GIL): checking
        # a batch of large chunks on one thread costs a third of reading them.
        crcs = self._crc_pool.map(
            lambda i: diskio.crc32(jobs[i].address, jobs[i].payload, backend=self.backend),
            [i for i, _ in checks],
        )
        for (i, want), got in zip(checks, crcs, strict=True):
            if got == want:
                ok[i] = True
            else:
                self._fault("checksum", None)
        return ok

    # -- sealing and restart ------------------------------------------------------------------

    def seal(self, segment: int, entries: np.ndarray) -> None:
        """Write a closed segment's index file (atomically; a failure only costs a scan)."""
        tmp = self.path(segment, ".idx.tmp")
        try:
            tmp.write_bytes(pack_index(entries))
            os.replace(tmp, self.path(segment, ".idx"))
        except OSError as exc:
            self._fault("index", exc)
            with contextlib.suppress(OSError):
                tmp.unlink()

    def scan(self) -> list[tuple[int, int, np.ndarray]]:
        """Every segment on disk, oldest first: ``(id, file bytes, entries)`` (see
        :func:`scan_directory`); also removes index files whose sealing a crash interrupted."""
        found, faults = scan_directory(self.directory, self.namespace)
        self.faults += faults
        for tmp in self.directory.glob("seg-*.idx.tmp"):
            with contextlib.suppress(OSError):
                tmp.unlink()
        return found

    # -- faults -------------------------------------------------------------------------------

    def _fault(self, what: str, exc: BaseException | None) -> None:
        self.faults += 1
        _RATE_LIMITED.warn(
            what, f"kvortex: disk tier {what} failed ({exc or 'invalid record'}); served as a miss"
        )


def scan_directory(
    directory: Path, namespace: bytes
) -> tuple[list[tuple[int, int, np.ndarray]], int]:
    """Read-only scan of a disk tier directory (no lock taken: the scheduler side of a
    connector reads what its workers write). Returns every segment, oldest first, as
    ``(id, file bytes, entries of this namespace)`` — from the index file when it is intact,
    else from the headers up to the first invalid one — and the number of faults met."""
    ids = []
    try:
        names = os.listdir(directory)
    except OSError:
        return [], 0
    for name in names:
        m = _SEGMENT_RE.match(name)
        if m:
            ids.append(int(m.group(1)))
    out, faults = [], 0
    ns = np.frombuffer(namespace, dtype="V16")[0]
    for segment in sorted(ids):
        path = directory / f"seg-{segment:012d}.kvx"
        try:
            size = path.stat().st_size
        except OSError:
            continue
        entries = _read_index(path.with_suffix(".idx"), size)
        if entries is None:
            entries, bad = _scan_headers(path, size)
            faults += bad
        out.append((segment, size, entries[entries["ns"] == ns]))
    return out, faults


def _read_index(path: Path, size: int) -> np.ndarray | None:
    try:
        raw = path.read_bytes()
    except OSError:
        return None
    entries = unpack_index(raw)
    if entries is None:
        return None
    if len(entries) and int((entries["offset"] + HEADER_BYTES + entries["payload"]).max()) > size:
        return None  # the segment was truncated after sealing: scan instead
    return entries


def _scan_headers(path: Path, size: int) -> tuple[np.ndarray, int]:
    rows = []
    try:
        with open(path, "rb", buffering=0) as f:
            offset = 0
            while offset + HEADER_BYTES <= size:
                f.seek(offset)
                header = unpack_header(f.read(HEADER_BYTES))
                if header is None:
                    break  # a torn tail: nothing after it was completed
                end = offset + record_bytes(header.payload)
                if end > size:
                    break
                rows.append((header.ns, header.key, offset, header.payload, header.seq))
                offset = end
    except OSError:
        return np.array(rows, dtype=ENTRY_DTYPE), 1
    return np.array(rows, dtype=ENTRY_DTYPE), 0


_RATE_LIMITED = RateLimitedLog()
