"""HostSlabPool: one suite over both implementations (the ``pool_backend`` fixture)."""

from __future__ import annotations

import errno
import gc
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import run_isolated
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from kvortex import backend as kvortex_backend
from kvortex.errors import (
    InvalidArgumentError,
    InvalidTypeError,
    KVortexError,
    PoolClosed,
    SlotError,
)
from kvortex.memory import SLOT_ALIGNMENT, HostSlabPool

GiB = 1 << 30
MiB = 1 << 20
THP_PATH = Path("/sys/kernel/mm/transparent_hugepage/enabled")
NODE_DIR = Path("/sys/devices/system/node")


def thp_available() -> bool:
    try:
        setting = THP_PATH.read_text()
    except OSError:
        return False
    return "[always]" in setting or "[madvise]" in setting


def numa_nodes() -> list[int]:
    if not NODE_DIR.is_dir():
        return []
    names = [p.name for p in NODE_DIR.iterdir()]
    return sorted(int(n[4:]) for n in names if n.startswith("node") and n[4:].isdigit())


def mappings() -> list[tuple[int, int, list[str]]]:
    """(start, end, lines of detail) of every mapping of this process, from /proc/self/smaps."""
    out: list[tuple[int, int, list[str]]] = []
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split(" ", 1)[0]
        if "-" in head and ":" not in head:
            lo, hi = head.split("-")
            out.append((int(lo, 16), int(hi, 16), []))
        elif out:
            out[-1][2].append(line)
    return out


def is_mapped(base: int, nbytes: int) -> bool:
    """Whether every byte of [base, base + nbytes) is mapped in this process."""
    covered = base
    for lo, hi, _ in sorted(mappings()):
        if lo <= covered < hi:
            covered = hi
        if covered >= base + nbytes:
            return True
    return False


