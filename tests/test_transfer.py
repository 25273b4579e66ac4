"""Store and load through the Mover on CPU tensors (the torch path), for every layout.

The same cases run on the GPU through both CUDA paths in test_transfer_gpu.py.
"""

from __future__ import annotations

import ctypes
import threading

import numpy as np
import pytest
import torch
from kv_layouts import LAYOUTS, fill_random

from kvortex.errors import (
    BackendUnavailable,
    InvalidArgumentError,
    InvalidTypeError,
    LayoutError,
    SlotError,
    TransferError,
)
from kvortex.layout import PagedLayout
from kvortex.memory import HostSlabPool
from kvortex.transfer import Mover

L, B, N, H, D = 3, 24, 16, 2, 8
BPC = 2  # blocks per chunk


def make(name: str, dtype: torch.dtype = torch.float16, bpc: int = BPC, slots: int = 8):
    kv = LAYOUTS[name](L, B, N, H, D, dtype, "cpu")
    fill_random(kv, seed=hash(name) % 1000)
    layout = PagedLayout.from_kv_caches(kv, N)
    pool = HostSlabPool(layout.chunk_bytes(bpc), slots, backend="python")
    return kv, layout, pool, Mover(layout, pool, bpc)


def block_bytes(layout: PagedLayout, block: int) -> list[bytes]:
    """The page bytes of one engine block in every plane, read straight from memory."""
    return [
        ctypes.string_at(p.base + block * p.block_stride, layout.page_bytes) for p in layout.planes
    ]


