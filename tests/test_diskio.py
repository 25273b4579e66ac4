"""kvortex.diskio: one suite over both implementations (the ``disk_backend`` fixture), real
files in ``tmp_path``, plus a differential test with the Python fallback as the oracle."""

from __future__ import annotations

import errno
import fcntl
import itertools
import json
import os
import random
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import REQUIRE_NATIVE, run_isolated

from kvortex import backend as kvortex_backend
from kvortex import diskio
from kvortex.diskio import ALIGN, BatchIO, IOOp, crc32, direct_io_supported, open_file
from kvortex.errors import InvalidArgumentError, InvalidTypeError, KVortexError, QueueClosed
from kvortex.memory import HostSlabPool

KiB = 1 << 10
MiB = 1 << 20


class Buffers:
    """Page-aligned scratch buffers: slots of a Python-backend host pool."""

    def __init__(self, slot_bytes: int, count: int) -> None:
        self.pool = HostSlabPool(slot_bytes, count, backend="python")
        self.slots = [self.pool.alloc() for _ in range(count)]

    def address(self, i: int) -> int:
        slot = self.slots[i]
        assert slot is not None
        return self.pool.address(slot)

    def view(self, i: int) -> memoryview:
        slot = self.slots[i]
        assert slot is not None
        return self.pool.view(slot)

    def fill(self, i: int, rng: random.Random) -> bytes:
        data = rng.randbytes(len(self.view(i)))
        self.view(i)[:] = data
        return data


@pytest.fixture
def buffers() -> Iterator[Buffers]:
    bufs = Buffers(256 * KiB, 16)
    yield bufs
    bufs.pool.close()


@pytest.fixture
def direct_dir(tmp_path: Path) -> Path:
    if not direct_io_supported(tmp_path):
        pytest.skip(f"{tmp_path} does not accept O_DIRECT")
    return tmp_path


def open_rw(path: Path, direct: bool) -> int:
    fd, is_direct = open_file(path, write=True, direct=direct)
    assert is_direct == direct
    return fd


# ---------------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize("direct", [True, False], ids=["O_DIRECT", "buffered"])
def test_write_then_read_round_trip(
    disk_backend: str, buffers: Buffers, direct_dir: Path, direct: bool
) -> None:
    rng = random.Random(1)
    fd = open_rw(direct_dir / "data", direct)
    try:
        size = 256 * KiB
        expected = [buffers.fill(i, rng) for i in range(8)]
        with BatchIO(4, backend=disk_backend) as io:
            assert io.backend == disk_backend
            writes: list[IOOp] = [(True, fd, i * size, buffers.address(i), size) for i in range(8)]
            assert io.run(writes) == [size] * 8
            reads: list[IOOp] = [
                (False, fd, i * size, buffers.address(8 + i), size) for i in range(8)
            ]
            assert io.run(reads) == [size] * 8
        for i in range(8):
            assert bytes(buffers.view(8 + i)) == expected[i]
        assert os.fstat(fd).st_size == 8 * size
    finally:
        os.close(fd)


def test_many_more_ops_than_depth(disk_backend: str, direct_dir: Path) -> None:
    rng = random.Random(2)
    bufs = Buffers(8 * KiB, 200)
    fd = open_rw(direct_dir / "many", True)
    try:
        order = list(range(100))
        rng.shuffle(order)  # offsets in no particular order within the batch
        data = {i: bufs.fill(i, rng) for i in range(100)}
        with BatchIO(3, backend=disk_backend) as io:
            writes: list[IOOp] = [(True, fd, k * 8 * KiB, bufs.address(k), 8 * KiB) for k in order]
            assert io.run(writes) == [8 * KiB] * 100
            reads: list[IOOp] = [
                (False, fd, k * 8 * KiB, bufs.address(100 + k), 8 * KiB) for k in order
            ]
            assert io.run(reads) == [8 * KiB] * 100
        for k in range(100):
            assert bytes(bufs.view(100 + k)) == data[k], k
    finally:
        os.close(fd)
        bufs.pool.close()


