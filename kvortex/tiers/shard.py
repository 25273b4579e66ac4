"""One worker's share of the disk tier under a serving engine: executes the scheduler's plan.

With tensor parallelism every worker keeps its own shard of each chunk in its own directory
(``<disk_path>/tp<rank>of<size>``), at the record location the scheduler side chose for all
ranks (:class:`~kvortex.tiers.disk_index.DiskIndex` lives there; this class keeps no index).
It only writes where it is told, reads and verifies what it is asked for, deletes and seals
segments when told.

Threading: the worker's step thread queues jobs; one I/O thread runs them in FIFO order, so a
read planned after a write of the same record sees it, and a segment is deleted only after the
reads queued before. A write reads a host slot: :meth:`wait_slot` blocks until no queued write
still reads that slot (the worker calls it before copying new data into a slot). Completion
callbacks run on the I/O thread.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from kvortex.plan import DiskLocation, SegmentSeal
from kvortex.tiers.records import ENTRY_DTYPE
from kvortex.tiers.segments import ReadJob, SegmentStore, WriteJob

__all__ = ["DiskShard", "shard_directory"]

log = logging.getLogger("kvortex")


def shard_directory(disk_path: str | os.PathLike[str], rank: int, size: int) -> Path:
    """Where tensor-parallel rank ``rank`` of ``size`` keeps its shard of the disk tier."""
    return Path(disk_path) / f"tp{rank}of{size}"


@dataclass
class _Job:
    kind: str  # "write", "read", "delete", "seal"
    writes: Sequence[WriteJob] = ()
    reads: Sequence[ReadJob] = ()
    segments: Sequence[int] = ()
    seal: SegmentSeal | None = None
    slots: Sequence[int] = ()
    done: Callable[[list[bool]], None] | None = None


class DiskShard:
    """This worker's segment files and I/O thread.

    Args:
        directory: this rank's directory.
        namespace: this rank's namespace fingerprint (written into and checked in headers).
        backend: I/O and CRC implementation.
    """

    def __init__(
        self, directory: str | os.PathLike[str], namespace: bytes, *, backend: str | None = None
    ) -> None:
        self.store = SegmentStore(directory, namespace, backend=backend)
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._cond = threading.Condition()
        self._slot_writes: dict[int, int] = {}  # slot -> queued writes still reading it
        self._deleted: set[int] = set()
        self._queued = 0
        self._thread = threading.Thread(target=self._run, name="kvortex-disk", daemon=True)
        self._thread.start()

    def write(
        self,
        chunks: Sequence[tuple[bytes, int, int, DiskLocation]],
        done: Callable[[list[bool]], None] | None = None,
    ) -> None:
        """Queue writes of ``(key, slot, slot address, location)``."""
        if not chunks:
            return
        jobs = [
            WriteJob(loc.segment, loc.offset, k, a, loc.payload, loc.seq) for k, _, a, loc in chunks
        ]
        slots = [s for _, s, _, _ in chunks]
        with self._cond:
            for s in slots:
                self._slot_writes[s] = self._slot_writes.get(s, 0) + 1
        self._put(_Job("write", writes=jobs, slots=slots, done=done))

    def read(
        self,
        chunks: Sequence[tuple[bytes, int, DiskLocation]],
        done: Callable[[list[bool]], None],
    ) -> None:
        """Queue reads of ``(key, slot address, location)``; ``done(ok per chunk)``."""
        jobs = [ReadJob(loc.segment, loc.offset, k, a, loc.payload) for k, a, loc in chunks]
        self._put(_Job("read", reads=jobs, done=done))

    def delete(self, segments: Sequence[int]) -> None:
        if segments:
            self._put(_Job("delete", segments=list(segments)))

    def seal(self, seal: SegmentSeal) -> None:
        self._put(_Job("seal", seal=seal))

    def wait_slot(self, slot: int, timeout: float | None = 30.0) -> bool:
        """Block until no queued write reads ``slot`` (before new data is copied into it)."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._slot_writes.get(slot), timeout)

    def wait_idle(self, timeout: float | None = 30.0) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._queued == 0, timeout)

    @property
    def faults(self) -> int:
        return self.store.faults

    def close(self) -> None:
        """Finish queued jobs, stop the thread, release the directory. Idempotent."""
        if self._thread.is_alive():
            self._jobs.put(None)
            self._thread.join()
            self.store.close()

    # -- internals ----------------------------------------------------------------------------

    def _put(self, job: _Job) -> None:
        with self._cond:
            self._queued += 1
        self._jobs.put(job)

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            ok: list[bool] = []
            try:
                ok = self._execute(job)
            except Exception as exc:  # the I/O thread never dies; the job's chunks are misses
                log.exception("kvortex: disk tier job failed: %s", exc)
                ok = [False] * max(len(job.writes), len(job.reads))
            finally:
                with self._cond:
                    for s in job.slots:
                        self._slot_writes[s] -= 1
                        if not self._slot_writes[s]:
                            del self._slot_writes[s]
                    self._queued -= 1
                    self._cond.notify_all()
            if job.done is not None:
                try:
                    job.done(ok)
                except Exception as exc:
                    log.exception("kvortex: disk completion failed: %s", exc)

    def _execute(self, job: _Job) -> list[bool]:
        if job.kind == "delete":
            for segment in job.segments:
                self._deleted.add(segment)
                self.store.delete(segment)
            return []
        if job.kind == "seal":
            assert job.seal is not None
            s = job.seal
            if s.segment not in self._deleted:
                rows = [
                    (self.store.namespace, k, o, s.payload, q)
                    for k, o, q in zip(s.keys, s.offsets, s.seqs, strict=True)
                ]
                import numpy as np

                self.store.seal(s.segment, np.array(rows, dtype=ENTRY_DTYPE))
            return []
        if job.kind == "read":
            return self.store.read(job.reads)
        # A write into a segment deleted meanwhile would bring the file back: skip it.
        live = [w for w in job.writes if w.segment not in self._deleted]
        done = iter(self.store.write(live))
        return [next(done) if w.segment not in self._deleted else False for w in job.writes]
