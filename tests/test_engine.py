from __future__ import annotations

import ctypes
import random

import pytest
import torch
from conftest import run_isolated
from kv_layouts import LAYOUTS, fill_random

from kvortex.engine import KVortexEngine
from kvortex.errors import EngineClosedError, InvalidArgumentError, NotRegisteredError
from kvortex.layout import PagedLayout

L, B, N, H, D = 2, 64, 16, 2, 8
CHUNK = 32  # two blocks per chunk


def engine_for(name: str, slots: int = 16, **config: object) -> tuple[KVortexEngine, PagedLayout]:
    kv = LAYOUTS[name](L, B, N, H, D, torch.float16, "cpu")
    fill_random(kv, seed=7)
    probe = PagedLayout.from_kv_caches(kv, N)
    cfg = {"chunk_tokens": CHUNK, "cpu_bytes": probe.chunk_bytes(CHUNK // N) * slots, **config}
    engine = KVortexEngine(cfg, model="test-model")
    engine.register_kv_caches(kv, N)
    assert engine.layout is not None
    return engine, engine.layout


def blocks_bytes(layout: PagedLayout, blocks: list[int]) -> list[bytes]:
    return [
        ctypes.string_at(p.base + b * p.block_stride, layout.page_bytes)
        for b in blocks
        for p in layout.planes
    ]


def garble(layout: PagedLayout, blocks: list[int]) -> None:
    for b in blocks:
        for p in layout.planes:
            ctypes.memset(p.base + b * p.block_stride, 0x5A, layout.page_bytes)


def prompt(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(128_000) for _ in range(n)]


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_round_trip_every_layout(name: str) -> None:
    engine, layout = engine_for(name)
    with engine:
        tokens = prompt(100)  # 3 full chunks + 4 tokens
        src = list(range(10, 17))  # 7 blocks hold 100 tokens
        dst = [40, 3, 50, 51, 2, 60, 61]
        expected = blocks_bytes(layout, src[:6])
        assert engine.lookup(tokens) == 0
        handle = engine.store(tokens, src)
        handle.wait(10)
        assert handle.stored_tokens == 96 and handle.skipped_tokens == 0 and not handle.truncated
        assert engine.lookup(tokens) == 96
        garble(layout, src + dst)
        r = engine.retrieve(tokens, dst)
        r.wait(10)
        assert r.tokens == 96
        assert blocks_bytes(layout, dst[:6]) == expected
        # Tokens beyond the retrieved prefix were not touched.
        assert blocks_bytes(layout, [dst[6]]) == [b"\x5a" * layout.page_bytes] * layout.num_planes


def test_lookup_is_prefix_and_chunk_aligned() -> None:
    engine, _ = engine_for("lbnhc")
    with engine:
        tokens = prompt(128)
        engine.store(tokens[:64], list(range(4))).wait(10)
        assert engine.lookup(tokens) == 64
        assert engine.lookup(tokens[:63]) == 32
        assert engine.lookup(tokens[:31]) == 0
        other = [tokens[0] + 1, *tokens[1:]]
        assert engine.lookup(other) == 0  # chained keys: a different first chunk shares nothing


def test_second_store_costs_no_copy() -> None:
    engine, _ = engine_for("blnhc")
    with engine:
        tokens = prompt(64)
        engine.store(tokens, [0, 1, 2, 3]).wait(10)
        used = engine.pool.used if engine.pool else -1
        again = engine.store(tokens, [4, 5, 6, 7])
        again.wait(10)
        assert again.stored_tokens == 0 and again.skipped_tokens == 64
        assert engine.pool is not None and engine.pool.used == used


def test_full_pool_evicts_and_oversized_request_is_truncated() -> None:
    engine, _ = engine_for("fa_nhd", slots=4)
    with engine:
        a, b = prompt(64, 1), prompt(64, 2)
        engine.store(a, [0, 1, 2, 3]).wait(10)
        engine.store(b, [4, 5, 6, 7]).wait(10)
        assert engine.lookup(a) == 64 and engine.lookup(b) == 64
        c = prompt(64, 3)
        engine.store(c, [8, 9, 10, 11]).wait(10)
        assert engine.lookup(c) == 64
        assert engine.lookup(a) + engine.lookup(b) == 64  # one of them was evicted
        big = prompt(32 * 10, 4)
        handle = engine.store(big, list(range(20, 40)))
        handle.wait(10)
        assert handle.truncated and handle.stored_tokens == 4 * 32
        assert engine.lookup(big) == 4 * 32


def test_bad_input() -> None:
    kv = LAYOUTS["lbnhc"](L, B, N, H, D, torch.float16, "cpu")
    engine = KVortexEngine({"chunk_tokens": CHUNK, "cpu_bytes": "1MiB"})
    assert engine.lookup(prompt(64)) == 0  # nothing registered: nothing stored
    with pytest.raises(NotRegisteredError):
        engine.store(prompt(64), [0, 1, 2, 3])
    with pytest.raises(NotRegisteredError):
        engine.retrieve(prompt(64), [0, 1, 2, 3])
    engine.register_kv_caches(kv, N)
    with engine:
        short = engine.store(prompt(20), [0, 1])
        short.wait(1)
        assert short.stored_tokens == 0 and engine.lookup(prompt(20)) == 0
        with pytest.raises(InvalidArgumentError, match="fill 4 blocks"):
            engine.store(prompt(64), [0, 1, 2])
        with pytest.raises(InvalidArgumentError, match="already"):
            engine.register_kv_caches(kv, N)
    with pytest.raises(EngineClosedError, match="closed"):
        engine.store(prompt(64), [0, 1, 2, 3])
    odd = KVortexEngine({"chunk_tokens": 24})
    with pytest.raises(InvalidArgumentError, match="multiple"):
        odd.register_kv_caches(kv, N)
    tiny = KVortexEngine({"chunk_tokens": CHUNK, "cpu_bytes": 100})
    with pytest.raises(InvalidArgumentError, match="cannot hold one chunk"):
        tiny.register_kv_caches(kv, N)


def test_memory_pressure_accounting_stays_exact() -> None:
    engine, _ = engine_for("flashinfer", slots=5, eviction="s3fifo")
    rng = random.Random(3)
    prefixes = [prompt(64, s) for s in range(6)]
    with engine:
        for step in range(300):
            tokens = rng.choice(prefixes) + prompt(rng.choice([0, 32, 64]), 100 + step)
            nblocks = -(-len(tokens) // N)
            start = rng.randrange(0, B - nblocks)
            ids = list(range(start, start + nblocks))
            if rng.random() < 0.5:
                engine.store(tokens, ids).wait(10)
            else:
                r = engine.retrieve(tokens, ids)
                r.wait(10)
                assert r.tokens % CHUNK == 0
            assert engine.directory is not None and engine.pool is not None
            assert engine.directory.used == engine.pool.used <= 5
            assert engine.lookup(tokens) <= len(tokens)


def test_concurrent_threads_no_corruption_no_deadlock() -> None:
    run_isolated(
        """
        import random, threading, torch
        from kvortex.engine import KVortexEngine
        from kvortex.layout import PagedLayout

        L, B, N = 2, 256, 16
        kv = {f"l{i}": torch.zeros(B, 2, N, 2, 8, dtype=torch.float16) for i in range(L)}
        engine = KVortexEngine({"chunk_tokens": 32, "cpu_bytes": 24 * 4 * 2 * 2048})
        engine.register_kv_caches(kv, N)
        layout = engine.layout
        prefixes = [[random.Random(s).randrange(1000) for _ in range(64)] for s in range(8)]

        def value(tokens, i):  # the KV a prompt's block i must hold: derived from its tokens
            return float(hash(tuple(tokens[: (i + 1) * N])) % 997)

        errors = []
        def worker(tid):
            rng = random.Random(tid)
            base = tid * 32  # each thread owns its blocks
            for _ in range(150):
                tokens = rng.choice(prefixes) + [rng.randrange(1000) for _ in range(32)]
                ids = list(range(base, base + 6))
                if rng.random() < 0.5:
                    for i, b in enumerate(ids):
                        for t in kv.values():
                            t[b].fill_(value(tokens, i))
                    engine.store(tokens, ids).wait(30)
                else:
                    for t in kv.values():
                        t[base : base + 6].fill_(-1.0)
                    r = engine.retrieve(tokens, ids)
                    r.wait(30)
                    for i in range(r.tokens // N):
                        for t in kv.values():
                            if not bool((t[ids[i]] == value(tokens, i)).all()):
                                errors.append((tid, i))
        threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
        for t in threads: t.start()
        for t in threads: t.join(120)
        assert not any(t.is_alive() for t in threads), "deadlock"
        assert not errors, errors[:5]
        assert engine.directory.used == engine.pool.used
        engine.close()
        print("ok")
        """,
        timeout=240,
    )