def poison(layout: PagedLayout, blocks: list[int]) -> None:
    for p in layout.planes:
        for b in blocks:
            ctypes.memset(p.base + b * p.block_stride, 0xA5, layout.page_bytes)


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_round_trip_into_other_blocks(name: str) -> None:
    _kv, layout, pool, mover = make(name)
    src = [3, 4, 9, 1, B - 1, 0]  # contiguous, descending, last block, first block
    dst = [10, 11, 20, 5, 7, 2]
    slots = [pool.alloc() for _ in range(len(src) // BPC)]
    expected = {b: block_bytes(layout, b) for b in src}
    handle = mover.store(src, slots)
    handle.wait()
    assert handle.done() and handle.nbytes == len(slots) * layout.chunk_bytes(BPC)
    # Host bytes are the pages, plane-major.
    for c, slot in enumerate(slots):
        host = bytes(pool.view(slot)[: layout.chunk_bytes(BPC)])
        for p in range(layout.num_planes):
            for j in range(BPC):
                off = layout.host_offset(p, j, BPC)
                assert host[off : off + layout.page_bytes] == expected[src[c * BPC + j]][p]
    poison(layout, src + dst)
    mover.load(slots, dst).wait()
    for s, d in zip(src, dst, strict=False):
        assert block_bytes(layout, d) == expected[s]
    untouched = block_bytes(layout, src[0])
    assert all(page == b"\xa5" * layout.page_bytes for page in untouched)
    mover.close()
    pool.close()


@pytest.mark.parametrize("name", ["fa_nhd", "blnhc"])
def test_one_block_per_chunk(name: str) -> None:
    _kv, layout, pool, mover = make(name, bpc=1)
    slot = pool.alloc()
    before = block_bytes(layout, B - 1)
    mover.store([B - 1], [slot]).wait()
    poison(layout, [0])
    mover.load([slot], [0]).wait()
    assert block_bytes(layout, 0) == before


def test_empty_transfer_is_a_no_op() -> None:
    _, _, _, mover = make("lbnhc")
    handle = mover.store([], [])
    assert handle.done() and handle.num_chunks == 0


def test_validation_before_any_copy() -> None:
    _, layout, pool, mover = make("lbnhc")
    slot = pool.alloc()
    before = bytes(pool.view(slot))
    with pytest.raises(InvalidArgumentError, match="out of range"):
        mover.store([0, B], [slot])
    with pytest.raises(InvalidArgumentError, match="out of range"):
        mover.store([-2, 0], [slot])
    with pytest.raises(InvalidArgumentError, match="block ids"):
        mover.store([0, 1, 2], [slot])
    with pytest.raises(SlotError):
        mover.store([0, 1], [slot + 1])  # not allocated
    with pytest.raises(SlotError):
        mover.store([0, 1], [10_000])  # out of range
    with pytest.raises(InvalidArgumentError, match="repeat"):
        mover.store([0, 1, 2, 3], [slot, slot])
    with pytest.raises(InvalidArgumentError):
        mover.store([0.5, 1.5], [slot])
    for unsigned in (np.uint64, np.uint32, np.uint16):  # range-checked before any cast
        top = np.iinfo(unsigned).max
        with pytest.raises(InvalidArgumentError, match=f"block id {top} is out of range"):
            mover.store(np.array([0, top], dtype=unsigned), [slot])
    with pytest.raises(InvalidArgumentError, match="out of range"):
        mover.store(torch.tensor([0, -1]), [slot])
    with pytest.raises(LayoutError, match="another engine"):
        mover.store([0, 1], [slot], layout_id="somebody-else")
    assert bytes(pool.view(slot)) == before
    mover.store([0, 1], [slot], layout_id=layout.layout_id).wait()


def test_constructor_checks() -> None:
    kv = LAYOUTS["lbnhc"](L, B, N, H, D, torch.float16, "cpu")
    layout = PagedLayout.from_kv_caches(kv, N)
    small = HostSlabPool(layout.chunk_bytes(BPC) - 1, 2, backend="python")
    with pytest.raises(InvalidArgumentError, match="cannot hold a chunk"):
        Mover(layout, small, BPC)
    pool = HostSlabPool(layout.chunk_bytes(BPC), 2, backend="python")
    with pytest.raises(InvalidArgumentError, match="blocks_per_chunk"):
        Mover(layout, pool, 0)
    with pytest.raises(InvalidArgumentError, match="path"):
        Mover(layout, pool, BPC, path="warp")
    with pytest.raises(InvalidArgumentError, match="needs CUDA"):
        Mover(layout, pool, BPC, path="dma")


def test_closed_mover_and_pool_close_closes_mover() -> None:
    _, _, pool, mover = make("flashinfer")
    slot = pool.alloc()
    pool.close()
    with pytest.raises(TransferError, match="closed"):
        mover.store([0, 1], [slot])


class _SlowMover(Mover):
    """Signals when a copy is about to start, then dawdles: the window in which another
    thread may close the pool."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.copying = threading.Event()

    def _torch_copy(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        self.copying.set()
        threading.Event().wait(0.3)
        return super()._torch_copy(*args, **kwargs)


def test_pool_close_waits_for_a_transfer_being_prepared() -> None:
    kv = LAYOUTS["lbnhc"](L, B, N, H, D, torch.float16, "cpu")
    fill_random(kv, seed=5)
    layout = PagedLayout.from_kv_caches(kv, N)
    pool = HostSlabPool(layout.chunk_bytes(BPC), 2, backend="python")
    mover = _SlowMover(layout, pool, BPC)
    slot = pool.alloc()
    expected = block_bytes(layout, 3) + block_bytes(layout, 4)
    result: dict[str, object] = {}
    view = pool.view(slot)  # a view keeps the memory readable after the pool closes

    def store() -> None:
        mover.store([3, 4], [slot]).wait()
        result["bytes"] = bytes(view[: layout.chunk_bytes(BPC)])

    thread = threading.Thread(target=store)
    thread.start()
    assert mover.copying.wait(10)
    pool.close()  # must wait for the copy in progress, never unmap under it
    thread.join(10)
    assert not thread.is_alive()
    host = result["bytes"]
    assert isinstance(host, bytes)
    got = [
        host[layout.host_offset(p, b, BPC) : layout.host_offset(p, b, BPC) + layout.page_bytes]
        for b in range(BPC)
        for p in range(layout.num_planes)
    ]
    assert sorted(got) == sorted(expected)
    with pytest.raises(TransferError, match="closed"):
        mover.store([3, 4], [slot])


def test_backend_unavailable_is_typed() -> None:
    assert issubclass(BackendUnavailable, RuntimeError)


@pytest.mark.parametrize("name", ["fa_nhd", "lbnhc", "blnhc"])
def test_skipped_pages_are_left_alone(name: str) -> None:
    """``skip`` leaves a page alone on both sides: the engine already holds that block."""
    _, layout, pool, mover = make(name)
    slot = pool.alloc()
    src = [5, 6]
    expected = block_bytes(layout, 6)
    mover.store([5, 6], [slot], skip=[True, False]).wait()
    host = bytes(pool.view(slot)[: layout.chunk_bytes(BPC)])
    for p in range(layout.num_planes):  # the skipped page's host bytes were not written
        off = layout.host_offset(p, 0, BPC)
        assert host[off : off + layout.page_bytes] == b"\x00" * layout.page_bytes
    mover.store(src, [slot]).wait()
    poison(layout, [8, 9])
    mover.load([slot], [8, 9], skip=np.array([True, False])).wait()
    assert block_bytes(layout, 9) == expected
    assert block_bytes(layout, 8) == [b"\xa5" * layout.page_bytes] * layout.num_planes
    for bad in ([-1, 9], [-2, 9]):  # negative ids are never blocks (no hidden skip marker)
        with pytest.raises(InvalidArgumentError, match="out of range"):
            mover.load([slot], bad)
    with pytest.raises(InvalidArgumentError, match="entries"):
        mover.load([slot], [8, 9], skip=[True])
    with pytest.raises(InvalidTypeError, match="bool"):
        mover.load([slot], [8, 9], skip=[1, 0])