def test_zero_length_ops_and_empty_batch(disk_backend: str) -> None:
    with BatchIO(backend=disk_backend) as io:
        assert io.run([]) == []
        # nbytes == 0 makes no system call: even a bad fd and a null address give 0.
        assert io.run([(False, -1, 0, 0, 0), (True, 12345, 7, 0, 0)]) == [0, 0]


@pytest.mark.parametrize("direct", [True, False], ids=["O_DIRECT", "buffered"])
def test_reads_past_end_of_file_are_short(
    disk_backend: str, buffers: Buffers, direct_dir: Path, direct: bool
) -> None:
    path = direct_dir / "short"
    path.write_bytes(bytes(range(256)) * 39 + b"x")  # 9985 bytes: ends inside a block
    fd, _ = open_file(path, write=False, direct=direct)
    try:
        a = buffers.address(0)
        with BatchIO(backend=disk_backend) as io:
            got = io.run(
                [
                    (False, fd, 0, a, 16 * KiB),  # whole file, short
                    (False, fd, 8 * KiB, a + 16 * KiB, 8 * KiB),  # the tail, short
                    (False, fd, 12 * KiB, a + 32 * KiB, 4 * KiB),  # past the end
                    (False, fd, 1 << 40, a + 48 * KiB, 4 * KiB),  # far past the end
                ]
            )
        assert got == [9985, 9985 - 8 * KiB, 0, 0]
        assert bytes(buffers.view(0)[:9985]) == path.read_bytes()
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------
# I/O errors come back per op


def test_misaligned_direct_op_fails_alone(
    disk_backend: str, buffers: Buffers, direct_dir: Path
) -> None:
    rng = random.Random(3)
    fd = open_rw(direct_dir / "aligned", True)
    try:
        good = buffers.fill(0, rng)
        a = buffers.address(0)
        with BatchIO(backend=disk_backend) as io:
            got = io.run(
                [
                    (True, fd, 0, a, 4 * KiB),
                    (True, fd, 4 * KiB + 1, a, 4 * KiB),  # offset
                    (True, fd, 8 * KiB, a + 1, 4 * KiB),  # address
                    (True, fd, 12 * KiB, a, 4 * KiB - 1),  # length
                    (True, fd, 16 * KiB, a, 4 * KiB),
                ]
            )
            assert got == [4 * KiB, -errno.EINVAL, -errno.EINVAL, -errno.EINVAL, 4 * KiB]
            assert io.run([(False, fd, 16 * KiB, buffers.address(1), 4 * KiB)]) == [4 * KiB]
        assert bytes(buffers.view(1)[: 4 * KiB]) == good[: 4 * KiB]
    finally:
        os.close(fd)


def test_bad_file_descriptors(disk_backend: str, buffers: Buffers, tmp_path: Path) -> None:
    closed_fd, _ = open_file(tmp_path / "closed", write=True)
    os.close(closed_fd)
    write_only = os.open(tmp_path / "wo", os.O_WRONLY | os.O_CREAT, 0o644)
    read_only, _ = open_file(tmp_path / "wo", write=False)
    a = buffers.address(0)
    try:
        with BatchIO(backend=disk_backend) as io:
            got = io.run(
                [
                    (False, closed_fd, 0, a, 4 * KiB),
                    (True, -1, 0, a, 4 * KiB),
                    (False, write_only, 0, a, 4 * KiB),  # not open for reading
                    (True, read_only, 0, a, 4 * KiB),  # not open for writing
                    (True, write_only, 0, a, 4 * KiB),  # fine
                ]
            )
        assert got == [-errno.EBADF] * 4 + [4 * KiB]
    finally:
        os.close(write_only)
        os.close(read_only)


