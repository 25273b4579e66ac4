"""The local disk tier (L2) of one process: an index, segment files, one I/O thread.

Placement is write-through: a chunk stored into host memory (L1) is also written to disk,
asynchronously, when the admission filter lets it (``disk_admission``); evicting it from L1
later costs nothing, and every admitted chunk survives a restart. (Measured against
write-back on the multi-tenant trace: docs/PERF.md.) A lookup counts L1 then L2, contiguous;
an L2 hit is read into L1 slots and then moved to the GPU like an L1 hit.

Threading: every public method may be called from any thread; bookkeeping runs under one lock
(:class:`~kvortex.tiers.disk_index.DiskIndex`), I/O on the tier's own thread in FIFO order
(:class:`~kvortex.tiers.segments.SegmentStore`), so a read queued after a write of the same
segment sees it, and a segment is deleted only after the reads queued before its eviction.
Completion callbacks run on the I/O thread.

Faults (ENOSPC, EIO, a deleted or truncated segment, a bad checksum) are misses: counted in
:attr:`DiskTier.faults`, logged at most once a minute per kind, never raised.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvortex.errors import ConfigError
from kvortex.tiers.disk_index import DiskIndex, Location, no_cycle_collection, segment_bytes_for
from kvortex.tiers.records import namespace_fingerprint, record_bytes
from kvortex.tiers.segments import DiskTierError, ReadJob, SegmentStore, WriteJob

__all__ = ["DiskTier", "DiskTierError", "probe"]

log = logging.getLogger("kvortex")

_MAX_SEGMENT_RECORDS = 256  # tests lower it to see segments fill, seal and go


@dataclass
class _Write:
    jobs: list[WriteJob]
    done: Callable[[list[bytes], list[bool]], None]


@dataclass
class _Read:
    jobs: list[ReadJob]
    done: Callable[[list[bool]], None]


@dataclass
class _Delete:
    segments: list[int]


class DiskTier:
    """L2 for chunks of ``payload_bytes`` bytes under one namespace.

    Args:
        path: the tier's directory (``disk_path``).
        capacity: bytes it may use (``disk_bytes``).
        namespace: the encoded namespace (:meth:`kvortex.keys.Namespace.encode`); records of
            other namespaces in the directory are ignored (and evicted with their segments).
        payload_bytes: bytes of one chunk.
        admission: ``"all"`` or ``"seen-twice"``.
        backend: I/O and CRC implementation.

    Raises:
        DiskTierError: the directory is unusable or used by another process.
        ConfigError: ``capacity`` cannot hold two segments of a few chunks.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        capacity: int,
        namespace: bytes,
        payload_bytes: int,
        *,
        admission: str = "all",
        backend: str | None = None,
    ) -> None:
        self.payload_bytes = payload_bytes
        self.record_bytes = record_bytes(payload_bytes)
        segment_bytes = segment_bytes_for(capacity, self.record_bytes, _MAX_SEGMENT_RECORDS)
        if capacity < 2 * segment_bytes:
            raise ConfigError(
                f"disk_bytes={capacity} cannot hold two segments of one {self.record_bytes}-byte "
                "record; give the disk tier more space"
            )
        self.store = SegmentStore(path, namespace_fingerprint(namespace), backend=backend)
        self.index = DiskIndex(capacity, segment_bytes, admission=admission)
        self._lock = threading.Lock()
        started = time.perf_counter()
        self.restored = self._rebuild()
        self.rebuild_seconds = time.perf_counter() - started
        self._jobs: queue.SimpleQueue[_Write | _Read | _Delete | None] = queue.SimpleQueue()
        self._idle = threading.Condition(self._lock)
        self._queued = 0
        self._closed = False
        self.written = self.read_chunks = self.write_failures = self.read_failures = 0
        self._thread = threading.Thread(target=self._run, name="kvortex-disk", daemon=True)
        self._thread.start()
        log.info(
            "kvortex: disk tier %s: %d chunks restored in %.3f s, %s I/O, %s",
            path,
            self.restored,
            self.rebuild_seconds,
            "O_DIRECT" if self.store.direct else "buffered",
            self.store._io.backend,
        )

    # -- queries ------------------------------------------------------------------------------

    def match(self, keys: Sequence[bytes]) -> int:
        """Chunks of ``keys`` stored on disk, contiguous from the first."""
        with self._lock:
            return self.index.match(keys)

    @property
    def faults(self) -> int:
        return self.store.faults

    def describe(self) -> dict[str, Any]:
        """What ``kvortex info`` and logs show about this tier."""
        with self._lock:
            used, chunks = self.index.used, len(self.index)
        return {
            "path": str(self.store.directory),
            "filesystem": _filesystem(self.store.directory),
            "direct_io": self.store.direct,
            "io_backend": self.store._io.backend,
            "capacity": self.index.capacity,
            "used": used,
            "chunks": chunks,
            "admission": self.index.admission,
            "restored_chunks": self.restored,
            "rebuild_seconds": self.rebuild_seconds,
            "faults": self.faults,
        }

    # -- writes and reads ---------------------------------------------------------------------

    def offer(
        self,
        chunks: Sequence[tuple[bytes, int]],
        done: Callable[[list[bytes], list[bool]], None],
    ) -> list[bytes]:
        """Write-through of stored chunks ``(key, address)``. Returns the keys admitted: their
        memory must stay unchanged until ``done(admitted keys, ok per key)`` runs (on the I/O
        thread, possibly before this returns)."""
        jobs, evicted = [], []
        with self._lock:
            if self._closed:
                return []
            for key, address in chunks:
                if not self.index.admit(key):
                    continue
                loc, gone = self.index.allocate(key, self.payload_bytes, self.record_bytes)
                evicted += gone
                jobs.append(WriteJob(loc.segment, loc.offset, key, address, loc.payload, loc.seq))
            if evicted:
                self._put(_Delete(evicted))
            if jobs:
                self._put(_Write(jobs, done))
        return [j.key for j in jobs]

    def fetch(
        self,
        keys: Sequence[bytes],
        addresses: Sequence[int],
        done: Callable[[list[bool]], None],
    ) -> None:
        """Read ``keys`` into ``addresses`` (room for the chunk rounded up to 4096 bytes each);
        ``done(ok per key)`` runs on the I/O thread. A key no longer on disk is a failure."""
        jobs, positions = [], []
        with self._lock:
            if not self._closed:
                for i, (key, address) in enumerate(zip(keys, addresses, strict=True)):
                    loc = self.index.location(key)
                    if loc is not None:
                        jobs.append(ReadJob(loc.segment, loc.offset, key, address, loc.payload))
                        positions.append(i)
            if jobs:
                self._put(_Read(jobs, _realign(len(keys), positions, done)))
                return
        done([False] * len(keys))

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until every queued job ran (tests, close)."""
        with self._idle:
            return self._idle.wait_for(lambda: self._queued == 0, timeout)

    def close(self) -> None:
        """Finish queued I/O, stop the thread, release the directory. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._jobs.put(None)
        self._thread.join()
        self.store.close()

    # -- internals ----------------------------------------------------------------------------

    def _put(self, job: _Write | _Read | _Delete) -> None:
        self._queued += 1  # under self._lock
        self._jobs.put(job)

    def _rebuild(self) -> int:
        # A million records allocate millions of small objects, none of them cyclic: without
        # this the cycle collector runs over the growing heap again and again (measured: 1M
        # records 2.8 s instead of under 1 s).
        with no_cycle_collection():
            return self._restore_all()

    def _restore_all(self) -> int:
        for segment, size, entries in self.store.scan():
            mine = entries[entries["payload"] == self.payload_bytes]
            raw = mine["key"].tobytes()  # one copy, then 32-byte slices: fast for 1M records
            keys = [raw[i : i + 32] for i in range(0, len(raw), 32)]
            self.index.restore(
                segment,
                size,
                keys,
                mine["offset"].tolist(),
                mine["payload"].tolist(),
                mine["seq"].tolist(),
            )
        for segment in self.index.evict_over_capacity():
            self.store.delete(segment)
        return len(self.index)

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                self._execute(job)
            except Exception as exc:  # never let the I/O thread die: the job's chunks are misses
                log.exception("kvortex: disk tier job failed: %s", exc)
            finally:
                with self._idle:
                    self._queued -= 1
                    self._idle.notify_all()

    def _execute(self, job: _Write | _Read | _Delete) -> None:
        if isinstance(job, _Delete):
            for segment in job.segments:
                self.store.delete(segment)
            return
        if isinstance(job, _Read):
            ok = self.store.read(job.jobs)
            with self._lock:
                for r, good in zip(job.jobs, ok, strict=True):
                    if not good:
                        self.index.drop(r.key)
                self.read_chunks += sum(ok)
                self.read_failures += len(ok) - sum(ok)
            job.done(ok)
            return
        ok = self.store.write(job.jobs)
        with self._lock:
            for j, good in zip(job.jobs, ok, strict=True):
                self.index.commit(j.key, Location(j.segment, j.offset, j.payload, j.seq), good)
            sealing = {s: self.index.entries(s) for s in self.index.seal_candidates()}
            self.written += sum(ok)
            self.write_failures += len(ok) - sum(ok)
        for segment, entries in sealing.items():
            self.store.seal(segment, _entry_array(self.store.namespace, entries))
        job.done([j.key for j in job.jobs], ok)