def vm_flags(address: int) -> list[str]:
    for lo, hi, detail in mappings():
        if lo <= address < hi:
            for line in detail:
                if line.startswith("VmFlags:"):
                    return line.split()[1:]
    raise AssertionError(f"{address:#x} is not mapped")


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def stride_of(slot_bytes: int) -> int:
    return -(-slot_bytes // SLOT_ALIGNMENT) * SLOT_ALIGNMENT


@pytest.fixture
def make_pool(pool_backend: str) -> Iterator[Callable[..., HostSlabPool]]:
    """Builds pools on the backend under test and closes them all afterwards."""
    pools: list[HostSlabPool] = []

    def make(slot_bytes: int = 5000, num_slots: int = 8, **kwargs: Any) -> HostSlabPool:
        pool = HostSlabPool(slot_bytes, num_slots, backend=pool_backend, **kwargs)
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        pool.close()


# --- properties, alignment, alloc/free ------------------------------------------------------


def test_backend_is_the_requested_one(
    make_pool: Callable[..., HostSlabPool], pool_backend: str
) -> None:
    assert make_pool().backend == pool_backend


@pytest.mark.parametrize("slot_bytes", [1, 4095, 4096, 4097, 3 * 4096 + 5, 2 * MiB])
def test_properties(make_pool: Callable[..., HostSlabPool], slot_bytes: int) -> None:
    pool = make_pool(slot_bytes, 3)
    stride = stride_of(slot_bytes)
    assert pool.slot_bytes == slot_bytes
    assert pool.slot_stride == stride
    assert pool.num_slots == 3
    assert pool.nbytes == 3 * stride
    assert pool.base_address % SLOT_ALIGNMENT == 0
    assert (pool.used, pool.available, pool.closed) == (0, 3, False)
    assert pool.numa_node is None
    assert pool.hugepages is thp_available()  # "auto": madvise exactly when THP is offered
    assert is_mapped(pool.base_address, pool.nbytes)


def test_every_slot_is_aligned_at_its_offset(make_pool: Callable[..., HostSlabPool]) -> None:
    pool = make_pool(5000, 7)
    slots = [pool.alloc() for _ in range(7)]
    assert sorted(s for s in slots if s is not None) == list(range(7))
    for slot in range(7):
        address = pool.address(slot)
        assert address == pool.base_address + slot * pool.slot_stride
        assert address % 4096 == 0
        # The view is that very memory, not a copy.
        assert np.frombuffer(pool.view(slot), dtype=np.uint8).ctypes.data == address


def test_alloc_until_full_then_none(make_pool: Callable[..., HostSlabPool]) -> None:
    pool = make_pool(100, 5)
    got = [pool.alloc() for _ in range(5)]
    assert len(set(got)) == 5 and all(s is not None and 0 <= s < 5 for s in got)
    assert (pool.used, pool.available) == (5, 0)
    assert pool.alloc() is None
    assert pool.alloc() is None
    assert pool.used == 5


def test_free_and_realloc(make_pool: Callable[..., HostSlabPool]) -> None:
    pool = make_pool(100, 4)
    slots = [pool.alloc() for _ in range(4)]
    assert slots[2] is not None
    pool.free(slots[2])
    assert (pool.used, pool.available) == (3, 1)
    assert pool.alloc() == slots[2]  # the only free slot
    assert pool.alloc() is None
    for s in slots:
        assert s is not None
        pool.free(s)
    assert (pool.used, pool.available) == (0, 4)
    assert sorted(pool.alloc() or 0 for _ in range(4)) == [0, 1, 2, 3]


def test_numpy_integers_are_slots(make_pool: Callable[..., HostSlabPool]) -> None:
    pool = make_pool(100, 4)
    slot = pool.alloc()
    assert slot is not None
    assert pool.address(np.int64(slot)) == pool.address(slot)
    assert len(pool.view(np.uint32(slot))) == 100
    pool.free(np.int32(slot))
    assert pool.used == 0


# --- views ----------------------------------------------------------------------------------


@pytest.mark.parametrize("slot_bytes", [1, 4095, 4096, 4097, 8191, 65537])
def test_view_is_exactly_one_slot(make_pool: Callable[..., HostSlabPool], slot_bytes: int) -> None:
    pool = make_pool(slot_bytes, 2)
    slot = pool.alloc()
    assert slot is not None
    view = pool.view(slot)
    assert len(view) == view.nbytes == slot_bytes
    assert (view.format, view.itemsize, view.ndim, view.readonly) == ("B", 1, 1, False)
    assert view.c_contiguous


def test_views_are_zero_copy(make_pool: Callable[..., HostSlabPool]) -> None:
    pool = make_pool(4097, 3)
    slot = pool.alloc()
    assert slot is not None
    first = pool.view(slot)
    pattern = bytes(range(256)) * 16 + b"\x7f"
    first[:] = pattern
    assert bytes(pool.view(slot)) == pattern
    second = pool.view(slot)
    second[4096] = 0x11
    assert first[4096] == 0x11


@pytest.mark.parametrize("slot_bytes", [1, 4095, 4096, 4097])
def test_writes_stay_inside_their_slot(
    make_pool: Callable[..., HostSlabPool], slot_bytes: int
) -> None:
    pool = make_pool(slot_bytes, 5)
    slots = [pool.alloc() for _ in range(5)]
    for s in slots:
        assert s is not None
        pool.view(s)[:] = bytes([s + 1]) * slot_bytes
    pool.view(2)[:] = b"\xff" * slot_bytes
    for s in (1, 3):  # the neighbours, each filled with its own byte
        assert bytes(pool.view(s)) == bytes([s + 1]) * slot_bytes
    assert bytes(pool.view(2)) == b"\xff" * slot_bytes


def test_view_survives_close(make_pool: Callable[..., HostSlabPool]) -> None:
    pool = make_pool(MiB, 32)  # 32 MiB, so the unmapping is unmistakable in /proc/self/maps
    base, nbytes = pool.base_address, pool.nbytes
    slot = pool.alloc()
    assert slot is not None
    view = pool.view(slot)
    view[:4] = b"live"
    pool.close()
    assert pool.closed
    assert is_mapped(base, nbytes)  # the view holds the mapping
    view[:] = b"z" * MiB  # writing after close: valid memory, no crash
    assert bytes(view[:4]) == b"zzzz"
    del view
    gc.collect()
    assert not is_mapped(base, nbytes)


def test_close_unmaps_at_once_without_views(make_pool: Callable[..., HostSlabPool]) -> None:
    pool = make_pool(MiB, 32)
    slot = pool.alloc()
    assert slot is not None
    pool.view(slot)[0] = 1  # a view made and dropped before close
    base, nbytes = pool.base_address, pool.nbytes
    pool.close()
    assert not is_mapped(base, nbytes)


def test_huge_pool_is_instant_and_commits_nothing(make_pool: Callable[..., HostSlabPool]) -> None:
    # A capability check, not a timing test: 16 GiB on a machine that may have less free memory
    # works only if nothing is committed or touched up front.
    rss_before = rss_bytes()
    start = time.perf_counter()
    pool = make_pool(32 * MiB, 512)
    elapsed = time.perf_counter() - start
    assert pool.nbytes == 16 * GiB
    assert elapsed < 1.0, f"creating a 16 GiB pool took {elapsed:.3f}s"
    if Path("/proc/sys/vm/overcommit_memory").read_text().strip() != "2":  # 2 ignores the flag
        assert "nr" in vm_flags(pool.base_address)  # MAP_NORESERVE: no commit accounting
    slot = pool.alloc()
    assert slot is not None
    pool.view(slot)[-1] = 7  # commits one page (or one huge page), not the pool
    assert rss_bytes() - rss_before < 64 * MiB
    start = time.perf_counter()
    pool.close()
    assert time.perf_counter() - start < 1.0


# --- close ----------------------------------------------------------------------------------


def test_use_after_close_raises_pool_closed(make_pool: Callable[..., HostSlabPool]) -> None:
    pool = make_pool(100, 4)
    slot = pool.alloc()
    assert slot is not None
    pool.close()
    pool.close()  # idempotent
    assert pool.closed
    assert (pool.used, pool.available) == (0, 0)
    assert (pool.slot_bytes, pool.num_slots) == (100, 4)
    for call in (pool.alloc, lambda: pool.free(slot), lambda: pool.view(slot)):
        with pytest.raises(PoolClosed):
            call()
    with pytest.raises(PoolClosed):
        pool.address(slot)
    with pytest.raises(PoolClosed):
        pool.free(99)  # the closed pool is reported before the range
    with pytest.raises(PoolClosed):
        pool.add_close_callback(lambda: None)


def test_close_callbacks_run_once_before_unmap(make_pool: Callable[..., HostSlabPool]) -> None:
    pool = make_pool(MiB, 16)
    calls: list[tuple[str, bool]] = []

    def recorder(name: str) -> Callable[[], None]:
        return lambda: calls.append((name, is_mapped(pool.base_address, pool.nbytes)))

    pool.add_close_callback(recorder("first"))
    pool.add_close_callback(recorder("second"))
    pool.close()
    pool.close()
    assert calls == [("first", True), ("second", True)]
    assert not is_mapped(pool.base_address, pool.nbytes)


def test_failing_close_callback_still_closes(make_pool: Callable[..., HostSlabPool]) -> None:
    pool = make_pool(100, 2)
    ran: list[str] = []

    def boom() -> None:
        ran.append("boom")
        raise RuntimeError("callback failed")

    pool.add_close_callback(boom)
    pool.add_close_callback(lambda: ran.append("after"))
    with pytest.raises(RuntimeError, match="callback failed"):
        pool.close()
    assert ran == ["boom", "after"]
    assert pool.closed
    pool.close()  # nothing left to run or raise
    assert ran == ["boom", "after"]


def test_close_callback_must_be_callable(make_pool: Callable[..., HostSlabPool]) -> None:
    with pytest.raises(InvalidTypeError, match="not callable"):
        make_pool().add_close_callback(42)  # type: ignore[arg-type]


def test_context_manager_and_garbage_collection_close(pool_backend: str) -> None:
    calls: list[str] = []
    with HostSlabPool(100, 2, backend=pool_backend) as pool:
        pool.add_close_callback(lambda: calls.append("with"))
        assert pool.alloc() == 0
    assert pool.closed and calls == ["with"]

    dropped = HostSlabPool(100, 2, backend=pool_backend)
    dropped.add_close_callback(lambda: calls.append("gc"))
    del dropped
    gc.collect()
    assert calls == ["with", "gc"]


# --- NUMA and huge pages --------------------------------------------------------------------


@pytest.mark.skipif(0 not in numa_nodes(), reason="no NUMA node 0 listed in sysfs")
def test_numa_node_binding(make_pool: Callable[..., HostSlabPool]) -> None:
    pool = make_pool(4096, 64, numa_node=0)
    assert pool.numa_node == 0
    slot = pool.alloc()
    assert slot is not None
    pool.view(slot)[:] = b"n" * 4096
    # numa_maps lists each mapping by its start; ours is the last one starting at or below base.
    entries = [line.split() for line in Path("/proc/self/numa_maps").read_text().splitlines()]
    _start, policy = max(
        (int(e[0], 16), e[1]) for e in entries if int(e[0], 16) <= pool.base_address
    )
    assert policy == "bind:0"


@pytest.mark.parametrize("node", [4096, 2**31, 2**70])
def test_absent_numa_node(pool_backend: str, node: int) -> None:
    with pytest.raises(InvalidArgumentError, match=f"numa_node={node} does not exist") as info:
        HostSlabPool(100, 2, numa_node=node, backend=pool_backend)
    nodes = numa_nodes()
    if nodes:
        assert "NUMA nodes present: " + ", ".join(map(str, nodes)) in str(info.value)


def test_hugepages_required(pool_backend: str) -> None:
    if thp_available():
        with HostSlabPool(4096, 1024, hugepages=True, backend=pool_backend) as pool:
            assert pool.hugepages is True
            assert "hg" in vm_flags(pool.base_address)
    else:
        with pytest.raises(InvalidArgumentError, match="transparent_hugepage/enabled"):
            HostSlabPool(4096, 1024, hugepages=True, backend=pool_backend)


def test_hugepages_off(make_pool: Callable[..., HostSlabPool]) -> None:
    pool = make_pool(4096, 1024, hugepages=False)
    assert pool.hugepages is False
    assert "hg" not in vm_flags(pool.base_address)


def test_fallback_mbind_failure_is_oserror_with_errno() -> None:
    # The native mbind failure path is the same syscall and message; it cannot be provoked
    # through the public API on a machine whose nodes all have memory.
    from kvortex.memory import _mbind

    with pytest.raises(OSError) as info:
        _mbind(0, 4096, 0)  # nothing is mapped at address 0
    assert info.value.errno is not None
    assert os.strerror(info.value.errno) in str(info.value)
    assert "NUMA node 0" in str(info.value)


# --- errors: the same class from both backends ----------------------------------------------

BAD_CONSTRUCTIONS: list[tuple[tuple[Any, ...], dict[str, Any], type[Exception]]] = [
    ((0, 1), {}, InvalidArgumentError),
    ((-1, 1), {}, InvalidArgumentError),
    ((-(2**70), 1), {}, InvalidArgumentError),
    ((1, 0), {}, InvalidArgumentError),
    ((1, -5), {}, InvalidArgumentError),
    ((2**62, 4), {}, InvalidArgumentError),  # the region overflows 63 bits
    ((2**63 - 1, 1), {}, InvalidArgumentError),  # rounding up to 4096 overflows
    ((2**70, 1), {}, InvalidArgumentError),
    ((1, 2**70), {}, InvalidArgumentError),
    ((1.0, 1), {}, InvalidTypeError),
    (("8", 1), {}, InvalidTypeError),
    ((True, 1), {}, InvalidTypeError),
    ((None, 1), {}, InvalidTypeError),
    ((1, False), {}, InvalidTypeError),
    ((1, 2.5), {}, InvalidTypeError),
    ((1, 1), {"numa_node": -1}, InvalidArgumentError),
    ((1, 1), {"numa_node": True}, InvalidTypeError),
    ((1, 1), {"numa_node": "0"}, InvalidTypeError),
    ((1, 1), {"hugepages": "yes"}, InvalidArgumentError),
    ((1, 1), {"hugepages": "AUTO"}, InvalidArgumentError),
    ((1, 1), {"hugepages": 1}, InvalidTypeError),
    ((1, 1), {"hugepages": None}, InvalidTypeError),
    # A type error comes before any value error, whatever the argument order.
    ((0, "x"), {}, InvalidTypeError),
    ((0, 1), {"hugepages": 1}, InvalidTypeError),
]


@pytest.mark.parametrize(("args", "kwargs", "expected"), BAD_CONSTRUCTIONS)
def test_bad_construction(
    pool_backend: str, args: tuple[Any, ...], kwargs: dict[str, Any], expected: type[Exception]
) -> None:
    with pytest.raises(expected) as info:
        HostSlabPool(*args, backend=pool_backend, **kwargs)
    assert isinstance(info.value, KVortexError)
    assert type(info.value) is expected  # not merely a subclass (SlotError is a ValueError too)


def test_mapping_failure_is_oserror_with_errno(pool_backend: str) -> None:
    # 2**60 bytes fits the size checks but no address space: mmap fails with ENOMEM.
    with pytest.raises(OSError) as info:
        HostSlabPool(2**40, 2**20, backend=pool_backend)
    assert info.value.errno == errno.ENOMEM
    assert os.strerror(errno.ENOMEM) in str(info.value)
    assert "mmap" in str(info.value)


@pytest.mark.parametrize("op", ["free", "view", "address"])
@pytest.mark.parametrize(
    ("slot", "expected"),
    [
        (-1, SlotError),
        (4, SlotError),
        (2**63, SlotError),
        (-(2**70), SlotError),
        (3, SlotError),  # in range, never allocated
        (True, InvalidTypeError),
        (1.0, InvalidTypeError),
        ("0", InvalidTypeError),
        (None, InvalidTypeError),
    ],
)
def test_bad_slot(
    make_pool: Callable[..., HostSlabPool], op: str, slot: Any, expected: type[Exception]
) -> None:
    pool = make_pool(100, 4)
    assert pool.alloc() == 0
    with pytest.raises(expected) as info:
        getattr(pool, op)(slot)
    assert type(info.value) is expected
    assert pool.used == 1


def test_double_free(make_pool: Callable[..., HostSlabPool]) -> None:
    pool = make_pool(100, 4)
    slot = pool.alloc()
    assert slot is not None
    pool.free(slot)
    with pytest.raises(SlotError, match="double free"):
        pool.free(slot)
    with pytest.raises(SlotError, match="not allocated"):
        pool.view(slot)
    with pytest.raises(SlotError, match="not allocated"):
        pool.address(slot)
    assert (pool.used, pool.available) == (0, 4)


def test_unknown_backend_name() -> None:
    with pytest.raises(InvalidArgumentError, match="backend"):
        HostSlabPool(100, 2, backend="fast")


needs_native = pytest.mark.skipif(
    bool(kvortex_backend.native_reason("pool")) and os.environ.get("KVORTEX_REQUIRE_NATIVE") != "1",
    reason="native pool unavailable",
)


def _outcome(fn: Callable[[], object]) -> tuple[str, str]:
    try:
        return ("ok", repr(fn()))
    except Exception as exc:
        return (type(exc).__name__, str(exc))


def _script(name: str) -> list[tuple[str, str]]:
    pool = HostSlabPool(5000, 3, backend=name)
    steps: list[Callable[[], object]] = [
        pool.alloc, pool.alloc, lambda: pool.free(0), pool.alloc, pool.alloc, pool.alloc,
        lambda: pool.free(1), lambda: pool.free(1), lambda: pool.view(7),
        lambda: pool.address(-3), lambda: pool.free(2**64), lambda: pool.view("x"),  # type: ignore[arg-type]
        lambda: pool.used, pool.close, pool.alloc, lambda: pool.free(1),
    ]  # fmt: skip
    outcomes = [_outcome(step) for step in steps]
    for args, kwargs, _ in BAD_CONSTRUCTIONS:
        outcomes.append(_outcome(lambda: HostSlabPool(*args, backend=name, **kwargs)))  # noqa: B023
    return outcomes


@needs_native
def test_backends_agree_on_sequences_and_messages() -> None:
    """Differential: one script of calls, the same results and error texts from both."""
    assert _script("python") == _script("native")


# --- model-based: a state machine against a set ---------------------------------------------

MODEL_SLOTS = 5
MODEL_SLOT_BYTES = 4097


class PoolModel(RuleBasedStateMachine):
    """alloc/free/view/address/close against a set of allocated slots and per-slot stamps."""

    backend = "python"

    def __init__(self) -> None:
        super().__init__()
        self.pool = HostSlabPool(MODEL_SLOT_BYTES, MODEL_SLOTS, backend=self.backend)
        self.allocated: set[int] = set()
        self.stamps: dict[int, bytes] = {}
        self.counter = 0
        self.closed = False

    def expect_error(self, slot: int, call: Callable[[], object]) -> None:
        expected = PoolClosed if self.closed else SlotError
        with pytest.raises(expected):
            call()

    @rule()
    def alloc(self) -> None:
        if self.closed:
            with pytest.raises(PoolClosed):
                self.pool.alloc()
            return
        slot = self.pool.alloc()
        if len(self.allocated) == MODEL_SLOTS:
            assert slot is None
            return
        assert slot is not None and 0 <= slot < MODEL_SLOTS
        assert slot not in self.allocated, f"slot {slot} handed out twice"
        self.allocated.add(slot)
        # A stamp unique to this allocation, at both ends: a slot shared by two owners or a
        # view of the wrong memory shows up as a stamp mismatch.
        self.counter += 1
        stamp = self.counter.to_bytes(8, "little")
        view = self.pool.view(slot)
        view[:8] = stamp
        view[-8:] = stamp
        self.stamps[slot] = stamp

    @precondition(lambda self: bool(self.allocated) and not self.closed)
    @rule(data=st.data())
    def free_allocated(self, data: st.DataObject) -> None:
        slot = data.draw(st.sampled_from(sorted(self.allocated)))
        self.pool.free(slot)
        self.allocated.remove(slot)
        del self.stamps[slot]

    @rule(slot=st.integers(-2, MODEL_SLOTS + 1))
    def free(self, slot: int) -> None:
        if slot in self.allocated and not self.closed:
            self.pool.free(slot)
            self.allocated.remove(slot)
            del self.stamps[slot]
        else:
            self.expect_error(slot, lambda: self.pool.free(slot))

    @rule(slot=st.integers(-2, MODEL_SLOTS + 1))
    def view(self, slot: int) -> None:
        if slot in self.allocated and not self.closed:
            view = self.pool.view(slot)
            assert len(view) == MODEL_SLOT_BYTES
            assert bytes(view[:8]) == bytes(view[-8:]) == self.stamps[slot]
        else:
            self.expect_error(slot, lambda: self.pool.view(slot))

    @rule(slot=st.integers(-2, MODEL_SLOTS + 1))
    def address(self, slot: int) -> None:
        if slot in self.allocated and not self.closed:
            expected = self.pool.base_address + slot * self.pool.slot_stride
            assert self.pool.address(slot) == expected
        else:
            self.expect_error(slot, lambda: self.pool.address(slot))

    @rule()
    def close(self) -> None:
        self.pool.close()
        self.closed = True
        self.allocated.clear()
        self.stamps.clear()

    @invariant()
    def counts_match(self) -> None:
        assert self.pool.used == len(self.allocated)
        assert self.pool.available == (0 if self.closed else MODEL_SLOTS - len(self.allocated))
        assert self.pool.closed is self.closed

    def teardown(self) -> None:
        self.pool.close()


def test_state_machine(pool_backend: str) -> None:
    machine = type(f"PoolModel_{pool_backend}", (PoolModel,), {"backend": pool_backend})
    run_state_machine_as_test(  # type: ignore[no-untyped-call]
        machine, settings=settings(max_examples=60, stateful_step_count=40, deadline=None)
    )


# --- threads --------------------------------------------------------------------------------


def test_concurrent_alloc_free(pool_backend: str) -> None:
    out = run_isolated(
        f"""
        import random, threading, time
        from kvortex.memory import HostSlabPool

        SLOT = 4097
        pool = HostSlabPool(SLOT, 16, backend={pool_backend!r})
        owners = {{}}
        owners_lock = threading.Lock()
        errors = []
        counts = []

        def worker(tid):
            rng = random.Random(tid)
            held = {{}}
            done = 0
            deadline = time.monotonic() + 1.0
            try:
                while time.monotonic() < deadline:
                    if held and (len(held) >= 6 or rng.random() < 0.5):
                        slot = rng.choice(list(held))
                        pattern = held.pop(slot)
                        if bytes(pool.view(slot)) != pattern:
                            errors.append(f"slot {{slot}} of thread {{tid}} was overwritten")
                        with owners_lock:
                            del owners[slot]  # before free: then another thread may take it
                        pool.free(slot)
                        done += 1
                    else:
                        slot = pool.alloc()
                        if slot is None:
                            continue
                        with owners_lock:
                            if slot in owners:
                                errors.append(f"slot {{slot}} owned twice ({{tid}})")
                            owners[slot] = tid
                        pattern = (bytes([tid]) + done.to_bytes(4, "little")) * (SLOT // 5 + 1)
                        pattern = pattern[:SLOT]
                        pool.view(slot)[:] = pattern
                        held[slot] = pattern
                for slot in list(held):
                    with owners_lock:
                        del owners[slot]
                    pool.free(slot)
            except Exception as exc:
                errors.append(repr(exc))
            counts.append(done)

        threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        assert pool.used == 0, pool.used
        assert pool.available == 16
        assert all(c > 0 for c in counts), counts
        pool.close()
        print("ok", sum(counts))
        """,
        timeout=60,
    )
    assert out.startswith("ok")
