"""``KVortexEngine``: the Directory, a host pool and the Mover in one process.

For users outside vLLM (and for tests): hand it the engine's KV tensors once, then ask how much
of a prompt is stored (``lookup``), copy a prompt's KV out (``store``) and back into other
blocks (``retrieve``). Copies run on a mover thread fed through an :class:`SPSCQueue`; store and
retrieve return handles at once.

Thread safety: every public method may be called from any thread. Directory bookkeeping runs
under one lock; copies run on the mover thread.

Input is checked at the call, before anything is reserved, evicted or queued: a bad token
list or block id raises a typed error and leaves the stored state as it was. ``close()`` is
final: every later call raises :class:`EngineClosedError`.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from kvortex.config import KVortexConfig
from kvortex.directory import Directory
from kvortex.errors import (
    EngineClosedError,
    InvalidArgumentError,
    KVortexError,
    NotRegisteredError,
    QueueClosed,
    TransferError,
    TransferTimeout,
)
from kvortex.hashing import hash_chunks
from kvortex.keys import Namespace
from kvortex.layout import PagedLayout
from kvortex.memory import HostSlabPool
from kvortex.queue import SPSCQueue
from kvortex.stats import ActivityLog
from kvortex.tiers.disk import DiskTier

if TYPE_CHECKING:
    from kvortex.tiers.redis import RemoteTier

    Tier = DiskTier | RemoteTier
from kvortex.transfer import Mover, resolve_path

if TYPE_CHECKING:
    import torch

__all__ = ["KVortexEngine", "RetrieveHandle", "StoreHandle"]

log = logging.getLogger("kvortex")


class _Handle:
    """Completion shared by store and retrieve handles."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._error: BaseException | None = None

    def done(self) -> bool:
        """True once the copy finished (or failed)."""
        return self._event.is_set()

    def wait(self, timeout: float | None = None) -> None:
        """Block until done; raise :class:`TransferError` if the copy failed and
        :class:`TransferTimeout` (also a ``TimeoutError``) if ``timeout`` seconds passed
        first (the copy goes on; wait again)."""
        if not self._event.wait(timeout):
            raise TransferTimeout(f"transfer not finished after {timeout} s")
        if self._error is not None:
            raise TransferError(f"transfer failed: {self._error}") from self._error

    def _finish(self, error: BaseException | None = None) -> None:
        self._error = error
        self._event.set()


class StoreHandle(_Handle):
    """A store in flight.

    Attributes:
        stored_tokens: tokens whose chunks this store copies.
        skipped_tokens: leading tokens already stored (no copy).
        truncated: True when the host tier could not take every chunk; the first chunks were
            stored and the rest dropped (never an exception mid-serving).
    """

    def __init__(self, stored_tokens: int, skipped_tokens: int, truncated: bool) -> None:
        super().__init__()
        self.stored_tokens = stored_tokens
        self.skipped_tokens = skipped_tokens
        self.truncated = truncated


class RetrieveHandle(_Handle):
    """A retrieve in flight. ``tokens``: how many leading tokens it loads; with a disk tier
    it can shrink before the handle is done (a chunk that failed to read back ends the
    prefix), so read it after :meth:`wait`."""

    def __init__(self, tokens: int) -> None:
        super().__init__()
        self.tokens = tokens


class _Job:
    __slots__ = ("after", "block_ids", "handle", "keys", "slots", "to_host")

    def __init__(
        self,
        to_host: bool,
        keys: list[bytes],
        slots: list[int],
        block_ids: list[int],
        handle: _Handle,
        after: Any,
    ) -> None:
        self.to_host = to_host
        self.keys = keys
        self.slots = slots
        self.block_ids = block_ids
        self.handle = handle
        self.after = after


