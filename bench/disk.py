"""Disk tier: chunk write/read GB/s through DiskTier against dd, and restart (rebuild) time.

1. Throughput. ``--chunks`` chunks of ``--chunk-mib`` MiB (default 128 x 32 MiB = 4 GiB; a
   32 MiB chunk is 256 tokens of Llama-3-8B at 128 KiB per token; ``--quick``: 8 x 1 MiB) are
   written through ``kvortex.tiers.disk.DiskTier`` (namespace ``b"bench"``, admission "all",
   capacity twice the data) with ``offer`` in batches of ``--batch`` chunks (default 8), then
   ``wait_idle``; and read back with ``fetch`` in groups of ``--batch`` chunks, then
   ``wait_idle``. Each is timed as a whole, for the native and the Python I/O backend, each
   round in a fresh directory with fresh keys. Memory: page-aligned host-pool slots with random
   bytes, ``--batch`` sources reused round-robin (a write-through source is only read) and
   ``--batch`` destinations (one ``fetch`` group; groups run one after another on the tier's
   I/O thread), so RAM stays under 2 x batch x chunk. Every read must succeed (each record's
   CRC-32 is checked by the tier); the bytes of the last group and of a few chunks fetched
   again are compared with their sources. The baseline is the raw sequential bandwidth of the
   same filesystem for the same total bytes, in the same run, timed around the process::

       dd if=/dev/zero of=FILE bs=4M count=N oflag=direct     (a fresh file each time)
       dd if=FILE of=/dev/null bs=4M iflag=direct

   If the filesystem refuses O_DIRECT, dd runs buffered (``conv=fsync`` for the write) and says
   so; its read then likely comes from the page cache. The tier's mode is its own
   (``describe()["direct_io"]``). Reported: GB/s and the ratios native/dd, python/dd and
   native/python per direction. One untimed warm-up round precedes the ``--repeat`` rounds.

2. Restart. A tier directory of N records (default 100K and 1M; ``--quick``: 1K and 10K) is
   built without writing N payloads: sealed segments of 256 records as sparse files, each with
   a valid ``.idx`` index file, plus one unsealed segment of 64 real records written through a
   DiskTier (so the header-scan path runs too). Then ``DiskTier(...)`` construction is timed
   (wall, its ``rebuild_seconds``, and the CPU time of the constructing thread, which other
   processes on a busy machine do not inflate); every record must be restored. Target: < 2 s for 1M
   records (the ratio "target/wall" is >= 1 when met; smaller N: the target scaled linearly).
   ``--profile`` prints a cProfile of one rebuild of the largest N to stderr.

    python bench/disk.py [--quick] [--json] [--repeat N] [--dir DIR] [--chunks N]
        [--chunk-mib S] [--batch B] [--restart-records 100000,1000000] [--profile]
"""

from __future__ import annotations

import cProfile
import os
import pstats
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from _harness import Row, Stats, parser, report

from kvortex import backend
from kvortex.memory import HostSlabPool
from kvortex.tiers.disk import DiskTier
from kvortex.tiers.records import ENTRY_DTYPE, namespace_fingerprint, pack_index, record_bytes

MiB = 1 << 20
DD_BLOCK = 4 * MiB
NAMESPACE = b"bench"
SEGMENT_RECORDS = 256  # records per sealed segment in the restart directory
TAIL_RECORDS = 64  # real records in the unsealed last segment
RESTART_PAYLOAD = 4096
TARGET_S_PER_MILLION = 2.0


def note(message: str) -> None:
    print(f"# {message}", file=sys.stderr)


# -- 1. throughput ------------------------------------------------------------------------------