@pytest.mark.parametrize("direct", [True, False], ids=["O_DIRECT", "buffered"])
def test_write_beyond_file_size_limit_fails(
    disk_backend: str, direct_dir: Path, direct: bool
) -> None:
    """RLIMIT_FSIZE stands in for a full disk (no root needed): a write that crosses the limit
    is cut short by the kernel, the continuation fails, and the op reports -EFBIG."""
    out = run_isolated(
        f"""
        import json, resource, signal
        from kvortex import diskio
        from kvortex.memory import HostSlabPool

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of death
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
        pool = HostSlabPool(2 << 20, 1, backend="python")
        a = pool.address(pool.alloc())
        fd, _ = diskio.open_file({str(direct_dir / "limited")!r}, write=True, direct={direct})
        with diskio.BatchIO(backend={disk_backend!r}) as io:
            got = io.run([
                (True, fd, 0, a, 512 << 10),          # below the limit
                (True, fd, 512 << 10, a, 1 << 20),    # crosses it: partly written, then EFBIG
                (True, fd, 2 << 20, a, 4096),         # entirely beyond it
            ])
        print(json.dumps(got))
        """
    )
    assert json.loads(out) == [512 * KiB, -errno.EFBIG, -errno.EFBIG]


# ---------------------------------------------------------------------------------------------
# Malformed ops, depth, close


MALFORMED: list[tuple[object, type[KVortexError], str]] = [
    (42, InvalidTypeError, "ops is int"),
    ([42], InvalidTypeError, r"ops\[0\] is int"),
    ([(True, 3, 0, 4096)], InvalidTypeError, r"ops\[0\] has 4 fields"),
    ([(1, 3, 0, 4096, 10)], InvalidTypeError, r"ops\[0\]\.is_write=1 is not a bool"),
    ([(True, 3.0, 0, 4096, 10)], InvalidTypeError, r"ops\[0\]\.fd=3\.0 is not an integer"),
    ([(True, 3, "0", 4096, 10)], InvalidTypeError, r"ops\[0\]\.offset='0' is not an integer"),
    ([(True, 3, 0, None, 10)], InvalidTypeError, r"ops\[0\]\.address=None is not an integer"),
    ([(True, 3, 0, 4096, True)], InvalidTypeError, r"ops\[0\]\.nbytes=True is not an integer"),
    ([(True, 1 << 31, 0, 4096, 10)], InvalidArgumentError, r"ops\[0\]\.fd=2147483648 is out"),
    ([(True, 3, -1, 4096, 10)], InvalidArgumentError, r"ops\[0\]\.offset=-1 is not allowed"),
    ([(True, 3, 0, 4096, -10)], InvalidArgumentError, r"ops\[0\]\.nbytes=-10 is not allowed"),
    ([(True, 3, 0, -4096, 10)], InvalidArgumentError, r"ops\[0\]\.address=-4096 is not allowed"),
    ([(True, 3, 1 << 63, 4096, 1)], InvalidArgumentError, r"ops\[0\]: offset=.* exceeds 2\*\*63"),
    ([(True, 3, 1, 4096, (1 << 63) - 1)], InvalidArgumentError, r"exceeds 2\*\*63 - 1"),
    ([(True, 3, 0, 1 << 64, 1)], InvalidArgumentError, r"exceeds the address space"),
    ([(True, 3, 0, (1 << 64) - 8, 8)], InvalidArgumentError, r"exceeds the address space"),
    ([(True, 3, 0, 0, 10)], InvalidArgumentError, r"ops\[0\]: address=0 with nbytes=10"),
]


@pytest.mark.parametrize(("ops", "error", "match"), MALFORMED)
def test_malformed_ops_raise_typed_errors(
    disk_backend: str, ops: Any, error: type[KVortexError], match: str
) -> None:
    with BatchIO(backend=disk_backend) as io, pytest.raises(error, match=match):
        io.run(ops)


def test_a_malformed_op_stops_the_whole_batch(
    disk_backend: str, buffers: Buffers, tmp_path: Path
) -> None:
    fd, _ = open_file(tmp_path / "untouched", write=True)
    try:
        with (
            BatchIO(backend=disk_backend) as io,
            pytest.raises(InvalidArgumentError, match=r"ops\[1\]"),
        ):
            io.run([(True, fd, 0, buffers.address(0), 4 * KiB), (True, fd, -5, 1, 1)])
        assert os.fstat(fd).st_size == 0  # the valid op did not run either
    finally:
        os.close(fd)


