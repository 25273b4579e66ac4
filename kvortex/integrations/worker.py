"""The worker half of a serving-engine connector: executes the scheduler's plans.

One per GPU worker. Owns the host pool (every slot handed out at start: the scheduler side
allocates slot ids), the engine's layout and the :class:`~kvortex.transfer.Mover`. Imports no
serving engine.

Trust, but verify: the worker remembers which key each slot holds, set only when a store into
it completed. A load from a slot that does not hold the planned key (a failed store, a
scheduler and worker that disagree) is not performed; its blocks are reported as load errors
so the engine recomputes them. Wrong bytes are never delivered.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kvortex.config import KVortexConfig
from kvortex.errors import (
    ConfigError,
    EngineClosedError,
    InvalidArgumentError,
    KVortexError,
    LayoutError,
)
from kvortex.layout import PagedLayout
from kvortex.memory import HostSlabPool
from kvortex.plan import ChunkOp, DiskPlan, RequestOps, TransferPlan
from kvortex.tiers.records import namespace_fingerprint
from kvortex.tiers.shard import DiskShard, shard_directory
from kvortex.transfer import Mover, TransferHandle, resolve_path

if TYPE_CHECKING:
    import torch

    from kvortex.tiers.redis import RemoteTier

__all__ = ["WorkerSide"]

log = logging.getLogger("kvortex")


@dataclass
class _InFlight:
    handle: TransferHandle | None  # None: nothing was copied (every chunk refused)
    ops: RequestOps
    slots_keys: list[tuple[int, bytes]] = field(default_factory=list)
    # A load whose chunks come (partly) from disk: reads first, the GPU copy after them.
    disk_reads: tuple[ChunkOp, ...] = ()
    disk_ok: list[bool] | None = None  # set by the disk tier's I/O thread


class WorkerSide:
    """Plan execution on one worker.

    Args:
        config: the validated configuration (same as the scheduler side's).
        block_size: tokens per engine block.
        expected_chunk_bytes: what the scheduler side sized its slots for; checked against the
            registered layout (None: not checked).
        rank: this worker's tensor-parallel rank (for logs; every rank runs the same plan on
            its own shard).
    """

    def __init__(
        self,
        config: KVortexConfig,
        block_size: int,
        *,
        expected_chunk_bytes: int | None = None,
        rank: int = 0,
        transfer_path: str = "auto",
    ) -> None:
        self.config = config
        self.block_size = block_size
        self.blocks_per_chunk = config.chunk_tokens // block_size
        self.expected_chunk_bytes = expected_chunk_bytes
        self.rank = rank
        self.transfer_path = transfer_path
        self.layout: PagedLayout | None = None
        self.pool: HostSlabPool | None = None
        self.mover: Mover | None = None
        self._slot_keys: dict[int, bytes] = {}
        self._stores: dict[str, _InFlight] = {}
        self._loads: dict[str, _InFlight] = {}
        self._sync_pending: list[TransferHandle] = []
        self._release_after_load: set[str] = set()
        self._load_errors: set[int] = set()
        self._closed = False
        self.disk: DiskShard | None = None
        self.remote: RemoteTier | None = None
        self._tiers_opened = False
        # Host slots that a shared-tier write still reads (the disk shard tracks its own).
        self._remote_readers: dict[int, int] = {}
        self._remote_cond = threading.Condition()

    def register(self, kv_caches: Mapping[str, torch.Tensor]) -> None:
        """Adopt the engine's KV tensors; build the layout, the pool and the mover.

        Everything is checked before anything is built; a failure leaves nothing behind."""
        if self._closed:
            raise EngineClosedError("this connector worker is closed")
        if self.mover is not None:
            raise InvalidArgumentError("register_kv_caches was already called on this worker")
        layout = PagedLayout.from_kv_caches(kv_caches, self.block_size)
        chunk_bytes = layout.chunk_bytes(self.blocks_per_chunk)
        if self.expected_chunk_bytes is not None and chunk_bytes != self.expected_chunk_bytes:
            raise LayoutError(
                f"the KV tensors hold {chunk_bytes} bytes per chunk ({layout.kind}), but the "
                f"scheduler planned {self.expected_chunk_bytes}: the host tier would be "
                "sized wrongly on one side"
            )
        num_slots = self.config.cpu_bytes // chunk_bytes
        if num_slots < 1:
            raise ConfigError(
                f"cpu_bytes={self.config.cpu_bytes} cannot hold one chunk of {chunk_bytes} bytes"
            )
        path = resolve_path(self.transfer_path, self.config.backend)
        pool = HostSlabPool.for_config(self.config, chunk_bytes, num_slots)
        try:
            # The scheduler side allocates slot ids; here every slot is in use from the start.
            for _ in range(num_slots):
                pool.alloc()
            self.mover = Mover(layout, pool, self.blocks_per_chunk, path=path)
        except BaseException:
            pool.close()
            raise
        self.pool, self.layout = pool, layout
        log.info(
            "kvortex worker %d: %s, %d host slots of %d bytes, %s copies",
            self.rank,
            layout.kind,
            num_slots,
            chunk_bytes,
            self.mover.path,
        )

    # -- per step -----------------------------------------------------------------------------

    def start(
        self,
        plan: TransferPlan,
        async_loads: Iterable[str] = (),
        release_after_load: Iterable[str] = (),
        disk: DiskPlan | None = None,
        rank_namespaces: tuple[bytes, ...] = (),
    ) -> None:
        """Launch this step's stores and loads (all asynchronous on the device) and queue its
        disk-tier work (``disk``; ``rank_namespaces``: every rank's encoded namespace, for the
        lower tiers' records)."""
        if self._closed:
            raise EngineClosedError("this connector worker is closed")
        if self.mover is None:
            if not plan.empty:
                raise KVortexError("a transfer plan arrived before register_kv_caches")
            return
        if rank_namespaces and not self._tiers_opened:
            self._open_tiers(rank_namespaces)
        if disk is not None and self.disk is not None and not disk.empty:
            self._start_disk(disk)
        self._release_after_load.update(release_after_load)
        asynchronous = set(async_loads)
        for ops in plan.stores:
            self._start_store(ops)
        for ops in plan.loads:
            if any(c.disk is not None or c.remote for c in ops.chunks):
                self._loads[ops.request_id] = self._start_disk_load(ops)
                continue
            flight = self._start_load(ops)
            if ops.request_id in asynchronous:
                self._loads[ops.request_id] = flight
            elif flight.handle is not None:
                self._sync_pending.append(flight.handle)

    def wait_sync_loads(self) -> None:
        """Order the engine's compute after this step's in-step loads (no host wait on GPU)."""
        pending, self._sync_pending = self._sync_pending, []
        for handle in pending:
            try:
                handle.wait_on_stream()
            except KVortexError as exc:  # pragma: no cover - device failure
                log.warning("kvortex: load failed: %s", exc)

    def poll(self) -> tuple[set[str] | None, set[str] | None]:
        """``(finished_sending, finished_recving)`` request ids, as vLLM's ``get_finished``."""
        sending: set[str] = set()
        recving: set[str] = set()
        for rid, flight in list(self._stores.items()):
            if self._settled(flight, store=True):
                del self._stores[rid]
                sending.add(rid)
        for rid, flight in list(self._loads.items()):
            if self._settled(flight, store=False):
                del self._loads[rid]
                if rid in self._release_after_load:
                    self._release_after_load.discard(rid)
                    sending.add(rid)
                else:
                    recving.add(rid)
        for rid in list(self._release_after_load):
            if rid not in self._loads:  # its load had settled before the release was planned
                self._release_after_load.discard(rid)
                sending.add(rid)
        return sending or None, recving or None

    def take_load_errors(self) -> set[int]:
        """Engine block ids whose load failed since the last call (the engine recomputes)."""
        errors, self._load_errors = self._load_errors, set()
        return errors

    def preempted(self, request_ids: Iterable[str]) -> None:
        """The engine took these requests' blocks back: let their transfers land first."""
        for rid in request_ids:
            for table in (self._stores, self._loads):
                flight = table.get(rid)
                if flight is not None and flight.handle is not None:
                    with contextlib.suppress(KVortexError):  # reported by poll()
                        flight.handle.wait()

    def close(self) -> None:
        """Let in-flight copies land, then free the host pool. Final and idempotent."""
        self._closed = True
        if self.remote is not None:
            self.remote.close()
        if self.disk is not None:
            self.disk.close()
        if self.mover is not None:
            self.mover.close()
        if self.pool is not None:
            self.pool.close()

    # -- internals ----------------------------------------------------------------------------

    def _open_tiers(self, namespaces: tuple[bytes, ...]) -> None:
        """Open this rank's disk shard and shared-tier client (at the first plan that names
        the ranks' namespaces). A shared tier that cannot be reached now only costs misses."""
        self._tiers_opened = True
        mine = namespaces[self.rank]
        if self.config.disk_path is not None:
            directory = shard_directory(self.config.disk_path, self.rank, len(namespaces))
            self.disk = DiskShard(
                directory, namespace_fingerprint(mine), backend=self.config.backend
            )
        if self.config.remote_url is not None:
            from kvortex.tiers.redis import RemoteTier

            try:
                self.remote = RemoteTier(
                    self.config.remote_url,
                    mine,
                    self._chunk_bytes(),
                    timeout_ms=self.config.remote_timeout_ms,
                    ttl_s=self.config.remote_ttl_s,
                    write=self.config.remote_write,
                    backend=self.config.backend,
                )
            except KVortexError as exc:
                log.warning("kvortex worker %d: shared tier unavailable: %s", self.rank, exc)

    def _chunk_bytes(self) -> int:
        assert self.layout is not None
        return self.layout.chunk_bytes(self.blocks_per_chunk)

    def _start_disk(self, plan: DiskPlan) -> None:
        """Queue segment deletions, writes of chunks held in host slots, and seals."""
        assert self.disk is not None and self.pool is not None
        self.disk.delete(plan.deletes)
        writes = [
            (c.key, c.slot, self.pool.address(c.slot), c.disk)
            for c in plan.writes
            if c.disk is not None and self._slot_keys.get(c.slot) == c.key
        ]
        self.disk.write(writes)
        for seal in plan.seals:
            self.disk.seal(seal)

    def _start_disk_load(self, ops: RequestOps) -> _InFlight:
        """Read the chunks that come from disk or the shared tier into their host slots;
        :meth:`poll` launches the GPU copy of the whole request once every read ended."""
        reads = tuple(c for c in ops.chunks if (c.disk is not None or c.remote) and c.slot >= 0)
        for c in ops.chunks:
            if (c.disk is not None or c.remote) and c.slot < 0:  # the scheduler found no slot
                self._load_errors.update(c.moved_block_ids)
        rest = tuple(c for c in ops.chunks if c.disk is None and not c.remote)
        flight = _InFlight(None, RequestOps(ops.request_id, rest), disk_reads=reads)
        assert self.pool is not None
        pool = self.pool
        for c in reads:
            self._slot_keys.pop(c.slot, None)  # being filled: trust it once the read checked
        from_disk = [i for i, c in enumerate(reads) if c.disk is not None]
        from_remote = [i for i, c in enumerate(reads) if c.disk is None]
        results: list[bool] = [False] * len(reads)
        parts = [p for p in (from_disk, from_remote) if p]
        remaining = [len(parts)]
        lock = threading.Lock()

        def part_done(positions: list[int], ok: list[bool]) -> None:
            for i, good in zip(positions, ok, strict=True):
                results[i] = good
            with lock:
                remaining[0] -= 1
                last = remaining[0] == 0
            if last:
                flight.disk_ok = results

        if not parts:
            flight.disk_ok = results
        if from_disk:
            if self.disk is None:
                part_done(from_disk, [False] * len(from_disk))
            else:
                jobs = []
                for i in from_disk:
                    loc = reads[i].disk
                    assert loc is not None
                    jobs.append((reads[i].key, pool.address(reads[i].slot), loc))
                self.disk.read(jobs, functools.partial(part_done, from_disk))
        if from_remote:
            if self.remote is None:
                part_done(from_remote, [False] * len(from_remote))
            else:
                self.remote.fetch(
                    [reads[i].key for i in from_remote],
                    [pool.address(reads[i].slot) for i in from_remote],
                    functools.partial(part_done, from_remote),
                )
        return flight

    def _after_disk_reads(self, flight: _InFlight) -> None:
        """The reads ended: trust what checked out, report the rest, launch the GPU copy."""
        assert flight.disk_ok is not None
        good = []
        for c, ok in zip(flight.disk_reads, flight.disk_ok, strict=True):
            if ok:
                self._slot_keys[c.slot] = c.key
                good.append(ChunkOp(c.key, c.slot, c.block_ids, c.skip_pages))
            else:
                self._load_errors.update(c.moved_block_ids)
        ops = RequestOps(flight.ops.request_id, flight.ops.chunks + tuple(good))
        launched = self._start_load(ops)
        flight.handle, flight.ops, flight.disk_reads = launched.handle, launched.ops, ()

    def _start_store(self, ops: RequestOps) -> None:
        assert self.mover is not None
        slots_keys = [(c.slot, c.key) for c in ops.chunks]
        for slot, _ in slots_keys:
            self._slot_keys.pop(slot, None)  # being rewritten: holds nothing trustworthy
            if self.disk is not None and not self.disk.wait_slot(slot):
                log.warning("kvortex: a disk write still reads host slot %d; overwriting", slot)
            if not self._wait_remote_slot(slot):
                log.warning("kvortex: a shared-tier write still reads host slot %d", slot)
        handle = None
        try:
            handle = self.mover.store(ops.block_ids, ops.slots)
        except KVortexError as exc:
            log.warning("kvortex: store of %s failed: %s", ops.request_id, exc)
        self._stores[ops.request_id] = _InFlight(handle, ops, slots_keys)

    def _wait_remote_slot(self, slot: int, timeout: float = 30.0) -> bool:
        with self._remote_cond:
            return self._remote_cond.wait_for(lambda: not self._remote_readers.get(slot), timeout)

    def _write_through(self, ops: RequestOps) -> None:
        """Queue the disk writes planned with a store, now that its copy landed (before the
        store is reported finished, so reads planned after that run after these writes)."""
        if self.pool is None:
            return
        pool = self.pool
        if self.disk is not None:
            self.disk.write(
                [(c.key, c.slot, pool.address(c.slot), c.disk) for c in ops.chunks if c.disk]
            )
        if self.remote is not None:
            slot_of = {c.key: c.slot for c in ops.chunks}

            def written(keys: list[bytes], ok: list[bool]) -> None:
                with self._remote_cond:
                    for key in keys:
                        slot = slot_of[key]
                        self._remote_readers[slot] -= 1
                        if not self._remote_readers[slot]:
                            del self._remote_readers[slot]
                    self._remote_cond.notify_all()

            with self._remote_cond:  # count first: the write may end before offer returns
                for c in ops.chunks:
                    self._remote_readers[c.slot] = self._remote_readers.get(c.slot, 0) + 1
            accepted = set(
                self.remote.offer([(c.key, pool.address(c.slot)) for c in ops.chunks], written)
            )
            with self._remote_cond:
                for c in ops.chunks:
                    if c.key not in accepted:
                        self._remote_readers[c.slot] -= 1
                        if not self._remote_readers[c.slot]:
                            del self._remote_readers[c.slot]
                self._remote_cond.notify_all()

    def _start_load(self, ops: RequestOps) -> _InFlight:
        assert self.mover is not None
        good = [c for c in ops.chunks if self._slot_keys.get(c.slot) == c.key]
        for c in ops.chunks:
            if self._slot_keys.get(c.slot) != c.key:
                self._load_errors.update(c.moved_block_ids)
        if len(good) < len(ops.chunks):
            log.warning(
                "kvortex: %s: %d of %d chunks are not in this worker's host tier; the engine "
                "will recompute them",
                ops.request_id,
                len(ops.chunks) - len(good),
                len(ops.chunks),
            )
        handle = None
        todo = RequestOps(ops.request_id, tuple(good))
        if good:
            try:
                handle = self.mover.load(todo.slots, todo.block_ids, skip=todo.skip)
            except KVortexError as exc:
                log.warning("kvortex: load of %s failed: %s", ops.request_id, exc)
                self._load_errors.update(b for c in good for b in c.moved_block_ids)
        return _InFlight(handle, todo)

    def _settled(self, flight: _InFlight, *, store: bool) -> bool:
        """True once the transfer ended; records its outcome."""
        if flight.disk_reads:
            if flight.disk_ok is None:
                return False  # still reading from disk
            self._after_disk_reads(flight)
        if flight.handle is not None:
            try:
                if not flight.handle.done():
                    return False
                ok = True
            except KVortexError as exc:
                log.warning("kvortex: %s failed: %s", "store" if store else "load", exc)
                ok = False
        else:
            ok = not store  # a store that never started stored nothing
        if store and ok and flight.handle is not None:
            self._slot_keys.update(flight.slots_keys)
            self._write_through(flight.ops)
        if not store and not ok:
            self._load_errors.update(b for c in flight.ops.chunks for b in c.moved_block_ids)
        return True