class DD:
    """The baseline: sequential dd of ``total`` bytes in 4 MiB blocks, O_DIRECT unless refused."""

    def __init__(self, directory: Path, total: int) -> None:
        self.path = directory / "dd.bin"
        self.count = -(-total // DD_BLOCK)
        self.bytes = self.count * DD_BLOCK
        self.direct = True

    def _run(self, args: list[str]) -> tuple[float, subprocess.CompletedProcess[str]]:
        t0 = time.perf_counter()
        proc = subprocess.run(["dd", *args], capture_output=True, text=True)
        return time.perf_counter() - t0, proc

    def _timed(self, args: list[str], direct_flag: str, buffered_flags: list[str]) -> float:
        if self.direct:
            seconds, proc = self._run([*args, direct_flag])
            if proc.returncode == 0:
                return seconds
            if "Invalid argument" not in proc.stderr:
                raise RuntimeError(f"dd failed: {proc.stderr.strip()}")
            self.direct = False
            note(
                f"dd {direct_flag} refused in {self.path.parent} ({proc.stderr.strip()}); "
                "dd runs buffered: write with conv=fsync, read likely from the page cache"
            )
        seconds, proc = self._run([*args, *buffered_flags])
        if proc.returncode != 0:
            raise RuntimeError(f"dd failed: {proc.stderr.strip()}")
        return seconds

    def write(self) -> float:
        self.path.unlink(missing_ok=True)  # a fresh file, as the tier appends to fresh segments
        args = ["if=/dev/zero", f"of={self.path}", "bs=4M", f"count={self.count}"]
        return self._timed(args, "oflag=direct", ["conv=fsync"])

    def read(self) -> float:
        return self._timed([f"if={self.path}", "of=/dev/null", "bs=4M"], "iflag=direct", [])

    def cleanup(self) -> None:
        self.path.unlink(missing_ok=True)


class TierBench:
    """Write and read ``chunks`` chunks through a DiskTier of one backend, in fresh directories."""

    def __init__(
        self,
        impl: str,
        base: Path,
        pool: HostSlabPool,
        src: list[int],
        dst: list[int],
        chunks: int,
        rng: np.random.Generator,
    ) -> None:
        self.impl, self.base, self.pool = impl, base, pool
        self.src, self.dst, self.chunks, self.rng = src, dst, chunks, rng
        self.chunk = pool.slot_bytes
        self.describe: dict[str, object] = {}

    def round(self) -> tuple[float, float]:
        """One write of every chunk and one read back, each timed; verified."""
        directory = Path(tempfile.mkdtemp(prefix=f"tier-{self.impl}-", dir=self.base))
        capacity = 2 * max(self.chunks, 16) * record_bytes(self.chunk)
        tier = DiskTier(
            directory, capacity, NAMESPACE, self.chunk, admission="all", backend=self.impl
        )
        try:
            keys = [self.rng.bytes(32) for _ in range(self.chunks)]
            write_s = self._write(tier, keys)
            read_s = self._read(tier, keys)
            self._spot_check(tier, keys)
            self.describe = tier.describe()
            assert tier.faults == 0, f"{tier.faults} disk faults"
        finally:
            tier.close()
            shutil.rmtree(directory, ignore_errors=True)
        return write_s, read_s

    def _source(self, i: int) -> int:
        return self.src[i % len(self.src)]

    def _write(self, tier: DiskTier, keys: list[bytes]) -> float:
        ok: list[bool] = []
        batch = len(self.src)
        t0 = time.perf_counter()
        for start in range(0, self.chunks, batch):
            offered = [
                (keys[i], self.pool.address(self._source(i)))
                for i in range(start, min(start + batch, self.chunks))
            ]
            admitted = tier.offer(offered, lambda _keys, good: ok.extend(good))
            assert len(admitted) == len(offered), "admission 'all' must admit every new chunk"
        tier.wait_idle()
        seconds = time.perf_counter() - t0
        assert len(ok) == self.chunks and all(ok), f"{ok.count(False)} chunk writes failed"
        return seconds

    def _read(self, tier: DiskTier, keys: list[bytes]) -> float:
        for slot in self.dst:
            self.pool.view(slot)[:] = bytes(self.chunk)
        ok: list[bool] = []
        group = len(self.dst)
        addresses = [self.pool.address(s) for s in self.dst]
        t0 = time.perf_counter()
        for start in range(0, self.chunks, group):
            part = keys[start : start + group]
            tier.fetch(part, addresses[: len(part)], ok.extend)
        tier.wait_idle()
        seconds = time.perf_counter() - t0
        assert len(ok) == self.chunks and all(ok), f"{ok.count(False)} chunk reads failed"
        last = range((self.chunks - 1) // group * group, self.chunks)
        for n, i in enumerate(last):
            self._compare(self.dst[n], i)
        return seconds

    def _spot_check(self, tier: DiskTier, keys: list[bytes]) -> None:
        """Fetch a few chunks again into cleared slots and compare every byte."""
        picks = sorted({int(i) for i in self.rng.integers(0, self.chunks, 3)})
        slots = self.dst[: len(picks)]
        for slot in slots:
            self.pool.view(slot)[:] = bytes(self.chunk)
        ok: list[bool] = []
        tier.fetch([keys[i] for i in picks], [self.pool.address(s) for s in slots], ok.extend)
        tier.wait_idle()
        assert ok == [True] * len(picks), ok
        for slot, i in zip(slots, picks, strict=True):
            self._compare(slot, i)

    def _compare(self, slot: int, chunk_index: int) -> None:
        got = np.frombuffer(self.pool.view(slot), dtype=np.uint8)
        want = np.frombuffer(self.pool.view(self._source(chunk_index)), dtype=np.uint8)
        assert np.array_equal(got, want), f"chunk {chunk_index} read back other bytes"


def throughput(
    base: Path, chunks: int, chunk: int, batch: int, repeat: int
) -> tuple[list[Row], dict[str, float], str]:
    impls = ["python"]
    reason = backend.native_reason("disk")
    if reason:
        note(f"native disk I/O unavailable, skipped: {reason}")
    else:
        impls.insert(0, "native")
    total = chunks * chunk
    rng = np.random.default_rng(0)
    samples: dict[tuple[str, str], list[float]] = {}
    dd = DD(base, total)
    with HostSlabPool(chunk, 2 * batch, backend="python") as pool:
        slots = [pool.alloc() for _ in range(2 * batch)]
        assert None not in slots
        src = [s for s in slots[:batch] if s is not None]
        dst = [s for s in slots[batch:] if s is not None]
        for slot in src:
            pool.view(slot)[:] = rng.bytes(chunk)
        tiers = {impl: TierBench(impl, base, pool, src, dst, chunks, rng) for impl in impls}
        try:
            for r in range(repeat + 1):  # round 0 warms up
                timed = {"dd": (dd.write(), dd.read())}
                dd.cleanup()
                for impl, bench in tiers.items():
                    timed[impl] = bench.round()
                if r:
                    for impl, (write_s, read_s) in timed.items():
                        samples.setdefault(("write", impl), []).append(write_s)
                        samples.setdefault(("read", impl), []).append(read_s)
        finally:
            dd.cleanup()
    rows, gbps = [], {}
    for case in ("write", "read"):
        for impl in ("dd", *impls):
            stats = Stats.of(samples[case, impl])
            nbytes = dd.bytes if impl == "dd" else total
            gbps[case, impl] = nbytes / stats.median / 1e9
            label = impl if impl == "dd" else f"DiskTier {impl}"
            rows.append(Row(case, label, stats, {"GB/s": gbps[case, impl]}))
    ratios: dict[str, float] = {}
    for case in ("write", "read"):
        for impl in impls:
            ratios[f"{case} {impl}/dd"] = gbps[case, impl] / gbps[case, "dd"]
        if "native" in impls:
            ratios[f"{case} native/python"] = gbps[case, "native"] / gbps[case, "python"]
    modes = ", ".join(
        f"{impl} {'O_DIRECT' if t.describe.get('direct_io') else 'buffered'}"
        for impl, t in tiers.items()
    )
    fs = next(iter(tiers.values())).describe.get("filesystem", "?")
    summary = f"dd {'O_DIRECT' if dd.direct else 'buffered'}, tier {modes}, {fs}"
    return rows, ratios, summary


# -- 2. restart ---------------------------------------------------------------------------------


def build_restart_dir(directory: Path, records: int, rng: np.random.Generator) -> tuple[int, bytes]:
    """A tier directory of ``records`` records: sparse sealed segments with index files, then
    an unsealed segment of real records. Returns (capacity, the keys concatenated)."""
    rb = record_bytes(RESTART_PAYLOAD)
    tail = min(TAIL_RECORDS, records)
    sealed = records - tail
    segments = -(-sealed // SEGMENT_RECORDS)
    # Room for everything, and enough that the tier cuts 256-record segments (capacity / 16).
    capacity = max((segments + 2) * SEGMENT_RECORDS * rb, 2 * 16 * SEGMENT_RECORDS * rb)
    keys = rng.bytes(32 * records)
    ns = np.frombuffer(namespace_fingerprint(NAMESPACE), dtype="V16")[0]
    for seg, start in enumerate(range(0, sealed, SEGMENT_RECORDS)):
        n = min(SEGMENT_RECORDS, sealed - start)
        entries = np.zeros(n, dtype=ENTRY_DTYPE)
        entries["ns"] = ns
        entries["key"] = np.frombuffer(keys, dtype="V32", count=n, offset=32 * start)
        entries["offset"] = np.arange(n, dtype=np.uint64) * rb
        entries["payload"] = RESTART_PAYLOAD
        entries["seq"] = np.arange(start, start + n, dtype=np.uint64)
        with open(directory / f"seg-{seg:012d}.kvx", "wb") as f:
            f.truncate(n * rb)  # sparse: no payload is ever read on restart
        (directory / f"seg-{seg:012d}.idx").write_bytes(pack_index(entries))
    tier = DiskTier(directory, capacity, NAMESPACE, RESTART_PAYLOAD, admission="all")
    try:
        assert tier.restored == sealed, (tier.restored, sealed)
        with HostSlabPool(RESTART_PAYLOAD, 1, backend="python") as pool:
            slot = pool.alloc()
            assert slot is not None
            pool.view(slot)[:] = rng.bytes(RESTART_PAYLOAD)
            ok: list[bool] = []
            chunks = [
                (keys[32 * i : 32 * i + 32], pool.address(slot)) for i in range(sealed, records)
            ]
            tier.offer(chunks, lambda _keys, good: ok.extend(good))
            tier.wait_idle()
            assert ok == [True] * tail, ok
    finally:
        tier.close()
    unsealed = directory / f"seg-{segments:012d}.kvx"
    assert unsealed.exists() and not unsealed.with_suffix(".idx").exists(), "tail must be unsealed"
    return capacity, keys


def open_tier(
    directory: Path, capacity: int, records: int, keys: bytes
) -> tuple[float, float, float]:
    """Construct the tier (timed), check what it restored, close it: (wall s, rebuild s, CPU
    s of this thread: the wall time less what other processes took of the core)."""
    c0, t0 = time.thread_time(), time.perf_counter()
    tier = DiskTier(directory, capacity, NAMESPACE, RESTART_PAYLOAD, admission="all")
    wall, cpu = time.perf_counter() - t0, time.thread_time() - c0
    try:
        assert tier.restored == records, (tier.restored, records)
        for i in (0, records // 2, records - 1):
            assert tier.match([keys[32 * i : 32 * i + 32]]) == 1, f"record {i} not restored"
        return wall, tier.rebuild_seconds, cpu
    finally:
        tier.close()


def restart(
    base: Path, counts: Sequence[int], repeat: int, profile: bool
) -> tuple[list[Row], dict[str, float]]:
    rows, ratios = [], {}
    rng = np.random.default_rng(1)
    for records in counts:
        directory = Path(tempfile.mkdtemp(prefix=f"restart-{records}-", dir=base))
        try:
            capacity, keys = build_restart_dir(directory, records, rng)
            open_tier(directory, capacity, records, keys)  # warm-up
            timed = [open_tier(directory, capacity, records, keys) for _ in range(repeat)]
            if profile and records == max(counts):
                print_profile(directory, capacity, records)
        finally:
            shutil.rmtree(directory, ignore_errors=True)
        wall = Stats.of([w for w, _, _ in timed])
        rebuild = Stats.of([r for _, r, _ in timed])
        cpu = Stats.of([c for _, _, c in timed])
        target = TARGET_S_PER_MILLION * records / 1e6
        label = _count(records)
        rows.append(
            Row(
                f"restart {label} records",
                "DiskTier()",
                wall,
                {
                    "rebuild s": rebuild.median,
                    "CPU s": cpu.median,
                    "records/s": records / wall.median,
                    "target s": target,
                },
            )
        )
        ratios[f"restart {label} target/wall ({target:g} s)"] = target / wall.median
        met = "meets" if wall.median < target else "MISSES"
        note(
            f"restart of {label} records: {wall.median:.3f} s ({cpu.median:.3f} s CPU), "
            f"{met} the {target:g} s target"
        )
    return rows, ratios


def print_profile(directory: Path, capacity: int, records: int, top: int = 15) -> None:
    prof = cProfile.Profile()
    prof.enable()
    tier = DiskTier(directory, capacity, NAMESPACE, RESTART_PAYLOAD, admission="all")
    prof.disable()
    restored, seconds = tier.restored, tier.rebuild_seconds
    tier.close()
    stats = pstats.Stats(prof)
    entries = sorted(stats.stats.items(), key=lambda kv: kv[1][2], reverse=True)  # type: ignore[attr-defined]
    print(
        f"# cProfile of one restart, {restored} records (rebuild {seconds:.3f} s under the "
        f"profiler), top {top} by own time: file:line:function  calls  own s  cumulative s",
        file=sys.stderr,
    )
    root = str(Path(__file__).resolve().parents[1]) + os.sep
    for (file, line, func), (_cc, calls, own, cum, _callers) in entries[:top]:
        where = f"{file.removeprefix(root)}:{line}:{func}"
        print(f"#   {where}  {calls}  {own:.3f}  {cum:.3f}", file=sys.stderr)


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**30:g} GiB" if nbytes >= 2**30 else f"{nbytes / MiB:g} MiB"


def _count(n: int) -> str:
    if n % 1_000_000 == 0:
        return f"{n // 1_000_000}M"
    if n % 1000 == 0:
        return f"{n // 1000}K"
    return str(n)


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--dir", type=Path, default=None, help="parent of the work directory (/tmp)")
    p.add_argument("--chunks", type=int, default=None, help="chunks written (default 128)")
    p.add_argument("--chunk-mib", type=int, default=None, help="MiB per chunk (default 32)")
    p.add_argument("--batch", type=int, default=None, help="chunks per offer/fetch (default 8)")
    p.add_argument(
        "--restart-records",
        default=None,
        help="record counts of the restart cases, comma separated (default 100000,1000000)",
    )
    p.add_argument("--profile", action="store_true", help="cProfile the largest restart")
    args = p.parse_args()
    chunks = args.chunks or (8 if args.quick else 128)
    chunk = (args.chunk_mib or (1 if args.quick else 32)) * MiB
    batch = min(chunks, args.batch or (4 if args.quick else 8))
    default_counts = "1000,10000" if args.quick else "100000,1000000"
    counts = [int(c) for c in (args.restart_records or default_counts).split(",")]
    if chunks < 1 or chunk < 1 or batch < 1 or min(counts) < 1:
        p.error("--chunks, --chunk-mib, --batch and --restart-records must be >= 1")
    repeat = args.repeat or (2 if args.quick else 3)
    parent = args.dir or Path("/tmp")
    free = shutil.disk_usage(parent).free
    if free < 1.2 * chunks * chunk + 256 * MiB:
        p.error(f"{parent} has {free / 1e9:.1f} GB free; the run needs {chunks * chunk / 1e9:.1f}")
    base = Path(tempfile.mkdtemp(prefix="kvortex-bench-disk-", dir=parent))
    try:
        rows, ratios, modes = throughput(base, chunks, chunk, batch, repeat)
        restart_rows, restart_ratios = restart(base, counts, repeat, args.profile)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    rows += restart_rows
    ratios.update(restart_ratios)
    title = (
        f"disk tier, {chunks} x {chunk // MiB} MiB chunks ({_size(chunks * chunk)}), "
        f"batches of {batch}; {modes}; in {parent}"
    )
    report(title, rows, ratios, args.json)


if __name__ == "__main__":
    main()