def test_ops_may_be_lists_and_any_iterable(
    disk_backend: str, buffers: Buffers, tmp_path: Path
) -> None:
    fd, _ = open_file(tmp_path / "iter", write=True, direct=False)
    try:
        with BatchIO(backend=disk_backend) as io:
            assert io.run([[True, fd, 0, buffers.address(0), 100]]) == [100]
            assert io.run(iter([(False, fd, 0, buffers.address(1), 100)])) == [100]
    finally:
        os.close(fd)


@pytest.mark.parametrize(
    ("depth", "error"),
    [
        (0, InvalidArgumentError),
        (diskio.MAX_DEPTH + 1, InvalidArgumentError),
        (-3, InvalidArgumentError),
        (True, InvalidTypeError),
        (2.0, InvalidTypeError),
    ],
)
def test_depth_is_checked(disk_backend: str, depth: Any, error: type[KVortexError]) -> None:
    with pytest.raises(error, match="depth"):
        BatchIO(depth, backend=disk_backend)


def test_close_is_idempotent_and_final(disk_backend: str, buffers: Buffers) -> None:
    io = BatchIO(8, backend=disk_backend)
    assert not io.closed and io.depth == 8
    assert repr(io) == f"BatchIO(depth=8, backend={disk_backend!r})"
    io.close()
    io.close()
    assert io.closed
    with pytest.raises(QueueClosed, match="closed BatchIO"):
        io.run([(False, 0, 0, buffers.address(0), 1)])
    with BatchIO(backend=disk_backend) as other:
        pass
    assert other.closed
    with pytest.raises(QueueClosed):
        other.run([])


# ---------------------------------------------------------------------------------------------
# CRC-32


def test_crc32_matches_zlib(disk_backend: str, buffers: Buffers) -> None:
    rng = random.Random(4)
    view = buffers.view(0)
    data = buffers.fill(0, rng)
    base = buffers.address(0)
    view[:9] = b"123456789"
    assert crc32(base, 9, backend=disk_backend) == 0xCBF43926  # the CRC-32 check value
    assert crc32(0, 0, backend=disk_backend) == 0
    assert crc32(0, 0, 0xDEADBEEF, backend=disk_backend) == 0xDEADBEEF
    data = bytes(view)
    sizes = [0, 1, 3, 4095, 4096, 4097, 65535, 65536, 65537, len(data) - 7]
    sizes += [rng.randrange(len(data) - 7) for _ in range(20)]
    for n in sizes:
        start = rng.randrange(8)  # unaligned starts too
        seed = rng.randrange(1 << 32)
        assert crc32(base + start, n, seed, backend=disk_backend) == zlib.crc32(
            data[start : start + n], seed
        ), (start, n)
        cut = rng.randrange(n + 1)
        first = crc32(base + start, cut, backend=disk_backend)
        assert crc32(base + start + cut, n - cut, first, backend=disk_backend) == zlib.crc32(
            data[start : start + n]
        )


@pytest.mark.parametrize(
    ("args", "error", "match"),
    [
        ((1.0, 1), InvalidTypeError, "address=1.0 is not an integer"),
        ((4096, "1"), InvalidTypeError, "nbytes='1' is not an integer"),
        ((4096, 1, None), InvalidTypeError, "value=None is not an integer"),
        ((4096, False), InvalidTypeError, "nbytes=False"),
        ((-1, 1), InvalidArgumentError, "address=-1 is not allowed"),
        ((4096, -1), InvalidArgumentError, "nbytes=-1 is not allowed"),
        ((4096, 1, -1), InvalidArgumentError, r"value=-1 .* 2\*\*32"),
        ((4096, 1, 1 << 32), InvalidArgumentError, r"value=4294967296"),
        ((4096, 1 << 63), InvalidArgumentError, r"nbytes=.* exceeds 2\*\*63 - 1"),
        ((1 << 64, 1), InvalidArgumentError, "exceeds the address space"),
        ((0, 16), InvalidArgumentError, "address=0 with nbytes=16"),
    ],
)
def test_crc32_rejects_bad_arguments(
    disk_backend: str, args: tuple[Any, ...], error: type[KVortexError], match: str
) -> None:
    with pytest.raises(error, match=match):
        crc32(*args, backend=disk_backend)


