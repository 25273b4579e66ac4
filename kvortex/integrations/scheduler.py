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
from typing import Any

from kvortex.config import KVortexConfig
from kvortex.directory import Directory, FreeListAllocator
from kvortex.errors import ConfigError, InvalidArgumentError
from kvortex.keys import Namespace
from kvortex.layout import block_id_array
from kvortex.plan import ChunkOp, TransferPlan
from kvortex.stats import ActivityLog

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


@dataclass(frozen=True)
class StepOutput:
    """What the workers need for one step (the connector wraps it in its metadata)."""

    plan: TransferPlan
    async_loads: frozenset[str]
    preempted: frozenset[str]
    release_after_load: frozenset[str]


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
        hit = self.directory.match(req.keys)
        # An in-step load may not cover the whole prompt: the engine must compute >= 1 token.
        hit = min(hit, (num_tokens - 1) // self.chunk)
        external = hit * self.chunk - num_computed
        if external <= 0:
            req.offer = None
            return 0, False
        is_async = external >= self.config.async_load_min_tokens
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
        keys = req.keys[first:last]
        slots = self.directory.pin_for_load(keys)
        req.pins.append(keys)
        bpc, skip_below = self.blocks_per_chunk, start // self.block_size
        ops = []
        for n, (key, slot) in enumerate(zip(keys, slots, strict=True)):
            c = first + n
            ids = tuple(block_ids[c * bpc : (c + 1) * bpc])
            if len(ids) < bpc:
                raise InvalidArgumentError(
                    f"request {request_id} holds {len(block_ids)} blocks; chunk {c} needs "
                    f"blocks up to {(c + 1) * bpc}"
                )
            op = ChunkOp(key, slot, ids, skip_pages=min(bpc, max(0, skip_below - c * bpc)))
            ops.append(op)
            req.loaded_blocks.update(dict.fromkeys(op.moved_block_ids, key))
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
            ChunkOp(key, slot, tuple(block_ids[i * bpc : (i + 1) * bpc]))
            for i, key, slot in reservation.chunks
        ]
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
        out = StepOutput(
            plan,
            frozenset(self._async),
            preempted,
            frozenset(self._release_after_load),
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
            req.loading = False
            if req.finished and not self._hold_while_loading:
                self._forget(rid)
        for rid in finished_sending:
            req = self._requests.get(rid)
            if req is None:
                continue
            if req.storing:
                self.directory.commit_store(req.storing, ok=True)
                self.activity.moved(stored=len(req.storing) * self.chunk_bytes * self.tp_size)
            self._release_after_load.discard(rid)
            self._forget(rid)

    # -- introspection ------------------------------------------------------------------------

    def pinned_count(self) -> int:
        """Chunk pins held by requests (0 once every request finished and reported)."""
        return sum(len(keys) for req in self._requests.values() for keys in req.pins)

    # -- internals ----------------------------------------------------------------------------

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


def describe_namespace(fields: dict[str, Any]) -> str:
    """A stable one-line model identity from engine facts (sorted ``key=value`` pairs)."""
    return ";".join(f"{k}={fields[k]}" for k in sorted(fields))