def probe(path: str | os.PathLike[str], capacity: int) -> dict[str, Any]:
    """What ``kvortex info`` shows about a configured disk tier, without opening it (no lock
    taken, nothing written but an O_DIRECT probe file in an existing, writable directory)."""
    directory = Path(path)
    report: dict[str, Any] = {"path": str(directory), "capacity": capacity}
    if not directory.is_dir():
        report.update(exists=False, filesystem=_filesystem(directory.parent), used=0, segments=0)
        return report
    segments = list(directory.glob("seg-*.kvx"))
    used = 0
    for seg in segments:
        try:
            used += seg.stat().st_size
        except OSError:
            continue
    report.update(exists=True, filesystem=_filesystem(directory), used=used, segments=len(segments))
    if os.access(directory, os.W_OK | os.X_OK):
        from kvortex import diskio

        report["direct_io"] = diskio.direct_io_supported(directory)
    else:
        report["direct_io"] = None
        report["problem"] = "not writable"
    return report


def _realign(
    count: int, positions: list[int], done: Callable[[list[bool]], None]
) -> Callable[[list[bool]], None]:
    def finish(ok: list[bool]) -> None:
        full = [False] * count
        for pos, good in zip(positions, ok, strict=True):
            full[pos] = good
        done(full)

    return finish


def _entry_array(namespace: bytes, entries: list[tuple[bytes, Location]]) -> Any:
    import numpy as np

    from kvortex.tiers.records import ENTRY_DTYPE

    rows = [(namespace, key, loc.offset, loc.payload, loc.seq) for key, loc in entries]
    return np.array(rows, dtype=ENTRY_DTYPE)


def _filesystem(path: Path) -> str:
    """The filesystem type of ``path`` from /proc/mounts (longest matching mount point)."""
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return "unknown"
    target = os.path.realpath(path)
    best, kind = "", "unknown"
    for line in mounts:
        parts = line.split()
        if len(parts) < 3 or len(parts[1]) <= len(best):
            continue
        if target == parts[1] or target.startswith(parts[1].rstrip("/") + "/"):
            best, kind = parts[1], parts[2]
    return kind