# ---------------------------------------------------------------------------------------------
# Threads and the GIL


def test_concurrent_runs_from_four_threads(disk_backend: str, direct_dir: Path) -> None:
    out = run_isolated(
        f"""
        import os, random, threading
        from kvortex import diskio
        from kvortex.memory import HostSlabPool

        CHUNK, PER_THREAD, ROUNDS = 64 << 10, 16, 20
        pool = HostSlabPool(CHUNK, 4 * PER_THREAD * 2, backend="python")
        slots = [pool.alloc() for _ in range(4 * PER_THREAD * 2)]
        fd, _ = diskio.open_file({str(direct_dir / "shared")!r}, write=True)
        io = diskio.BatchIO(4, backend={disk_backend!r})
        errors = []

        def worker(t):
            rng = random.Random(t)
            mine = slots[t * PER_THREAD * 2 : (t + 1) * PER_THREAD * 2]
            src, dst = mine[:PER_THREAD], mine[PER_THREAD:]
            for r in range(ROUNDS):
                data = [rng.randbytes(CHUNK) for _ in src]
                for s, d in zip(src, data):
                    pool.view(s)[:] = d
                base = (t * PER_THREAD) * CHUNK
                w = io.run([(True, fd, base + i * CHUNK, pool.address(s), CHUNK)
                            for i, s in enumerate(src)])
                rd = io.run([(False, fd, base + i * CHUNK, pool.address(s), CHUNK)
                             for i, s in enumerate(dst)])
                if w != [CHUNK] * PER_THREAD or rd != [CHUNK] * PER_THREAD:
                    errors.append((t, r, w, rd))
                for s, d in zip(dst, data):
                    if bytes(pool.view(s)) != d:
                        errors.append((t, r, "data"))

        threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        io.close()
        os.close(fd)
        print("errors", errors)
        """,
        timeout=120,
    )
    assert out.strip() == "errors []"


def test_close_waits_for_a_run_in_progress(disk_backend: str, direct_dir: Path) -> None:
    out = run_isolated(
        f"""
        import os, threading, time
        from kvortex import diskio
        from kvortex.memory import HostSlabPool

        pool = HostSlabPool(64 << 20, 1, backend="python")
        a = pool.address(pool.alloc())
        fd, _ = diskio.open_file({str(direct_dir / "closing")!r}, write=True)
        io = diskio.BatchIO(2, backend={disk_backend!r})
        got = []
        t = threading.Thread(target=lambda: got.append(io.run(
            [(True, fd, i << 20, a + (i << 20), 1 << 20) for i in range(64)])))
        t.start()
        time.sleep(0.01)
        io.close()  # must not return while the batch still has I/O in flight
        done_at_close = bool(got) or not t.is_alive()
        t.join()
        print(done_at_close, got[0] == [1 << 20] * 64 if got else "raised")
        """
    )
    # Either the run finished before close returned, or it started after close and raised
    # QueueClosed; never a run still touching memory after close.
    assert out.split()[0] == "True"


def _max_stall_during(fn: Any) -> tuple[float, float]:
    """(duration of fn(), longest gap between ticks of a thread that needs the GIL)."""
    ticks: list[float] = []
    stop = threading.Event()

    def ticker() -> None:
        while not stop.is_set():
            ticks.append(time.perf_counter())
            time.sleep(0.0005)

    t = threading.Thread(target=ticker)
    t.start()
    time.sleep(0.02)
    start = time.perf_counter()
    fn()
    end = time.perf_counter()
    stop.set()
    t.join()
    inside = [x for x in ticks if start <= x <= end]
    points = [start, *inside, end]
    return end - start, max(b - a for a, b in itertools.pairwise(points))


