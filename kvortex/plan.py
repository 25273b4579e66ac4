"""The per-step transfer plan: what the scheduler side tells the workers to copy.

Plain frozen dataclasses of ints, bytes and strings, so a plan pickles cheaply (vLLM ships it to
every worker inside the scheduler output) and cannot be changed after it was built.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

__all__ = ["ChunkOp", "DiskLocation", "DiskPlan", "RequestOps", "SegmentSeal", "TransferPlan"]


class DiskLocation(NamedTuple):
    """Where a chunk's record lives in the disk tier: segment id, byte offset of its header,
    payload bytes, and the sequence number in its header (the same on every TP rank). A named
    tuple: a restart builds one per record, a million in well under a second."""

    segment: int
    offset: int
    payload: int
    seq: int


@dataclass(frozen=True)
class ChunkOp:
    """One chunk: its key, its host slot, and the engine blocks that hold (or will hold) it.

    ``skip_pages``: for a load, how many of the chunk's first blocks the engine already holds
    (its own prefix cache hit ends inside the chunk); those pages are left alone.
    ``disk``: for a load, read the chunk from this disk record into ``slot`` first; for a
    store, write it there once the copy into ``slot`` completed (write-through).
    ``remote``: for a load, fetch the chunk from the shared tier into ``slot`` first.
    """

    key: bytes
    slot: int
    block_ids: tuple[int, ...]
    skip_pages: int = 0
    disk: DiskLocation | None = None
    remote: bool = False

    @property
    def moved_block_ids(self) -> tuple[int, ...]:
        """The blocks this op actually writes or reads (all but the skipped ones)."""
        return self.block_ids[self.skip_pages :]


@dataclass(frozen=True)
class RequestOps:
    """The chunks of one request moved in one direction this step."""

    request_id: str
    chunks: tuple[ChunkOp, ...]

    @property
    def slots(self) -> list[int]:
        return [c.slot for c in self.chunks]

    @property
    def block_ids(self) -> list[int]:
        return [b for c in self.chunks for b in c.block_ids]

    @property
    def skip(self) -> list[bool]:
        """One flag per entry of :attr:`block_ids`: True for a page left alone."""
        return [i < c.skip_pages for c in self.chunks for i in range(len(c.block_ids))]


@dataclass(frozen=True)
class TransferPlan:
    """Everything one step moves: loads (host -> engine) and stores (engine -> host)."""

    step: int
    loads: tuple[RequestOps, ...] = ()
    stores: tuple[RequestOps, ...] = ()

    @property
    def empty(self) -> bool:
        return not self.loads and not self.stores


@dataclass(frozen=True)
class SegmentSeal:
    """A closed disk segment's records, for its index file."""

    segment: int
    payload: int
    keys: tuple[bytes, ...]
    offsets: tuple[int, ...]
    seqs: tuple[int, ...]


@dataclass(frozen=True)
class DiskPlan:
    """One step's disk-tier work besides loads and stores: chunks already in host memory to
    write now (``slot`` -> ``disk``), segments to delete (evicted), segments to seal."""

    writes: tuple[ChunkOp, ...] = ()
    deletes: tuple[int, ...] = ()
    seals: tuple[SegmentSeal, ...] = ()

    @property
    def empty(self) -> bool:
        return not self.writes and not self.deletes and not self.seals