class KVortexEngine:
    """Standalone KV-cache engine: host tier, prefix index, asynchronous copies.

    Args:
        config: a :class:`KVortexConfig`, a mapping of its keys, or None for the defaults.
        model: names the model (and whatever else changes its KV); part of every chunk key.
        transfer_path: the Mover's path (``"auto"``, ``"dma"``, ``"kernel"``, ``"torch"``).
    """

    def __init__(
        self,
        config: KVortexConfig | Mapping[str, Any] | None = None,
        *,
        model: str = "default",
        transfer_path: str = "auto",
    ) -> None:
        self.config = (
            config if isinstance(config, KVortexConfig) else KVortexConfig.from_dict(config)
        )
        if not isinstance(model, str) or not model.strip():
            raise InvalidArgumentError(f"model must be a non-empty string, got {model!r}")
        self.model = model
        self._transfer_path = resolve_path(transfer_path, self.config.backend)
        self._lock = threading.Lock()
        self._submit_lock = threading.Lock()  # the queue has one producer: whoever holds this
        self._closed = False
        self.layout: PagedLayout | None = None
        self.namespace: Namespace | None = None
        self.directory: Directory | None = None
        self.pool: HostSlabPool | None = None
        self.mover: Mover | None = None
        self.disk: DiskTier | None = None
        self.remote: RemoteTier | None = None
        self.tiers: list[Tier] = []  # below the host tier, in lookup order
        self._queue: SPSCQueue[_Job | None] | None = None
        self._thread: threading.Thread | None = None
        self._activity = ActivityLog(self.config.log_interval_s)
        self._evictions_seen = 0

    # -- set-up -------------------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: Mapping[str, torch.Tensor], block_size: int) -> None:
        """Adopt the engine's KV tensors (layer name -> tensor, in layer order) once.

        Everything is checked before anything is built; a failed call leaves the engine
        unregistered (and holding nothing), ready for a corrected call.
        """
        with self._submit_lock:
            self._check_open()
            if self.layout is not None:
                raise InvalidArgumentError("register_kv_caches was already called on this engine")
            if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
                raise InvalidArgumentError(f"block_size must be a positive int, got {block_size!r}")
            chunk = self.config.chunk_tokens
            if chunk % block_size:
                raise InvalidArgumentError(
                    f"chunk_tokens={chunk} is not a multiple of the engine's block size "
                    f"{block_size}"
                )
            layout = PagedLayout.from_kv_caches(kv_caches, block_size)
            bpc = chunk // block_size
            chunk_bytes = layout.chunk_bytes(bpc)
            num_slots = self.config.cpu_bytes // chunk_bytes
            if num_slots < 1:
                raise InvalidArgumentError(
                    f"cpu_bytes={self.config.cpu_bytes} cannot hold one chunk of {chunk_bytes} "
                    f"bytes ({layout.kind}, {chunk} tokens)"
                )
            Mover.check_path(layout, self._transfer_path)
            self._build(layout, bpc, chunk_bytes, num_slots)
        log.info(
            "kvortex: %s, %d host slots of %d bytes, %s copies",
            layout.kind,
            num_slots,
            chunk_bytes,
            self.mover.path if self.mover is not None else "?",
        )

    def _build(self, layout: PagedLayout, bpc: int, chunk_bytes: int, num_slots: int) -> None:
        """Build pool, mover, queue and thread; on any failure release what was built."""
        pool = mover = disk = remote = None
        try:
            pool = HostSlabPool.for_config(self.config, chunk_bytes, num_slots)
            mover = Mover(layout, pool, bpc, path=self._transfer_path)
            queue: SPSCQueue[_Job | None] = SPSCQueue(1024, backend=self.config.backend)
            directory = Directory(num_slots, eviction=self.config.eviction, allocator=pool)
            namespace = Namespace(
                self.model, layout.fingerprint, layout.dtype, tenant_salt=self.config.tenant_salt
            )
            if self.config.disk_path is not None:
                disk = DiskTier(
                    self.config.disk_path,
                    self.config.disk_bytes,
                    namespace.encode(),
                    chunk_bytes,
                    admission=self.config.disk_admission,
                    backend=self.config.backend,
                )
            if self.config.remote_url is not None:
                from kvortex.tiers.redis import RemoteTier  # only shared-tier users need redis

                remote = RemoteTier(
                    self.config.remote_url,
                    namespace.encode(),
                    chunk_bytes,
                    timeout_ms=self.config.remote_timeout_ms,
                    ttl_s=self.config.remote_ttl_s,
                    write=self.config.remote_write,
                    backend=self.config.backend,
                )
            thread = threading.Thread(target=self._run, name="kvortex-mover", daemon=True)
        except BaseException:
            if remote is not None:
                remote.close()
            if disk is not None:
                disk.close()
            if mover is not None:
                mover.close()
            if pool is not None:
                pool.close()
            raise
        self.disk, self.remote = disk, remote
        self.tiers = [t for t in (disk, remote) if t is not None]
        self.pool, self.mover, self._queue = pool, mover, queue
        self.directory, self.namespace, self.layout = directory, namespace, layout
        self._thread = thread
        thread.start()

    # -- the three operations -----------------------------------------------------------------

    def lookup(self, tokens: Sequence[int] | Any) -> int:
        """Tokens of ``tokens`` that :meth:`retrieve` can load now (a multiple of the chunk
        size). Before registration nothing is stored: 0."""
        self._check_open()
        if self.directory is None or self.namespace is None:
            hash_chunks(tokens, self.config.chunk_tokens, backend=self.config.backend)  # checks
            return 0
        keys = self._keys(tokens)
        with self._lock:
            n = self.directory.match(keys)
        for tier in self.tiers:
            if n < len(keys):
                n += tier.match(keys[n:])
        hit = n * self.config.chunk_tokens
        with self._lock:
            self._activity.lookup(len(keys) * self.config.chunk_tokens, hit)
            self._tick()
        return hit

    def store(self, tokens: Sequence[int] | Any, block_ids: Sequence[int] | Any) -> StoreHandle:
        """Copy the KV of ``tokens``'s full chunks out of ``block_ids``.

        ``block_ids``: the engine blocks holding the tokens, in order, exactly
        ``ceil(len(tokens) / block_size)`` of them, each in ``[0, num_blocks)``. Chunks already
        stored cost no copy; the trailing partial chunk is not stored.
        """
        directory = self._registered()
        keys = self._keys(tokens)
        ids = self._block_ids(tokens, block_ids, unique=False)
        chunk = self.config.chunk_tokens
        with self._lock:
            r = directory.reserve_store(keys)
        handle = StoreHandle(len(r.chunks) * chunk, r.already_stored * chunk, r.truncated)
        if r.truncated:
            log.info("kvortex: host tier full: storing %d of %d chunks", len(r.chunks), len(keys))
        if not r.chunks:
            handle._finish()
            return handle
        reserved = [k for _, k, _ in r.chunks]
        try:
            bpc = chunk // self._block_size()
            job_ids = [b for i, _, _ in r.chunks for b in ids[i * bpc : (i + 1) * bpc]]
            self._submit(
                _Job(
                    True,
                    reserved,
                    [s for _, _, s in r.chunks],
                    job_ids,
                    handle,
                    self._after(),
                )
            )
        except BaseException:
            with self._lock:  # a reservation that will never be copied must not linger
                directory.commit_store(reserved, ok=False)
            raise
        return handle

    def retrieve(
        self, tokens: Sequence[int] | Any, block_ids: Sequence[int] | Any
    ) -> RetrieveHandle:
        """Load the longest stored prefix of ``tokens`` into ``block_ids`` (the blocks that
        will hold the tokens, in order; as many as :meth:`store` takes, all different).
        ``handle.tokens`` says how many tokens it loads."""
        directory = self._registered()
        keys = self._keys(tokens)
        ids = self._block_ids(tokens, block_ids, unique=True)
        with self._lock:
            n = directory.match(keys)
            slots = directory.pin_for_load(keys[:n])
        promote: list[tuple[int, bytes, int]] = []
        sources: list[tuple[Tier, int]] = []  # (tier, chunks from it), after the host tier
        end = n
        for tier in self.tiers:
            if end < len(keys):
                found = tier.match(keys[end:])
                if found:
                    sources.append((tier, found))
                    end += found
        if end > n:
            with self._lock:  # L1 slots for the lower tiers' part; the chain is protected
                promote = list(directory.reserve_store(keys[:end]).chunks)
        handle = RetrieveHandle((n + len(promote)) * self.config.chunk_tokens)
        job = _Job(False, keys[:n], slots, ids, handle, self._after() if n or promote else None)
        if promote:
            self._fetch_then_load(job, promote, sources)
        elif n == 0:
            handle._finish()
        else:
            self._load(job)
        return handle

    def _load(self, job: _Job) -> None:
        """Queue the GPU load of ``job`` (its chunks pinned in L1), or finish it if empty."""
        bpc = self.config.chunk_tokens // self._block_size()
        job.block_ids = job.block_ids[: len(job.keys) * bpc]
        if not job.keys:
            job.handle._finish()
            return
        try:
            self._submit(job)
        except BaseException:
            with self._lock:
                assert self.directory is not None
                self.directory.unpin(job.keys)
            raise

    def _fetch_then_load(
        self,
        job: _Job,
        promote: list[tuple[int, bytes, int]],
        sources: list[tuple[Tier, int]],
    ) -> None:
        """Read lower-tier chunks into their reserved L1 slots, then load everything to the
        GPU. The loaded prefix ends at the first chunk that failed to read back (a miss)."""
        assert self.pool is not None
        keys = [k for _, k, _ in promote]
        addrs = [self.pool.address(slot) for _, _, slot in promote]
        ok: list[bool] = [False] * len(keys)
        # Which tier holds each promoted chunk, from the key ranges the tiers matched.
        start = len(job.keys)
        ranges: list[tuple[Tier, int, int]] = []
        for tier, count in sources:
            ranges.append((tier, start, start + count))
            start += count
        groups: dict[int, list[int]] = {}
        for pos, (index, _, _) in enumerate(promote):
            for t, (_, lo, hi) in enumerate(ranges):
                if lo <= index < hi:
                    groups.setdefault(t, []).append(pos)
        remaining = [len(groups)]
        lock = threading.Lock()

        def finish() -> None:
            # Only a prefix contiguous with the host tier's part may load: chunk n + j must be
            # promote[j] (reserve_store skips chunks already in host memory) and have read back.
            first = len(job.keys)
            good = 0
            while good < len(promote) and promote[good][0] == first + good and ok[good]:
                good += 1
            assert self.directory is not None
            with self._lock:
                self.directory.commit_store(keys[:good], ok=True)
                self.directory.commit_store(keys[good:], ok=False)
                job.slots += self.directory.pin_for_load(keys[:good])
                job.keys += keys[:good]
            job.handle.tokens = len(job.keys) * self.config.chunk_tokens  # type: ignore[attr-defined]
            try:
                self._load(job)
            except KVortexError as exc:  # closed meanwhile
                job.handle._finish(exc)

        def part_done(positions: list[int], results: list[bool]) -> None:
            for pos, good in zip(positions, results, strict=True):
                ok[pos] = good
            with lock:
                remaining[0] -= 1
                last = remaining[0] == 0
            if last:
                finish()

        if not groups:
            finish()
        for t, positions in groups.items():
            tier = ranges[t][0]
            tier.fetch(
                [keys[p] for p in positions],
                [addrs[p] for p in positions],
                functools.partial(part_done, positions),
            )

    # -- shutdown -----------------------------------------------------------------------------

    def close(self) -> None:
        """Finish queued transfers, stop the mover thread and free the host pool.

        Final and idempotent: afterwards every call raises :class:`EngineClosedError`."""
        with self._submit_lock:
            if self._closed:
                return
            self._closed = True
            if self._queue is not None:
                self._queue.close()
        if self._thread is not None:
            self._thread.join()
        for tier in self.tiers:
            tier.close()
        if self.mover is not None:
            self.mover.close()
        if self.pool is not None:
            self.pool.close()

    def __enter__(self) -> KVortexEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ----------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise EngineClosedError("this engine is closed; create a new KVortexEngine")

    def _registered(self) -> Directory:
        self._check_open()
        if self.directory is None:
            raise NotRegisteredError("call register_kv_caches before store or retrieve")
        return self.directory

    def _block_size(self) -> int:
        assert self.layout is not None
        return self.layout.block_size

    def _keys(self, tokens: Sequence[int] | Any) -> list[bytes]:
        assert self.namespace is not None
        return self.namespace.chunk_keys(
            tokens, self.config.chunk_tokens, backend=self.config.backend
        )

    def _block_ids(
        self, tokens: Sequence[int] | Any, block_ids: Sequence[int] | Any, *, unique: bool
    ) -> list[int]:
        """``block_ids`` checked: real blocks, exactly as many as the tokens fill."""
        assert self.layout is not None
        ids = self.layout.block_id_array(block_ids, unique=unique)
        needed = -(-len(tokens) // self._block_size())
        if len(ids) != needed:
            raise InvalidArgumentError(
                f"{len(tokens)} tokens fill {needed} blocks of {self._block_size()} tokens; "
                f"got {len(ids)} block ids"
            )
        return ids.tolist()  # type: ignore[no-any-return]

    def _tick(self) -> None:
        """Count new evictions and log the interval's line when it is due (under _lock)."""
        assert self.directory is not None
        evictions = self.directory.evictions
        self._activity.evicted(evictions - self._evictions_seen)
        self._evictions_seen = evictions
        self._activity.tick()

    def _after(self) -> Any:
        """An event on the caller's current CUDA stream, so copies follow its queued work."""
        assert self.layout is not None
        if not self.layout.device.startswith("cuda"):
            return None
        import torch

        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(torch.device(self.layout.device)))
        return event

    def _submit(self, job: _Job) -> None:
        assert self._queue is not None
        with self._submit_lock:
            if self._closed:
                self._abandon(job, EngineClosedError("this engine is closed"))
                raise EngineClosedError("this engine is closed; create a new KVortexEngine")
            self._queue.put(job)

    def _run(self) -> None:
        """The mover thread: execute jobs in order; every outcome reaches the Directory."""
        assert self._queue is not None and self.mover is not None
        while True:
            try:
                job = self._queue.get()
            except QueueClosed:
                return
            if job is None:
                continue
            try:
                if job.to_host:
                    handle = self.mover.store(job.block_ids, job.slots, after=job.after)
                else:
                    handle = self.mover.load(job.slots, job.block_ids, after=job.after)
                handle.wait()
            except Exception as exc:  # every failure is a miss, never a crash of this thread
                log.warning(
                    "kvortex: %s of %d chunks failed: %s",
                    "store" if job.to_host else "load",
                    len(job.slots),
                    exc,
                )
                self._abandon(job, exc)
                continue
            self._complete(job, None)

    def _complete(self, job: _Job, error: BaseException | None) -> None:
        assert self.directory is not None and self.mover is not None
        with self._lock:
            if job.to_host:
                self.directory.commit_store(job.keys, ok=error is None)
            else:
                self.directory.unpin(job.keys)
            if error is None:
                nbytes = len(job.slots) * self.mover.chunk_bytes
                self._activity.moved(**{"stored" if job.to_host else "loaded": nbytes})
            self._tick()
        if error is None and self.tiers:
            # Stored chunks, and hits too: under "seen-twice" admission a chunk that stays hot
            # in L1 is stored only once, so its second use is what admits it to disk.
            self._write_through(job)
        job.handle._finish(error)

    def _write_through(self, job: _Job) -> None:
        """Offer a job's chunks (just stored, or just loaded from L1) to the lower tiers; each
        chunk a tier accepts stays pinned in L1 until that tier's write ended (its slot must
        not be reused while the write reads it)."""
        assert self.pool is not None and self.directory is not None
        with self._lock:
            ready = [
                (k, s) for k, s in zip(job.keys, job.slots, strict=True) if k in self.directory
            ]
        chunks = [(k, self.pool.address(s)) for k, s in ready]
        for tier in self.tiers:
            keys = [k for k, _ in ready]
            with self._lock:
                self.directory.pin_for_load(keys)

            def written(done: list[bytes], ok: list[bool]) -> None:
                with self._lock:
                    assert self.directory is not None
                    self.directory.unpin(done)

            accepted = set(tier.offer(chunks, written))
            with self._lock:
                self.directory.unpin([k for k in keys if k not in accepted])

    def _abandon(self, job: _Job, error: BaseException) -> None:
        self._complete(job, error if isinstance(error, KVortexError) else TransferError(str(error)))
