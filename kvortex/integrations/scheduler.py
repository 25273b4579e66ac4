"""The scheduler half of a serving-engine connector: decides what to load and store.

Lives in the engine's scheduler process, holds the :class:`~kvortex.directory.Directory` of the
host tier (the pool itself lives in each worker, which keeps its shard at the same slot id),
and answers with no RPC. It imports no serving engine: :mod:`kvortex.integrations.vllm` feeds
it request ids, token ids and block ids.

Per request:

- :meth:`SchedulerSide.matched_tokens`: how many tokens beyond the engine's own prefix-cache
  hit can be loaded (whole chunks, never the whole prompt for an in-step load). Side-effect
  free apart from memoising the request's chunk keys.
- :meth:`SchedulerSide.after_alloc`: the engine gave the request blocks: pin the chunks and
  queue their load (pages the engine already holds are skipped).
- :meth:`SchedulerSide.finished`: reserve slots for the request's full chunks not stored yet
  and queue their store; True means "keep the blocks until the workers report the store".
- :meth:`SchedulerSide.step`: this step's plan for the workers.
- :meth:`SchedulerSide.on_worker_output`: finished stores become matchable; loads that failed
  drop their chunks from the index.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kvortex.config import KVortexConfig
from kvortex.directory import Directory, FreeListAllocator
from kvortex.errors import ConfigError, InvalidArgumentError
from kvortex.keys import Namespace
from kvortex.layout import block_id_array
from kvortex.plan import ChunkOp, DiskLocation, DiskPlan, SegmentSeal, TransferPlan
from kvortex.stats import ActivityLog
from kvortex.tiers.disk_index import DiskIndex, no_cycle_collection, segment_bytes_for
from kvortex.tiers.records import namespace_fingerprint, record_bytes
from kvortex.tiers.segments import scan_directory
from kvortex.tiers.shard import shard_directory

if TYPE_CHECKING:
    from kvortex.tiers.redis import RemoteTier

__all__ = ["SchedulerSide", "StepOutput"]

log = logging.getLogger("kvortex")


@dataclass
class _Offer:
    """The last answer of matched_tokens: the load that after_alloc will plan."""

    num_computed: int
    hit_chunks: int
    is_async: bool


@dataclass
class _Request:
    keys: list[bytes]
    namespace: Namespace
    offer: _Offer | None = None
    pins: list[list[bytes]] = field(default_factory=list)
    loading: bool = False  # an asynchronous load not yet reported finished
    finished: bool = False
    storing: list[bytes] = field(default_factory=list)
    loaded_blocks: dict[int, bytes] = field(default_factory=dict)  # block id -> chunk key
    promoting: list[bytes] = field(default_factory=list)  # read from disk into reserved slots
    from_disk: set[bytes] = field(default_factory=set)
    disk_pending: list[tuple[bytes, DiskLocation]] = field(default_factory=list)


@dataclass(frozen=True)
class StepOutput:
    """What the workers need for one step (the connector wraps it in its metadata)."""

    plan: TransferPlan
    async_loads: frozenset[str]
    preempted: frozenset[str]
    release_after_load: frozenset[str]
    disk: DiskPlan = DiskPlan()  # noqa: RUF009 - frozen, immutable: one shared default is fine
    rank_namespaces: tuple[bytes, ...] = ()  # encoded, per TP rank: for the lower tiers


class SchedulerSide:
    """Directory-backed planning for one serving engine.

    Args:
        config: the validated configuration.
        namespace: the engine's key namespace (model, KV format, TP size, tenant salt).
        block_size: tokens per engine block.
        chunk_bytes: host bytes of one chunk on one worker (all layers, one TP shard).
        hold_blocks_while_loading: True where the engine frees a finished request's blocks at
            once even if a load into them is in flight (vLLM 0.15): the request is then kept
            until the load ends. False where the engine waits for the load itself (0.33).
        num_blocks: the engine's KV blocks per worker, when known: block ids the engine
            hands over are checked against it.
        tp_size: workers that each move their shard of every chunk (for bytes moved).
    """

    def __init__(
        self,
        config: KVortexConfig,
        namespace: Namespace,
        block_size: int,
        chunk_bytes: int,
        *,
        hold_blocks_while_loading: bool,
        num_blocks: int | None = None,
        tp_size: int = 1,
    ) -> None:
        if config.chunk_tokens % block_size:
            raise ConfigError(
                f"chunk_tokens={config.chunk_tokens} is not a multiple of the engine's block "
                f"size {block_size}"
            )
        num_slots = config.cpu_bytes // chunk_bytes
        if num_slots < 1:
            raise ConfigError(
                f"cpu_bytes={config.cpu_bytes} cannot hold one chunk of {chunk_bytes} bytes"
            )
        self.config = config
        self.namespace = namespace
        self.block_size = block_size
        self.chunk = config.chunk_tokens
        self.blocks_per_chunk = config.chunk_tokens // block_size
        self.chunk_bytes = chunk_bytes
        self.num_slots = num_slots
        self.directory = Directory(
            num_slots, eviction=config.eviction, allocator=FreeListAllocator(num_slots)
        )
        self.num_blocks = num_blocks
        self.tp_size = tp_size
        self.activity = ActivityLog(config.log_interval_s)
        self._evictions_seen = 0
        self.disk: DiskIndex | None = None
        self.remote: RemoteTier | None = None
        self.rank_namespaces: tuple[bytes, ...] = ()
        if config.disk_path is not None or config.remote_url is not None:
            self.rank_namespaces = tuple(namespace.for_rank(r).encode() for r in range(tp_size))
        self._disk_writes: list[ChunkOp] = []
        self._disk_deletes: list[int] = []
        self._disk_seals: list[SegmentSeal] = []
        if config.disk_path is not None:
            self._open_disk(config.disk_path)
        if config.remote_url is not None:
            from kvortex.tiers.redis import RemoteTier  # only shared-tier users need redis

            # Lookups only (the workers write their own shards): rank 0's shard stands for
            # all; a rank whose shard is missing reports load errors and vLLM recomputes.
            self.remote = RemoteTier(
                config.remote_url,
                self.rank_namespaces[0],
                chunk_bytes,
                timeout_ms=config.remote_timeout_ms,
                write="none",
                backend=config.backend,
            )
        self._hold_while_loading = hold_blocks_while_loading
        self._requests: dict[str, _Request] = {}
        self._async: set[str] = set()
        self._release_after_load: set[str] = set()

    # -- per request --------------------------------------------------------------------------

    def matched_tokens(
        self,
        request_id: str,
        prompt: Sequence[int],
        num_tokens: int,
        num_computed: int,
        *,
        salt: str | None = None,
    ) -> tuple[int, bool]:
        """Tokens beyond ``num_computed`` loadable from the host tier, and whether async."""
        new = request_id not in self._requests
        req = self._request(request_id, prompt, salt)
        if req.finished:
            return 0, False
        if new:
            self.activity.lookup(len(prompt), 0)
        in_host = hit = self.directory.match(req.keys)
        if self.disk is not None and hit < len(req.keys):
            hit += self.disk.match(req.keys[hit:])
        if self.remote is not None and hit < len(req.keys):
            hit += self.remote.match(req.keys[hit:])
        # An in-step load may not cover the whole prompt: the engine must compute >= 1 token.
        hit = min(hit, (num_tokens - 1) // self.chunk)
        external = hit * self.chunk - num_computed
        if external <= 0:
            req.offer = None
            return 0, False
        # A read from disk or the shared tier never runs inside a step: the request waits for
        # it asynchronously.
        is_async = external >= self.config.async_load_min_tokens or hit > in_host
        req.offer = _Offer(num_computed, hit, is_async)
        return external, is_async

    def after_alloc(self, request_id: str, block_ids: Sequence[int], num_external: int) -> None:
        """Pin the offered chunks and queue their load into ``block_ids`` (all the request's
        blocks, from its first token)."""
        req = self._requests.get(request_id)
        if req is None or num_external == 0 or req.offer is None:
            return
        block_ids = self._checked(block_ids)
        offer, req.offer = req.offer, None
        start = offer.num_computed
        first, last = start // self.chunk, offer.hit_chunks
        if start + num_external != last * self.chunk:
            raise InvalidArgumentError(
                f"request {request_id}: the engine allocated {num_external} external tokens "
                f"from {start}, but {last * self.chunk - start} were offered"
            )
        in_host = min(self.directory.match(req.keys), last)
        keys = req.keys[first:in_host]
        slots = self.directory.pin_for_load(keys)
        req.pins.append(keys)
        sources: list[tuple[bytes, int, DiskLocation | None, bool]] = [
            (k, s, None, False) for k, s in zip(keys, slots, strict=True)
        ]
        if last > in_host:  # the rest comes from disk, through host slots reserved here
            sources += self._plan_promotion(req, max(first, in_host), last)
        bpc, skip_below = self.blocks_per_chunk, start // self.block_size
        ops = []
        for n, (key, slot, disk, remote) in enumerate(sources):
            c = first + n
            ids = tuple(block_ids[c * bpc : (c + 1) * bpc])
            if len(ids) < bpc:
                raise InvalidArgumentError(
                    f"request {request_id} holds {len(block_ids)} blocks; chunk {c} needs "
                    f"blocks up to {(c + 1) * bpc}"
                )
            skip = min(bpc, max(0, skip_below - c * bpc))
            op = ChunkOp(key, slot, ids, skip_pages=skip, disk=disk, remote=remote)
            ops.append(op)
            req.loaded_blocks.update(dict.fromkeys(op.moved_block_ids, key))
            if disk is None and not remote:
                self._write_hit(op)
        self.directory.add_load(request_id, ops)
        self.activity.hit(num_external)
        self.activity.moved(loaded=self._bytes(sum(len(op.moved_block_ids) for op in ops)))
        if offer.is_async:
            req.loading = True
            self._async.add(request_id)

    def finished(
        self,
        request_id: str,
        tokens: Sequence[int],
        num_computed: int,
        block_ids: Sequence[int],
        *,
        salt: str | None = None,
    ) -> bool:
        """The request finished (or was aborted). Queue the store of its computed full chunks;
        return True if the engine must keep ``block_ids`` until the workers report the store
        (or, see ``hold_blocks_while_loading``, the load) finished."""
        block_ids = self._checked(block_ids)
        req = self._request(request_id, (), salt)
        req.finished = True
        if req.loading:
            if self._hold_while_loading:
                self._release_after_load.add(request_id)
                return True
            return False  # the engine keeps the blocks until the load is reported
        full = min(num_computed, len(tokens), len(block_ids) * self.block_size) // self.chunk
        keys = req.namespace.chunk_keys(list(tokens[: full * self.chunk]), self.chunk)
        # Unpin first: a chunk whose load failed is dropped at its last unpin, and the store
        # below then replaces it with the recomputed KV (reserve_store protects the chain).
        self._unpin(req)
        reservation = self.directory.reserve_store(keys)
        if not reservation.chunks:
            del self._requests[request_id]
            return False
        bpc = self.blocks_per_chunk
        ops = [
            ChunkOp(key, slot, tuple(block_ids[i * bpc : (i + 1) * bpc]), disk=self._place(key))
            for i, key, slot in reservation.chunks
        ]
        req.disk_pending = [(op.key, op.disk) for op in ops if op.disk is not None]
        self.directory.add_store(request_id, ops)
        req.storing = [op.key for op in ops]
        return True

    # -- per step -----------------------------------------------------------------------------

    def step(self, preempted: Iterable[str] = ()) -> StepOutput:
        """This step's plan and flags for the workers; starts the next step."""
        preempted = frozenset(preempted)
        for rid in preempted:  # the engine took their blocks back: they may go to others
            req = self._requests.get(rid)
            if req is not None:
                req.loaded_blocks.clear()
        plan = self.directory.plan()
        disk = DiskPlan()
        if self.disk is not None:
            self._seal_closed_segments()
            disk = DiskPlan(
                tuple(self._disk_writes), tuple(self._disk_deletes), tuple(self._disk_seals)
            )
            self._disk_writes, self._disk_deletes, self._disk_seals = [], [], []
        out = StepOutput(
            plan,
            frozenset(self._async),
            preempted,
            frozenset(self._release_after_load),
            disk,
            self.rank_namespaces,
        )
        self._async.clear()
        evictions = self.directory.evictions
        self.activity.evicted(evictions - self._evictions_seen)
        self._evictions_seen = evictions
        self.activity.tick()
        return out

    def on_worker_output(
        self,
        finished_sending: Iterable[str] = (),
        finished_recving: Iterable[str] = (),
        invalid_block_ids: Iterable[int] = (),
    ) -> None:
        """Fold in what the workers reported (already aggregated over all of them)."""
        bad = set(invalid_block_ids)
        if bad:
            self._drop_failed_loads(bad)
        for rid in finished_recving:
            req = self._requests.get(rid)
            if req is None:
                continue
            self._promoted(req)
            req.loading = False
            if req.finished and not self._hold_while_loading:
                self._forget(rid)
        for rid in finished_sending:
            req = self._requests.get(rid)
            if req is None:
                continue
            self._promoted(req)
            if req.storing:
                self.directory.commit_store(req.storing, ok=True)
                self.activity.moved(stored=len(req.storing) * self.chunk_bytes * self.tp_size)
            if self.disk is not None and req.disk_pending:
                # The workers queued these writes before reporting the store: any read
                # planned from now on runs after them.
                for key, loc in req.disk_pending:
                    self.disk.commit(key, loc, ok=True)
                req.disk_pending = []
            self._release_after_load.discard(rid)
            self._forget(rid)

    # -- introspection ------------------------------------------------------------------------

    def pinned_count(self) -> int:
        """Chunk pins held by requests (0 once every request finished and reported)."""
        return sum(len(keys) for req in self._requests.values() for keys in req.pins)

    # -- internals ----------------------------------------------------------------------------

    # -- disk tier ----------------------------------------------------------------------------

    def _open_disk(self, disk_path: str) -> None:
        """The disk tier's index, rebuilt from what every rank's directory holds: a record
        counts only where each rank's shard of it is complete (same location and sequence)."""
        rec = record_bytes(self.chunk_bytes)
        segment_bytes = segment_bytes_for(self.config.disk_bytes, rec)
        if self.config.disk_bytes < 2 * segment_bytes:
            raise ConfigError(
                f"disk_bytes={self.config.disk_bytes} cannot hold two segments of one "
                f"{rec}-byte chunk record"
            )
        self.disk = DiskIndex(
            self.config.disk_bytes, segment_bytes, admission=self.config.disk_admission
        )
        self._record = rec
        with no_cycle_collection():
            self._restore_disk(disk_path)
        log.info(
            "kvortex: disk tier %s: %d chunks restored (%d TP shard(s) each)",
            disk_path,
            len(self.disk),
            self.tp_size,
        )

    def _restore_disk(self, disk_path: str) -> None:
        assert self.disk is not None
        per_rank = []
        for rank, encoded in enumerate(self.rank_namespaces):
            fingerprint = namespace_fingerprint(encoded)
            found, _ = scan_directory(shard_directory(disk_path, rank, self.tp_size), fingerprint)
            per_rank.append({seg: (size, entries) for seg, size, entries in found})
        for segment in sorted(per_rank[0]):
            if not all(segment in ranks for ranks in per_rank):
                self._disk_deletes.append(segment)
                continue
            size = max(ranks[segment][0] for ranks in per_rank)
            common = None
            for ranks in per_rank:
                e = ranks[segment][1]
                e = e[e["payload"] == self.chunk_bytes]
                rows = set(
                    zip(e["key"].tolist(), e["offset"].tolist(), e["seq"].tolist(), strict=True)
                )
                common = rows if common is None else common & rows
            rows_sorted = sorted(common or (), key=lambda r: r[2])
            self.disk.restore(
                segment,
                size,
                [bytes(k) for k, _, _ in rows_sorted],
                [o for _, o, _ in rows_sorted],
                [self.chunk_bytes] * len(rows_sorted),
                [q for _, _, q in rows_sorted],
            )
        self._disk_deletes += self.disk.evict_over_capacity()

    def _place(self, key: bytes) -> DiskLocation | None:
        """A disk location for ``key`` if the admission filter takes it (write-through)."""
        if self.disk is None or not self.disk.admit(key):
            return None
        loc, evicted = self.disk.allocate(key, self.chunk_bytes, self._record)
        self._disk_deletes += evicted
        return loc

    def _write_hit(self, op: ChunkOp) -> None:
        """A chunk hit in host memory counts as a use: write it to disk if now admitted."""
        loc = self._place(op.key)
        if loc is None:
            return
        self._disk_writes.append(ChunkOp(op.key, op.slot, (), disk=loc))
        assert self.disk is not None
        self.disk.commit(op.key, loc, ok=True)  # queued by the workers this step, before reads

    def _plan_promotion(
        self, req: _Request, begin: int, end: int
    ) -> list[tuple[bytes, int, DiskLocation | None, bool]]:
        """Host slots for chunks ``begin:end`` (on disk, else in the shared tier): reserved
        now, filled by the workers' reads. A chunk that gets no slot, or is in neither tier,
        is planned from slot -1: the worker reports its blocks as load errors and the engine
        recomputes them."""
        reservation = self.directory.reserve_store(req.keys[:end])
        slot_of = {key: slot for _, key, slot in reservation.chunks}
        out: list[tuple[bytes, int, DiskLocation | None, bool]] = []
        on_disk = True
        for key in req.keys[begin:end]:
            loc = self.disk.location(key) if self.disk is not None and on_disk else None
            on_disk = loc is not None  # past the disk's prefix the rest is the shared tier's
            remote = loc is None and self.remote is not None
            slot = slot_of.get(key, -1)
            if loc is None and not remote:
                slot = -1
            out.append((key, slot, loc, remote))
            if slot >= 0:
                req.promoting.append(key)
                if loc is not None:
                    req.from_disk.add(key)
        unused = [k for k in slot_of if k not in req.promoting]
        if unused:
            self.directory.commit_store(unused, ok=False)
        return out

    def _promoted(self, req: _Request) -> None:
        """The request's disk reads ended: the promoted chunks become host-tier hits (those
        whose load failed were discarded and are dropped here)."""
        if req.promoting:
            self.directory.commit_store(req.promoting, ok=True)
            req.promoting = []

    def _seal_closed_segments(self) -> None:
        assert self.disk is not None
        for segment in self.disk.seal_candidates():
            entries = self.disk.entries(segment)
            self._disk_seals.append(
                SegmentSeal(
                    segment,
                    self.chunk_bytes,
                    tuple(k for k, _ in entries),
                    tuple(loc.offset for _, loc in entries),
                    tuple(loc.seq for _, loc in entries),
                )
            )

    def close(self) -> None:
        """Release the shared tier's connections (the connector's shutdown)."""
        if self.remote is not None:
            self.remote.close()

    def _bytes(self, pages: int) -> int:
        """Bytes moved for ``pages`` engine blocks' pages on every worker."""
        return pages * self.chunk_bytes // self.blocks_per_chunk * self.tp_size

    def _checked(self, block_ids: Sequence[int]) -> list[int]:
        """The engine's block ids, each a real block (never a negative or oversized id)."""
        limit = self.num_blocks if self.num_blocks is not None else 2**62
        return block_id_array(block_ids, limit).tolist()  # type: ignore[no-any-return]

    def _request(self, request_id: str, prompt: Sequence[int], salt: str | None) -> _Request:
        req = self._requests.get(request_id)
        if req is None:
            ns = self.namespace
            if salt:
                ns = Namespace(
                    ns.model,
                    ns.layout,
                    ns.dtype,
                    ns.tp_size,
                    ns.tp_rank,
                    f"{ns.tenant_salt}|{salt}",
                )
            req = _Request(ns.chunk_keys(list(prompt), self.chunk), ns)
            self._requests[request_id] = req
        return req

    def _unpin(self, req: _Request) -> None:
        for keys in req.pins:
            self.directory.unpin(keys)
        req.pins = []

    def _forget(self, request_id: str) -> None:
        req = self._requests.pop(request_id, None)
        if req is not None:
            self._unpin(req)

    def _drop_failed_loads(self, bad: set[int]) -> None:
        failed: set[bytes] = set()
        for req in self._requests.values():
            failed.update(key for block, key in req.loaded_blocks.items() if block in bad)
        if failed:
            log.warning("kvortex: %d chunks failed to load; dropping them", len(failed))
            self.directory.discard(failed)
            if self.disk is not None:
                for req in self._requests.values():
                    for key in failed & req.from_disk:
                        self.disk.drop(key)


def describe_namespace(fields: dict[str, Any]) -> str:
    """A stable one-line model identity from engine facts (sorted ``key=value`` pairs)."""
    return ";".join(f"{k}={fields[k]}" for k in sorted(fields))
