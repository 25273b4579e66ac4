"""The disk tier (L2): format, index, and the engine with real files and real processes.

Every engine test runs over both backends (the I/O and CRC hot path follows the engine's
``backend``). Corruption, truncation, deletion and ``kill -9`` must read as misses, never as
wrong bytes.
"""

from __future__ import annotations

import ctypes
import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from kv_layouts import LAYOUTS, fill_random

from kvortex.engine import KVortexEngine
from kvortex.errors import ConfigError, InvalidArgumentError
from kvortex.layout import PagedLayout
from kvortex.tiers.disk import DiskTier, DiskTierError
from kvortex.tiers.disk_index import DiskIndex, Location
from kvortex.tiers.records import (
    ENTRY_DTYPE,
    HEADER_BYTES,
    Header,
    pack_header,
    pack_index,
    record_bytes,
    unpack_header,
    unpack_index,
)

L, B, N, H, D = 2, 96, 16, 2, 8
CHUNK = 32  # two blocks per chunk


# -- format -----------------------------------------------------------------------------------


def test_header_round_trip_and_every_bit_flip_is_caught() -> None:
    h = Header(b"n" * 16, bytes(range(32)), 123_456, 0xDEADBEEF, 42)
    raw = pack_header(h)
    assert len(raw) == HEADER_BYTES and unpack_header(raw) == h
    for bit in range(0, 92 * 8, 7):
        flipped = bytearray(raw)
        flipped[bit // 8] ^= 1 << (bit % 8)
        assert unpack_header(bytes(flipped)) is None, bit
    assert unpack_header(bytes(HEADER_BYTES)) is None
    assert record_bytes(1) == 2 * 4096 and record_bytes(4096) == 2 * 4096


def test_index_file_round_trip_and_damage() -> None:
    entries = np.array(
        [(b"n" * 16, bytes([i]) * 32, i * 8192, 4096, i) for i in range(5)], dtype=ENTRY_DTYPE
    )
    raw = pack_index(entries)
    back = unpack_index(raw)
    assert back is not None and back.tobytes() == entries.tobytes()
    assert unpack_index(raw[:-1]) is None
    damaged = bytearray(raw)
    damaged[20] ^= 4
    assert unpack_index(bytes(damaged)) is None


# -- index ------------------------------------------------------------------------------------


def test_index_allocates_commits_and_evicts_whole_segments() -> None:
    rec = record_bytes(4096)
    index = DiskIndex(4 * 2 * rec, 2 * rec)  # 4 segments of 2 records
    keys = [bytes([i]) * 32 for i in range(12)]
    for i, key in enumerate(keys):
        loc, evicted = index.allocate(key, 4096, rec)
        assert loc.segment == i // 2 and loc.offset == (i % 2) * rec
        assert evicted == ([(i // 2) - 4] if i % 2 == 0 and i >= 8 else [])
        assert index.match(keys[i : i + 1]) == 0  # pending: not matchable
        index.commit(key, loc, ok=True)
        assert index.used <= index.capacity
    assert index.match(keys) == 0 and index.match(keys[4:]) == 8
    assert index.segments == [2, 3, 4, 5]
    failed, evicted = index.allocate(b"f" * 32, 4096, rec)
    assert evicted == [2]  # the oldest segment goes, keys 4 and 5 with it
    index.commit(b"f" * 32, failed, ok=False)
    assert b"f" * 32 not in index and index.match(keys[4:]) == 0
    index.drop(keys[11])
    assert index.match(keys[6:]) == 5


def test_seen_twice_admission() -> None:
    index = DiskIndex(1 << 30, 1 << 24, admission="seen-twice")
    assert not index.admit(b"a" * 32)
    assert index.admit(b"a" * 32)
    loc, _ = index.allocate(b"a" * 32, 10, record_bytes(10))
    assert not index.admit(b"a" * 32)  # being written
    index.commit(b"a" * 32, loc, ok=True)
    assert not index.admit(b"a" * 32)  # stored
    assert index.admission_rejects == 1
    with pytest.raises(InvalidArgumentError):
        DiskIndex(1 << 30, 1 << 24, admission="sometimes")


def test_restore_keeps_the_newest_copy() -> None:
    index = DiskIndex(1 << 30, 1 << 24)
    key = b"k" * 32
    index.restore(0, 8192, [key], [0], [4096], [7])
    index.restore(1, 8192, [key], [0], [4096], [3])  # older copy, newer segment
    assert index.location(key) == Location(0, 0, 4096, 7)
    loc, _ = index.allocate(b"x" * 32, 4096, 8192)
    assert loc.seq == 8 and loc.segment == 2


# -- the engine with a disk tier ----------------------------------------------------------------


@pytest.fixture(autouse=True)
def small_segments(monkeypatch: pytest.MonkeyPatch) -> None:
    """Four records a segment, so a few prompts fill, close, seal and evict segments."""
    import kvortex.tiers.disk

    monkeypatch.setattr(kvortex.tiers.disk, "_MAX_SEGMENT_RECORDS", 4)


def make_engine(
    disk: Path, backend: str, *, l1_chunks: int = 8, disk_bytes: int = 64 << 20, **cfg: object
) -> KVortexEngine:
    kv = LAYOUTS["lbnhc"](L, B, N, H, D, torch.float16, "cpu")
    fill_random(kv, seed=3)
    chunk_bytes = PagedLayout.from_kv_caches(kv, N).chunk_bytes(CHUNK // N)
    engine = KVortexEngine(
        {
            "chunk_tokens": CHUNK,
            "cpu_bytes": chunk_bytes * l1_chunks,
            "disk_path": str(disk),
            "disk_bytes": disk_bytes,
            "disk_admission": "all",
            "backend": backend,
            **cfg,
        },
        model="disk-test",
    )
    engine.register_kv_caches(kv, N)
    return engine


def prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(100_000) for _ in range(n)]


def blocks_bytes(engine: KVortexEngine, blocks: list[int]) -> list[bytes]:
    layout = engine.layout
    assert layout is not None
    return [
        ctypes.string_at(p.base + b * p.block_stride, layout.page_bytes)
        for b in blocks
        for p in layout.planes
    ]


def garble(engine: KVortexEngine, blocks: list[int]) -> None:
    layout = engine.layout
    assert layout is not None
    for b in blocks:
        for p in layout.planes:
            ctypes.memset(p.base + b * p.block_stride, 0x5A, layout.page_bytes)


def settle(engine: KVortexEngine) -> None:
    assert engine.disk is not None
    assert engine.disk.wait_idle(30)


def store_many(engine: KVortexEngine, count: int, tokens: int = 128) -> dict[int, list[bytes]]:
    """Store ``count`` prompts (4 chunks each) from blocks 0..7 with fresh contents; return
    each prompt's expected bytes."""
    expected = {}
    src = list(range(tokens // N))
    for seed in range(count):
        fill_block_values(engine, src, seed)
        expected[seed] = blocks_bytes(engine, src)
        engine.store(prompt(tokens, seed), src).wait(30)
        settle(engine)  # requests arrive slower than the disk writes
    return expected


def fill_block_values(engine: KVortexEngine, blocks: list[int], seed: int) -> None:
    layout = engine.layout
    assert layout is not None
    rng = np.random.default_rng(seed)
    for b in blocks:
        for p in layout.planes:
            data = rng.integers(0, 256, layout.page_bytes, dtype=np.uint8).tobytes()
            ctypes.memmove(p.base + b * p.block_stride, data, layout.page_bytes)


def check_retrieve(
    engine: KVortexEngine, seed: int, expected: list[bytes], tokens: int = 128
) -> int:
    """Retrieve a stored prompt into other blocks; every loaded block must hold the expected
    bytes (never wrong ones). Returns tokens loaded."""
    dst = list(range(40, 40 + tokens // N))
    garble(engine, dst)
    r = engine.retrieve(prompt(tokens, seed), dst)
    r.wait(30)
    loaded = r.tokens // N
    got = blocks_bytes(engine, dst[:loaded])
    planes = engine.layout.num_planes  # type: ignore[union-attr]
    assert got == expected[: loaded * planes]
    return r.tokens


def test_hits_come_from_disk_when_l1_is_too_small(tmp_path: Path, engine_backend: str) -> None:
    with make_engine(tmp_path, engine_backend) as engine:
        expected = store_many(engine, 6)  # 24 chunks through an L1 of 8
        assert engine.disk is not None and engine.disk.written == 24
        for seed in range(6):
            assert engine.lookup(prompt(128, seed)) == 128
            assert check_retrieve(engine, seed, expected[seed]) == 128
        assert engine.disk.read_chunks >= 20
        assert engine.directory is not None and engine.directory.used == engine.pool.used  # type: ignore[union-attr]


def test_seen_twice_admission_in_the_engine(tmp_path: Path, engine_backend: str) -> None:
    with make_engine(tmp_path, engine_backend, disk_admission="seen-twice") as engine:
        disk = engine.disk
        assert disk is not None
        p = prompt(128, 1)
        engine.store(p, list(range(8))).wait(30)
        settle(engine)
        assert disk.written == 0  # one-off so far
        r = engine.retrieve(p, list(range(40, 48)))  # the second use (an L1 hit) admits it
        r.wait(30)
        settle(engine)
        assert disk.written == 4 and disk.match(engine._keys(p)) == 4


def test_restart_serves_from_disk(tmp_path: Path, engine_backend: str) -> None:
    with make_engine(tmp_path, engine_backend) as engine:
        expected = store_many(engine, 3)
    with make_engine(tmp_path, engine_backend) as again:
        assert again.disk is not None and again.disk.restored == 12
        for seed in range(3):
            assert again.lookup(prompt(128, seed)) == 128
            assert check_retrieve(again, seed, expected[seed]) == 128
    other = KVortexEngine(
        {
            "chunk_tokens": CHUNK,
            "cpu_bytes": "1MiB",
            "disk_path": str(tmp_path),
            "backend": engine_backend,
        },
        model="another-model",
    )
    kv = LAYOUTS["lbnhc"](L, B, N, H, D, torch.float16, "cpu")
    other.register_kv_caches(kv, N)
    with other:  # another namespace: the records are ignored
        assert other.disk is not None and other.disk.restored == 0
        assert other.lookup(prompt(128, 0)) == 0


def test_one_process_owns_the_directory(tmp_path: Path, engine_backend: str) -> None:
    with make_engine(tmp_path, engine_backend), pytest.raises(DiskTierError, match="in use"):
        make_engine(tmp_path, engine_backend)


def segment_files(path: Path) -> list[Path]:
    return sorted(path.glob("seg-*.kvx"))


@pytest.mark.parametrize("damage", ["payload", "header", "truncate", "delete", "index"])
def test_corruption_is_a_miss_never_wrong_bytes(
    tmp_path: Path, engine_backend: str, damage: str
) -> None:
    with make_engine(tmp_path, engine_backend) as engine:
        expected = store_many(engine, 4)
    seg = segment_files(tmp_path)[0]
    raw = bytearray(seg.read_bytes())
    if damage == "payload":
        raw[HEADER_BYTES + 100] ^= 0x10
        seg.write_bytes(bytes(raw))
    elif damage == "header":
        raw[40] ^= 0x01  # inside the chunk key
        seg.write_bytes(bytes(raw))
        seg.with_suffix(".idx").unlink(missing_ok=True)  # make the restart scan the headers
    elif damage == "truncate":
        seg.write_bytes(bytes(raw[: len(raw) // 2 + 1000]))
    elif damage == "delete":
        seg.unlink()
    else:
        idx = seg.with_suffix(".idx")
        assert idx.exists()  # a closed segment is sealed
        idx.write_bytes(b"garbage" + idx.read_bytes()[7:])
    with make_engine(tmp_path, engine_backend) as again:
        for seed in range(4):
            check_retrieve(again, seed, expected[seed])  # loads only right bytes
        if damage != "index":
            total = sum(again.lookup(prompt(128, s)) for s in range(4))
            assert total < 4 * 128
        else:
            assert all(again.lookup(prompt(128, s)) == 128 for s in range(4))


def test_segment_deleted_while_running_is_a_miss(tmp_path: Path, engine_backend: str) -> None:
    with make_engine(tmp_path, engine_backend) as engine:
        expected = store_many(engine, 4)
        for seg in segment_files(tmp_path):
            with open(seg, "r+b") as f:
                f.truncate(0)
        for seed in range(4):
            check_retrieve(engine, seed, expected[seed])
        assert engine.disk is not None and engine.disk.faults > 0


def test_small_disk_under_a_long_random_workload(tmp_path: Path, engine_backend: str) -> None:
    """A tiny disk_bytes: segments are evicted all the time; nothing escapes, accounting stays
    exact (the index's bytes are the files' bytes, within the capacity)."""
    with make_engine(tmp_path, engine_backend, disk_bytes=64 << 20) as engine:
        disk = engine.disk
        assert disk is not None
        disk.index.capacity = 40 * disk.record_bytes  # far below the workload
        rng = random.Random(9)
        expected = {}
        src = list(range(8))
        for step in range(150):
            seed = rng.randrange(40)
            if rng.random() < 0.6:
                fill_block_values(engine, src, seed)
                expected[seed] = blocks_bytes(engine, src)
                engine.store(prompt(128, seed), src).wait(30)
            elif seed in expected:
                check_retrieve(engine, seed, expected[seed])
            if step % 25 == 0:
                settle(engine)
                on_disk = sum(p.stat().st_size for p in segment_files(tmp_path))
                assert on_disk == disk.index.used <= disk.index.capacity
        settle(engine)
        assert disk.faults == 0


def test_disk_config_errors(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    kv = LAYOUTS["lbnhc"](L, B, N, H, D, torch.float16, "cpu")
    engine = KVortexEngine(
        {"chunk_tokens": CHUNK, "cpu_bytes": "1MiB", "disk_path": str(blocker / "sub")}
    )
    with pytest.raises(DiskTierError, match="unusable"):
        engine.register_kv_caches(kv, N)
    assert engine.pool is None  # nothing leaked
    with pytest.raises(ConfigError, match="disk_bytes"):
        KVortexEngine({"disk_bytes": "1MiB"})
    with pytest.raises(ConfigError, match="disk_admission"):
        KVortexEngine({"disk_admission": "maybe"})
    with pytest.raises(ConfigError, match="disk_bytes"):
        DiskTier(tmp_path / "t", 1 << 16, b"ns", 1 << 20)


# -- kill -9 ------------------------------------------------------------------------------------

_WRITER = """
import random, sys, torch
sys.path.insert(0, {tests!r})
from kv_layouts import LAYOUTS
from kvortex.engine import KVortexEngine
from kvortex.layout import PagedLayout

kv = LAYOUTS["lbnhc"]({L}, {B}, {N}, {H}, {D}, torch.float16, "cpu")
chunk = PagedLayout.from_kv_caches(kv, {N}).chunk_bytes(2)
engine = KVortexEngine({{"chunk_tokens": 32, "cpu_bytes": chunk * 16, "disk_path": {path!r},
                        "disk_admission": "all", "backend": {backend!r}}}, model="kill-test")
engine.register_kv_caches(kv, {N})
print("ready", flush=True)
seed = 0
while True:
    seed += 1
    for b in range(8):  # block b of prompt `seed` holds the byte (seed * 8 + b) % 251
        kv_value = float((seed * 8 + b) % 251)
        for t in kv.values():
            t[b].fill_(kv_value)
    rng = random.Random(seed)
    tokens = [rng.randrange(100_000) for _ in range(128)]  # as prompt(128, seed)
    engine.store(tokens, list(range(8))).wait(30)
"""


def test_kill_9_leaves_only_complete_records(tmp_path: Path, engine_backend: str) -> None:
    tests = str(Path(__file__).resolve().parent)
    rng = random.Random(1)
    for round_ in range(4):
        code = _WRITER.format(
            tests=tests, L=L, B=B, N=N, H=H, D=D, path=str(tmp_path), backend=engine_backend
        )
        proc = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(code)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip() == "ready", proc.stderr.read() if proc.stderr else ""
        try:
            proc.wait(timeout=0.3 + rng.random() * 1.2)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        assert proc.returncode == -signal.SIGKILL, round_
        proc.stdout.close()
        assert proc.stderr is not None
        proc.stderr.close()
    # Restart: every chunk served holds exactly the bytes its prompt stored.
    kv = LAYOUTS["lbnhc"](L, B, N, H, D, torch.float16, "cpu")
    chunk = PagedLayout.from_kv_caches(kv, N).chunk_bytes(2)
    engine = KVortexEngine(
        {
            "chunk_tokens": 32,
            "cpu_bytes": chunk * 2,
            "disk_path": str(tmp_path),
            "disk_admission": "all",
            "backend": engine_backend,
        },
        model="kill-test",
    )
    engine.register_kv_caches(kv, N)
    served = 0
    with engine:
        assert engine.disk is not None and engine.disk.restored > 0
        for seed in range(1, 400):
            tokens = prompt(128, seed)
            if engine.lookup(tokens) == 0:
                continue
            dst = list(range(40, 48))
            for t in kv.values():
                t[40:48].fill_(-1.0)
            r = engine.retrieve(tokens, dst)
            r.wait(30)
            for i in range(r.tokens // N):
                want = float((seed * 8 + i) % 251)
                assert all(bool((t[dst[i]] == want).all()) for t in kv.values()), (seed, i)
            served += r.tokens
    assert served > 0


def test_kvortex_info_shows_the_disk_tier(tmp_path: Path, engine_backend: str) -> None:
    from kvortex.config import KVortexConfig
    from kvortex.info import collect

    with make_engine(tmp_path, engine_backend) as engine:
        store_many(engine, 2)
    report = collect(
        KVortexConfig.from_dict({"disk_path": str(tmp_path), "disk_bytes": "1GiB"}),
        probe_cuda=False,
    )
    disk = report["disk_tier"]
    assert disk["enabled"] and disk["exists"] and disk["path"] == str(tmp_path)
    assert disk["filesystem"] not in ("", "unknown")
    assert disk["direct_io"] in (True, False)
    assert disk["capacity"] == 1 << 30
    on_disk = sum(p.stat().st_size for p in segment_files(tmp_path))
    assert disk["used"] == on_disk > 0 and disk["segments"] == len(segment_files(tmp_path))
    off = collect(KVortexConfig(), probe_cuda=False)["disk_tier"]
    assert off == {"enabled": False}
    missing = collect(
        KVortexConfig.from_dict({"disk_path": str(tmp_path / "not-yet")}), probe_cuda=False
    )["disk_tier"]
    assert missing["enabled"] and not missing["exists"] and missing["used"] == 0


def test_without_o_direct_the_tier_runs_buffered(
    tmp_path: Path, engine_backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A filesystem that refuses O_DIRECT (tmpfs before Linux 6.6, some network and FUSE
    filesystems): the tier runs on buffered I/O, and kvortex info says so. Here the probe is
    made to refuse, since this machine's filesystems accept O_DIRECT."""
    from kvortex import diskio
    from kvortex.config import KVortexConfig
    from kvortex.info import collect

    monkeypatch.setattr(diskio, "direct_io_supported", lambda directory: False)
    with make_engine(tmp_path, engine_backend) as engine:
        assert engine.disk is not None and engine.disk.describe()["direct_io"] is False
        expected = store_many(engine, 3)
        for seed in range(3):
            assert check_retrieve(engine, seed, expected[seed]) == 128
    report = collect(KVortexConfig.from_dict({"disk_path": str(tmp_path)}), probe_cuda=False)
    assert report["disk_tier"]["direct_io"] is False


def test_a_gap_in_host_memory_never_shifts_disk_chunks(tmp_path: Path, engine_backend: str) -> None:
    """Chunks 0-1 are being stored into host memory by someone else (reserved, not ready)
    while all four are on disk: a retrieve must not load chunk 2's bytes into chunk 0's
    blocks. It loads nothing rather than anything misplaced."""
    with make_engine(tmp_path, engine_backend) as engine:
        expected = store_many(engine, 3)  # prompt 0 is evicted from host memory (8 slots)
        assert engine.directory is not None and engine.disk is not None
        keys = engine._keys(prompt(128, 0))
        assert engine.directory.match(keys) == 0 and engine.disk.match(keys) == 4
        with engine._lock:
            pending = engine.directory.reserve_store(keys[:2])
        assert len(pending.chunks) == 2
        r = engine.retrieve(prompt(128, 0), list(range(40, 48)))
        r.wait(30)
        assert r.tokens == 0
        with engine._lock:
            engine.directory.commit_store(keys[:2], ok=False)
        assert check_retrieve(engine, 0, expected[0]) == 128  # and then it all comes back