def test_gil_released_during_large_crc32_and_io(disk_backend: str, direct_dir: Path) -> None:
    bufs = Buffers(64 * MiB, 1)
    bufs.view(0)[:] = bytes(64 * MiB)  # commit the pages first
    fd = open_rw(direct_dir / "gil", True)
    try:
        a = bufs.address(0)

        def crc_many() -> None:
            for _ in range(4):
                crc32(a, 64 * MiB, backend=disk_backend)

        with BatchIO(backend=disk_backend) as io:

            def write() -> None:
                for _ in range(8):
                    io.run([(True, fd, i * MiB, a + i * MiB, MiB) for i in range(64)])

            for fn in (crc_many, write):
                duration, stall = _max_stall_during(fn)
                if duration < 0.05:
                    continue  # too quick to tell on this machine
                assert stall < duration / 2, (fn.__name__, duration, stall)
    finally:
        os.close(fd)
        bufs.pool.close()


# ---------------------------------------------------------------------------------------------
# Differential: the Python fallback is the oracle


@pytest.mark.skipif(
    bool(kvortex_backend.native_reason("disk")) and not REQUIRE_NATIVE,
    reason=f"native disk: {kvortex_backend.native_reason('disk')}",
)
@pytest.mark.parametrize("seed", range(6))
def test_native_matches_python(tmp_path: Path, seed: int) -> None:
    direct_ok = direct_io_supported(tmp_path)
    outcomes = []
    for impl in ("python", "native"):
        rng = random.Random(seed)
        work = tmp_path / impl
        work.mkdir()
        initial = rng.randbytes(rng.randrange(1, 300 * KiB))
        (work / "f").write_bytes(initial)
        fds = [open_file(work / "f", write=True, direct=d)[0] for d in (direct_ok, False)]
        bufs = Buffers(64 * KiB, 24)
        for i in range(24):
            bufs.fill(i, rng)
        ops: list[IOOp] = []
        for i in range(24):
            kind = rng.random()
            offset = rng.choice([rng.randrange(0, 400 * KiB, ALIGN), rng.randrange(400 * KiB)])
            nbytes = rng.choice([0, ALIGN, 16 * KiB, 64 * KiB, rng.randrange(64 * KiB)])
            start = rng.choice([0, 0, 0, 1, 512])
            fd = rng.choice(fds) if kind > 0.05 else 99999
            length = min(nbytes, 64 * KiB - start)
            ops.append((rng.random() < 0.4, fd, offset, bufs.address(i) + start, length))
        with BatchIO(4, backend=impl) as io:
            # Writes may overlap other ops: each runs alone, in order; then all reads at once.
            results = [io.run([op]) for op in ops if op[0]]
            results.append(io.run([op for op in ops if not op[0]]))
        contents = [bytes(bufs.view(i)) for i in range(24)]
        outcomes.append((results, (work / "f").read_bytes(), contents))
        for fd in fds:
            os.close(fd)
        bufs.pool.close()
    assert outcomes[0][0] == outcomes[1][0]
    assert outcomes[0][1] == outcomes[1][1]
    assert outcomes[0][2] == outcomes[1][2]


# ---------------------------------------------------------------------------------------------
# Opening files


def test_open_file_modes(tmp_path: Path) -> None:
    direct_ok = direct_io_supported(tmp_path)
    fd, direct = open_file(tmp_path / "new", write=True)
    try:
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        assert direct == direct_ok == bool(flags & os.O_DIRECT)
        assert flags & os.O_ACCMODE == os.O_RDWR
        assert (tmp_path / "new").stat().st_mode & 0o777 == 0o644 & ~_umask()
    finally:
        os.close(fd)
    fd, direct = open_file(tmp_path / "new", write=False, direct=False)
    try:
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        assert not direct and not flags & os.O_DIRECT
        assert flags & os.O_ACCMODE == os.O_RDONLY
    finally:
        os.close(fd)
    with pytest.raises(FileNotFoundError):
        open_file(tmp_path / "missing", write=False)
    with pytest.raises(FileNotFoundError):
        direct_io_supported(tmp_path / "no-such-dir")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new"]  # the probes are gone


def test_open_file_falls_back_to_buffered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_open = os.open

    def no_direct(path: Any, flags: int, mode: int = 0o777) -> int:
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return real_open(path, flags, mode)

    monkeypatch.setattr(os, "open", no_direct)
    fd, direct = open_file(tmp_path / "f", write=True)
    os.close(fd)
    assert not direct
    assert not direct_io_supported(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
