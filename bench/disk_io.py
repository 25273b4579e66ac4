"""Disk I/O: BatchIO (native Linux AIO, Python thread pool) against sequential dd O_DIRECT.

In one directory (``--dir``, default a fresh temporary directory under /tmp, removed after),
writes and then reads ``--chunks`` chunks of ``--chunk-kib`` KiB (default 64 x 16 MiB = 1 GiB,
at most 2 GiB; ``--quick``: 8 x 1 MiB) from page-aligned host-pool slots, as ONE batch per
direction, through ``kvortex.diskio.BatchIO`` with each available implementation. The
baseline is the raw sequential bandwidth of the same device, measured in the same run with the
same total bytes::

    dd if=/dev/zero of=FILE bs=4M count=... oflag=direct conv=notrunc
    dd if=FILE of=/dev/null bs=4M iflag=direct

(dd's own reported time is used.) Both targets are preallocated (``posix_fallocate``) before
timing: ext4 runs an O_DIRECT write that extends a file synchronously, so writes into a fresh
file would measure the allocator, not the I/O path. Reported: median and p99 seconds per
batch, GB/s, and the ratios native/dd, python/dd and native/python per direction (>= 1 means
as fast). O_DIRECT keeps the guest's page cache out of every figure; a host (e.g. a VM's disk
image in the host's page cache) may still cache. ``--buffered`` adds BatchIO cases on buffered
files: those read mostly from the page cache (the data was just written), so they measure
memory copies, not the disk; they are reported for completeness, without dd ratios.
Correctness is checked once per implementation (CRC-32 of every chunk before and after).

    python bench/disk_io.py [--quick] [--json] [--repeat N] [--dir DIR] [--chunks N]
        [--chunk-kib S] [--depth D] [--buffered]
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from _harness import Row, Stats, measure, parser, report

from kvortex import backend
from kvortex.diskio import BatchIO, IOOp, crc32, direct_io_supported, open_file
from kvortex.memory import HostSlabPool

KiB = 1 << 10
MiB = 1 << 20
DD_BLOCK = 4 * MiB
MAX_TOTAL = 2 << 30


def implementations() -> list[str]:
    """The registry: the Python thread pool always, native AIO when it loaded."""
    impls = ["python"]
    if not backend.native_reason("disk"):
        impls.append("native")
    return impls


def dd_seconds(args: list[str]) -> float:
    """Run dd; the seconds it reports for the copy (wall time if its output is unfamiliar)."""
    t0 = time.perf_counter()
    proc = subprocess.run(["dd", *args], capture_output=True, text=True, check=True)
    wall = time.perf_counter() - t0
    found = re.search(r"copied, ([0-9.]+) s", proc.stderr)
    return float(found.group(1)) if found else wall


def dd_rows(directory: Path, total: int, direct: bool, repeat: int) -> list[Row]:
    path = directory / "dd.bin"
    preallocate(path, total)
    count = str(-(-total // DD_BLOCK))
    wflags = ["oflag=direct"] if direct else ["conv=fsync"]
    rflags = ["iflag=direct"] if direct else []
    write = ["if=/dev/zero", f"of={path}", "bs=4M", f"count={count}", "conv=notrunc", *wflags]
    read = [f"if={path}", "of=/dev/null", "bs=4M", *rflags]
    rows = []
    for case, args in (("write", write), ("read", read)):
        samples = [dd_seconds(args) for _ in range(repeat + 1)][1:]  # first run: warm-up
        stats = Stats.of(samples)
        rows.append(Row(case, "dd", stats, {"GB/s": total / stats.median / 1e9}))
    path.unlink()
    return rows


def preallocate(path: Path, nbytes: int) -> None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.posix_fallocate(fd, 0, nbytes)
    finally:
        os.close(fd)


def batch_rows(
    impl: str,
    directory: Path,
    pool: HostSlabPool,
    slots: list[int],
    direct: bool,
    depth: int,
    repeat: int,
) -> list[Row]:
    size = pool.slot_bytes
    total = size * len(slots)
    path = directory / f"batch-{impl}.bin"
    preallocate(path, total)
    fd, _ = open_file(path, write=True, direct=direct)
    suffix = "" if direct else " buffered"
    try:
        with BatchIO(depth, backend=impl) as io:
            writes: list[IOOp] = [
                (True, fd, i * size, pool.address(s), size) for i, s in enumerate(slots)
            ]
            reads: list[IOOp] = [(False, *op[1:]) for op in writes]
            check_round_trip(io, writes, reads, pool, slots)

            def run(ops: list[IOOp]) -> Callable[[], None]:
                def once() -> None:
                    results = io.run(ops)
                    assert results == [size] * len(ops), results

                return once

            rows = []
            for case, ops in (("write", writes), ("read", reads)):
                stats = measure(run(ops), repeat=repeat, warmup=1)
                rows.append(Row(case + suffix, impl, stats, {"GB/s": total / stats.median / 1e9}))
            return rows
    finally:
        os.close(fd)
        path.unlink()


def check_round_trip(
    io: BatchIO, writes: list[IOOp], reads: list[IOOp], pool: HostSlabPool, slots: list[int]
) -> None:
    """Write, clear the buffers, read back: every chunk's CRC must come back unchanged."""
    size = pool.slot_bytes
    before = [crc32(pool.address(s), size) for s in slots]
    assert io.run(writes) == [size] * len(writes)
    for s in slots:
        pool.view(s)[:] = bytes(size)
    assert io.run(reads) == [size] * len(reads)
    after = [crc32(pool.address(s), size) for s in slots]
    assert before == after, "BatchIO read back other bytes than it wrote"


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--dir", type=Path, default=None, help="directory for the files (default: temp)")
    p.add_argument("--chunks", type=int, default=None, help="chunks per batch (default 64)")
    p.add_argument("--chunk-kib", type=int, default=None, help="KiB per chunk (default 16384)")
    p.add_argument("--depth", type=int, default=64, help="BatchIO depth (default 64)")
    p.add_argument("--buffered", action="store_true", help="also run BatchIO on buffered files")
    args = p.parse_args()
    chunks = args.chunks or (8 if args.quick else 64)
    size = (args.chunk_kib or (1024 if args.quick else 16384)) * KiB
    if not 0 < chunks * size <= MAX_TOTAL or size % (4 * KiB):
        p.error("--chunks x --chunk-kib must be 1 byte to 2 GiB, --chunk-kib a multiple of 4")
    repeat = args.repeat or (2 if args.quick else 5)
    directory = Path(tempfile.mkdtemp(prefix="kvortex-bench-", dir=args.dir or "/tmp"))
    try:
        direct = direct_io_supported(directory)
        if not direct:
            print(f"# {directory} does not accept O_DIRECT: every figure includes the page cache")
        impls = implementations()
        if "native" not in impls:
            print(f"# native disk I/O unavailable: {backend.native_reason('disk')}")
        with HostSlabPool(size, chunks, backend="python") as pool:
            slots = [s for s in (pool.alloc() for _ in range(chunks)) if s is not None]
            rng = np.random.default_rng(0)
            for s in slots:
                pool.view(s)[:] = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
            rows = dd_rows(directory, chunks * size, direct, repeat)
            for impl in impls:
                rows += batch_rows(impl, directory, pool, slots, direct, args.depth, repeat)
                if args.buffered and direct:
                    rows += batch_rows(impl, directory, pool, slots, False, args.depth, repeat)
    finally:
        shutil.rmtree(directory, ignore_errors=True)

    gbps = {(r.case, r.impl): r.metrics["GB/s"] for r in rows}
    ratios: dict[str, float] = {}
    for case in ("write", "read"):
        for impl in impls:
            ratios[f"{case} {impl}/dd"] = gbps[(case, impl)] / gbps[(case, "dd")]
        if "native" in impls:
            ratios[f"{case} native/python"] = gbps[(case, "native")] / gbps[(case, "python")]
    title = (
        f"disk I/O, {chunks} x {size // KiB} KiB per batch, depth {args.depth}, "
        f"{'O_DIRECT' if direct else 'buffered'}, in {args.dir or '/tmp'}"
    )
    report(title, rows, ratios, args.json)


if __name__ == "__main__":
    main()
