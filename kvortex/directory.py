"""The Directory: which chunk lives in which host slot, and which one to give up when full.

Pure bookkeeping (no I/O, no CUDA, no threads), so it runs on the scheduler side of vLLM and is
tested exhaustively on CPU. It is not thread safe: its owner serialises calls.

Life of a chunk::

    reserve_store ──► PENDING (pinned, not matchable) ──commit_store(ok)──► READY
                                  └──────────commit_store(failed)──────► gone, slot freed
    READY ──pin_for_load──► READY + pinned (cannot be evicted) ──unpin──► READY

``match`` counts only READY chunks, contiguous from the first. Evicting a chunk also drops the
chunks stored after it in the same chain (their keys chain through it, so no prompt can reach
them any more); a pinned descendant is dropped when its pin is released.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, cast

from kvortex.errors import InvalidArgumentError
from kvortex.plan import ChunkOp, RequestOps, TransferPlan
from kvortex.policy import make_policy

__all__ = ["Directory", "FreeListAllocator", "SlotAllocator", "StoreReservation"]


class SlotAllocator(Protocol):
    """Hands out host slot ids; :class:`~kvortex.memory.HostSlabPool` is one."""

    def alloc(self) -> int | None: ...

    def free(self, slot: int) -> None: ...


class FreeListAllocator:
    """Slot ids ``0..num_slots-1`` from a stack, for a Directory whose pool lives elsewhere
    (vLLM's scheduler process plans slots of a pool that the workers own)."""

    def __init__(self, num_slots: int) -> None:
        self._free = list(range(num_slots - 1, -1, -1))

    def alloc(self) -> int | None:
        return self._free.pop() if self._free else None

    def free(self, slot: int) -> None:
        self._free.append(slot)


@dataclass
class _Entry:
    slot: int
    parent: bytes | None
    ready: bool = False
    pins: int = 0
    doomed: bool = False  # an ancestor was evicted: drop as soon as the pin goes
    children: set[bytes] = field(default_factory=set)


@dataclass(frozen=True)
class StoreReservation:
    """Result of :meth:`Directory.reserve_store`.

    Attributes:
        chunks: ``(index in keys, key, slot)`` of each chunk to copy, in order.
        already_stored: leading chunks that were stored already (no copy needed).
        truncated: True when the tier could not take every chunk; the first chunks were
            reserved and the rest dropped (a single request larger than the tier, or every
            other chunk pinned).
    """

    chunks: tuple[tuple[int, bytes, int], ...]
    already_stored: int
    truncated: bool


class Directory:
    """Index from chunk key to host slot, with eviction, pinning and per-step plans.

    Args:
        num_slots: capacity of the host tier, in chunks.
        eviction: ``"lru"`` or ``"s3fifo"``.
        allocator: where slot ids come from (default: a private free list of ``num_slots``).
    """

    def __init__(
        self, num_slots: int, *, eviction: str = "lru", allocator: SlotAllocator | None = None
    ) -> None:
        if isinstance(num_slots, bool) or not isinstance(num_slots, int) or num_slots < 1:
            raise InvalidArgumentError(f"num_slots must be a positive int, got {num_slots!r}")
        self.num_slots = num_slots
        self.eviction = eviction
        self._policy = make_policy(eviction, num_slots)
        self._alloc = allocator if allocator is not None else FreeListAllocator(num_slots)
        self._entries: dict[bytes, _Entry] = {}
        self._step = 0
        self._loads: list[RequestOps] = []
        self._stores: list[RequestOps] = []
        self.evictions = 0

    # -- queries ------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        entry = self._entries.get(key) if isinstance(key, bytes) else None
        return entry is not None and entry.ready

    @property
    def used(self) -> int:
        """Slots held (ready, pending and doomed-but-pinned chunks)."""
        return len(self._entries)

    def slot_of(self, key: bytes) -> int | None:
        entry = self._entries.get(key)
        return entry.slot if entry is not None and entry.ready else None

    def pinned(self, key: bytes) -> bool:
        entry = self._entries.get(key)
        return entry is not None and (entry.pins > 0 or not entry.ready)

    def match(self, keys: Sequence[bytes]) -> int:
        """Length of the longest prefix of ``keys`` stored and ready. No side effects."""
        n = 0
        for key in keys:
            entry = self._entries.get(key)
            if entry is None or not entry.ready or entry.doomed:
                break
            n += 1
        return n

    # -- hits ---------------------------------------------------------------------------------

    def touch(self, keys: Sequence[bytes]) -> None:
        """Record a use of ``keys`` (a matched prefix).

        Later chunks are touched first, so the first chunk of a prompt is always the most
        recent: eviction takes tails before heads and rarely has to drop a whole chain.
        """
        for key in reversed(keys):
            if key in self._entries:
                self._policy.hit(key)

    # -- stores -------------------------------------------------------------------------------

    def reserve_store(self, keys: Sequence[bytes]) -> StoreReservation:
        """Reserve slots for the chunks of ``keys`` not stored yet, evicting if needed.

        ``keys`` is a whole chain from the first chunk. Chunks already present are skipped.
        Reserved chunks are pinned and invisible to :meth:`match` until :meth:`commit_store`.
        """
        reserved: list[tuple[int, bytes, int]] = []
        protected = set(keys)  # never evict the chain being extended
        already = 0
        truncated = False
        parent: bytes | None = None
        for i, key in enumerate(keys):
            entry = self._entries.get(key)
            if entry is not None and not entry.doomed:
                if not reserved:
                    already += 1 if entry.ready else 0
                parent = key
                continue
            if entry is not None:  # doomed and pinned: cannot be reused, and breaks the chain
                truncated = True
                break
            slot = self._take_slot(protected)
            if slot is None:
                truncated = True
                break
            self._entries[key] = _Entry(slot, parent)
            if parent is not None:
                self._entries[parent].children.add(key)
            reserved.append((i, key, slot))
            parent = key
        return StoreReservation(tuple(reserved), already, truncated)

    def commit_store(self, keys: Sequence[bytes], ok: bool = True) -> None:
        """Finish reserved stores: on success the chunks become matchable; on failure they are
        dropped (with any chunk reserved after them) and their slots freed."""
        done = []
        for key in keys:
            entry = self._entries.get(key)
            if entry is None or entry.ready:
                continue
            if not ok or entry.doomed:
                self._drop(key)
                continue
            entry.ready = True
            done.append(key)
        for key in reversed(done):  # heads end up most recent (see touch)
            self._policy.insert(key)

    # -- loads --------------------------------------------------------------------------------

    def pin_for_load(self, keys: Sequence[bytes]) -> list[int]:
        """Pin ready chunks for a load and return their slots; raise if one is not ready."""
        slots = []
        for n, key in enumerate(keys):
            entry = self._entries.get(key)
            if entry is None or not entry.ready or entry.doomed:
                self.unpin(keys[:n])
                raise InvalidArgumentError(f"chunk {n} ({key.hex()[:16]}) is not stored")
            entry.pins += 1
            slots.append(entry.slot)
        self.touch(keys)
        return slots

    def unpin(self, keys: Sequence[bytes]) -> None:
        """Release pins taken by :meth:`pin_for_load`."""
        for key in keys:
            entry = self._entries.get(key)
            if entry is None or entry.pins == 0:
                continue
            entry.pins -= 1
            if entry.pins == 0 and entry.doomed:
                self._drop(key)

    def discard(self, keys: Iterable[bytes]) -> None:
        """Forget ``keys`` (e.g. their load failed: the host copy cannot be trusted). A pinned
        chunk is dropped when its last pin goes; its descendants go with it."""
        for key in keys:
            entry = self._entries.get(key)
            if entry is None:
                continue
            if entry.pins > 0 or not entry.ready:
                entry.doomed = True
            else:
                self._drop(key)

    # -- plans --------------------------------------------------------------------------------

    def add_load(self, request_id: str, chunks: Sequence[ChunkOp]) -> None:
        """Queue a load for this step's plan (chunks already pinned)."""
        if chunks:
            self._loads.append(RequestOps(request_id, tuple(chunks)))

    def add_store(self, request_id: str, chunks: Sequence[ChunkOp]) -> None:
        """Queue a store for this step's plan (chunks already reserved)."""
        if chunks:
            self._stores.append(RequestOps(request_id, tuple(chunks)))

    def plan(self) -> TransferPlan:
        """This step's immutable plan; starts the next step."""
        plan = TransferPlan(self._step, tuple(self._loads), tuple(self._stores))
        self._step += 1
        self._loads, self._stores = [], []
        return plan

    # -- internals ----------------------------------------------------------------------------

    def _take_slot(self, protected: set[bytes]) -> int | None:
        slot = self._alloc.alloc()
        while slot is None:
            victim = cast(
                "bytes | None",
                self._policy.victim(
                    lambda k: k not in protected and self._evictable(self._entries[cast(bytes, k)])
                ),
            )
            if victim is None:
                return None
            self.evictions += 1
            self._drop(victim, already_out_of_policy=True)
            slot = self._alloc.alloc()
        return slot

    @staticmethod
    def _evictable(entry: _Entry) -> bool:
        return entry.ready and entry.pins == 0

    def _drop(self, key: bytes, *, already_out_of_policy: bool = False) -> None:
        """Remove ``key`` and its descendants; pinned descendants are doomed instead."""
        stack = [key]
        first = True
        while stack:
            k = stack.pop()
            entry = self._entries.get(k)
            if entry is None:
                continue
            stack.extend(entry.children)
            entry.children = set()
            if not first and (entry.pins > 0 or not entry.ready):
                entry.doomed = True  # dropped when its load or store finishes
                continue
            if not (first and already_out_of_policy):
                self._policy.remove(k)
            first = False
            del self._entries[k]
            if entry.parent is not None and entry.parent in self._entries:
                self._entries[entry.parent].children.discard(k)
            self._alloc.free(entry.slot)
