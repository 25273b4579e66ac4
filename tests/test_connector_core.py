"""The connector's two halves without vLLM: plans flow from SchedulerSide to WorkerSide.

The vLLM-marked tests drive the same code through the real vLLM; these pin its contract
directly (chunk alignment, skipped pages, delayed free, verification of slot contents).
"""

from __future__ import annotations

import ctypes
import logging
import random
from typing import Any

import pytest
import torch
from kv_layouts import LAYOUTS, fill_random

from kvortex.config import KVortexConfig
from kvortex.errors import ConfigError, EngineClosedError, InvalidArgumentError, LayoutError
from kvortex.integrations.compat import vllm_version_note
from kvortex.integrations.scheduler import SchedulerSide
from kvortex.integrations.worker import WorkerSide
from kvortex.keys import Namespace
from kvortex.plan import ChunkOp, RequestOps, TransferPlan
from kvortex.stats import ActivityLog

L, B, N, H, D = 2, 64, 16, 2, 8
CHUNK = 32


def setup(name: str = "lbnhc", **cfg: object) -> tuple[SchedulerSide, WorkerSide, dict]:
    kv = LAYOUTS[name](L, B, N, H, D, torch.float16, "cpu")
    fill_random(kv, seed=1)
    config = KVortexConfig.from_dict({"chunk_tokens": CHUNK, "cpu_bytes": "1MiB", **cfg})
    worker = WorkerSide(config, N)
    worker.register(kv)
    assert worker.layout is not None
    chunk_bytes = worker.layout.chunk_bytes(CHUNK // N)
    sched = SchedulerSide(config, Namespace("m"), N, chunk_bytes, hold_blocks_while_loading=False)
    return sched, worker, kv


def run_step(sched: SchedulerSide, worker: WorkerSide) -> tuple[set[str], set[str], set[int]]:
    out = sched.step()
    worker.start(out.plan, out.async_loads, out.release_after_load, out.disk, out.rank_namespaces)
    worker.wait_sync_loads()
    sending, recving = worker.poll()
    errors = worker.take_load_errors()
    sched.on_worker_output(sending or (), recving or (), errors)
    return sending or set(), recving or set(), errors


def blocks_bytes(worker: WorkerSide, blocks: list[int]) -> list[bytes]:
    layout = worker.layout
    assert layout is not None
    return [
        ctypes.string_at(p.base + b * p.block_stride, layout.page_bytes)
        for b in blocks
        for p in layout.planes
    ]


def test_store_then_load_with_local_prefix_and_skip() -> None:
    sched, worker, _ = setup()
    tokens = [random.Random(0).randrange(1000) for _ in range(100)]
    src = list(range(0, 7))
    assert sched.matched_tokens("a", tokens, 100, 0) == (0, False)
    assert sched.finished("a", tokens, 100, src) is True  # 3 chunks to store: keep blocks
    sending, _, _ = run_step(sched, worker)
    assert sending == {"a"}
    expected = blocks_bytes(worker, src[:6])
    # Request b: same prompt; vLLM's own prefix cache already holds the first block (16 tokens).
    external, is_async = sched.matched_tokens("b", tokens, 101, 16)
    assert (external, is_async) == (96 - 16, False)
    dst = [20, 21, 22, 23, 24, 25, 26]
    sched.after_alloc("b", dst, external)
    for b in dst:
        for p in worker.layout.planes:  # type: ignore[union-attr]
            ctypes.memset(p.base + b * p.block_stride, 0x11, worker.layout.page_bytes)  # type: ignore[union-attr]
    run_step(sched, worker)
    got = blocks_bytes(worker, dst[:6])
    planes = worker.layout.num_planes  # type: ignore[union-attr]
    assert got[:planes] == [b"\x11" * worker.layout.page_bytes] * planes  # type: ignore[union-attr]
    assert got[planes:] == expected[planes:]
    assert sched.pinned_count() == 3
    assert sched.finished("b", tokens, 100, dst) is False  # nothing new to store
    assert sched.pinned_count() == 0


def test_sync_hit_never_covers_the_whole_prompt() -> None:
    sched, worker, _ = setup()
    tokens = list(range(64))
    sched.finished("a", tokens, 64, [0, 1, 2, 3])
    run_step(sched, worker)
    assert sched.matched_tokens("b", tokens, 64, 0) == (32, False)
    assert sched.matched_tokens("c", [*tokens, 5], 65, 0) == (64, False)


def test_async_threshold_and_finished_recving() -> None:
    sched, worker, _ = setup(async_load_min_tokens=32)
    tokens = list(range(80))
    sched.finished("a", tokens, 80, list(range(5)))
    run_step(sched, worker)
    external, is_async = sched.matched_tokens("b", tokens, 80, 0)
    assert (external, is_async) == (64, True)
    sched.after_alloc("b", list(range(10, 15)), external)
    _, recving, _ = run_step(sched, worker)
    assert recving == {"b"}


def test_load_of_a_slot_the_worker_never_stored_is_an_error() -> None:
    _, worker, _ = setup()
    before = blocks_bytes(worker, [40, 41])
    plan = TransferPlan(0, loads=(RequestOps("x", (ChunkOp(b"k" * 32, 3, (40, 41)),)),))
    worker.start(plan)
    assert worker.take_load_errors() == {40, 41}
    assert blocks_bytes(worker, [40, 41]) == before


def test_failed_load_drops_the_chunks_from_the_index() -> None:
    sched, worker, _ = setup()
    tokens = list(range(64))
    sched.finished("a", tokens, 64, [0, 1, 2, 3])
    run_step(sched, worker)
    worker._slot_keys.clear()  # the worker lost its host copy (e.g. a failed store)
    external, _ = sched.matched_tokens("b", [*tokens, 1], 65, 0)
    sched.after_alloc("b", [8, 9, 10, 11, 12], external)
    _, _, errors = run_step(sched, worker)
    assert errors == {8, 9, 10, 11}
    sched.finished("b", [*tokens, 1], 0, [8, 9, 10, 11, 12])
    assert sched.matched_tokens("c", [*tokens, 2], 65, 0) == (0, False)


def test_config_and_layout_mismatch() -> None:
    with pytest.raises(ConfigError, match="multiple"):
        SchedulerSide(
            KVortexConfig.from_dict({"chunk_tokens": 24}),
            Namespace("m"),
            16,
            1024,
            hold_blocks_while_loading=False,
        )
    kv = LAYOUTS["blnhc"](L, B, N, H, D, torch.float16, "cpu")
    worker = WorkerSide(
        KVortexConfig.from_dict({"chunk_tokens": CHUNK}), N, expected_chunk_bytes=12345
    )
    with pytest.raises(LayoutError, match="12345"):
        worker.register(kv)


def test_recomputed_chunks_are_stored_again_after_a_failed_load() -> None:
    sched, worker, _ = setup()
    tokens = list(range(64))
    sched.finished("a", tokens, 64, [0, 1, 2, 3])
    run_step(sched, worker)
    worker._slot_keys.clear()  # the worker lost its host copy
    prompt = [*tokens, 1]
    external, _ = sched.matched_tokens("b", prompt, 65, 0)
    sched.after_alloc("b", [8, 9, 10, 11, 12], external)
    run_step(sched, worker)
    assert sched.finished("b", prompt, 65, [8, 9, 10, 11, 12]) is True  # recomputed: store
    sending, _, _ = run_step(sched, worker)
    assert sending == {"b"}
    assert sched.matched_tokens("c", [*tokens, 2], 65, 0) == (64, False)


@pytest.mark.parametrize("bad", [[-1, 1, 2, 3], [0, 1, 2, B], [0, 1, 2.0, 3], None])
def test_scheduler_refuses_block_ids_that_are_not_blocks(bad: object) -> None:
    sched, worker, _ = setup()
    sched.num_blocks = B
    tokens = list(range(64))
    before = (sched.directory.used, sched.pinned_count())
    with pytest.raises(InvalidArgumentError):
        sched.finished("a", tokens, 64, bad)  # type: ignore[arg-type]
    sched.finished("b", tokens, 64, [0, 1, 2, 3])
    run_step(sched, worker)
    assert sched.matched_tokens("c", [*tokens, 1], 65, 0) == (64, False)
    with pytest.raises(InvalidArgumentError):
        sched.after_alloc("c", bad, 64)  # type: ignore[arg-type]
    assert before[1] == sched.pinned_count() == 0


def test_worker_close_is_final_and_failed_register_leaves_nothing(engine_backend: str) -> None:
    kv = LAYOUTS["lbnhc"](L, B, N, H, D, torch.float16, "cpu")
    config = KVortexConfig.from_dict(
        {"chunk_tokens": CHUNK, "cpu_bytes": "1MiB", "backend": engine_backend}
    )
    worker = WorkerSide(config, N, expected_chunk_bytes=12345)
    with pytest.raises(LayoutError, match="planned 12345"):
        worker.register(kv)
    assert worker.pool is None and worker.mover is None
    worker.expected_chunk_bytes = None
    worker.register(kv)  # corrected
    assert worker.pool is not None and worker.pool.backend == engine_backend
    worker.close()
    worker.close()
    with pytest.raises(EngineClosedError):
        worker.start(TransferPlan(step=1))
    with pytest.raises(EngineClosedError):
        worker.register(kv)


def test_stats_line_counts_lookups_hits_and_bytes(caplog: pytest.LogCaptureFixture) -> None:
    sched, worker, _ = setup(log_interval_s=5)
    now = [0.0]
    sched.activity = ActivityLog(5, clock=lambda: now[0])
    tokens = list(range(100))
    assert sched.matched_tokens("a", tokens, 100, 0) == (0, False)
    sched.finished("a", tokens, 100, list(range(7)))
    run_step(sched, worker)  # stores 3 chunks
    external, _ = sched.matched_tokens("b", tokens, 101, 0)
    sched.after_alloc("b", list(range(20, 27)), external)
    now[0] = 6.0
    with caplog.at_level(logging.INFO, logger="kvortex"):
        run_step(sched, worker)
    lines = [r.getMessage() for r in caplog.records if "lookups" in r.getMessage()]
    gib = 3 * sched.chunk_bytes / 2**30
    assert lines == [
        f"kvortex: 6.0 s: 2 lookups, 96 hit tokens of 200 prompt tokens (48.0 %), loaded "
        f"{gib:.2f} GiB, stored {gib:.2f} GiB, 0 evictions"
    ]
    now[0] = 20.0
    assert sched.activity.tick() is None  # nothing happened: no line
    off = ActivityLog(0, clock=lambda: now[0])
    off.lookup(10, 10)
    now[0] = 100.0
    assert off.tick() is None


@pytest.mark.parametrize(
    ("version", "level"),
    [
        ("0.15.1", logging.INFO),
        ("0.26.0", logging.INFO),
        ("0.33.0", logging.INFO),
        ("0.33.2rc1", logging.INFO),
        ("0.14.0", logging.WARNING),
        ("0.34.0", logging.WARNING),
        ("1.0.0", logging.WARNING),
        ("dev", logging.WARNING),
    ],
)
def test_vllm_version_note(version: str, level: int) -> None:
    got, message = vllm_version_note(version)
    assert got == level
    assert version in message and "0.15.1" in message and "0.33.0" in message
    if level == logging.WARNING and version != "dev":
        assert "outside the tested range" in message


# -- the disk tier under the connector ----------------------------------------------------------


def disk_setup(path: object, backend: str, l1_chunks: int = 3) -> tuple[SchedulerSide, WorkerSide]:
    kv = LAYOUTS["lbnhc"](L, B, N, H, D, torch.float16, "cpu")
    fill_random(kv, seed=1)
    probe = WorkerSide(KVortexConfig.from_dict({"chunk_tokens": CHUNK}), N)
    probe.register(kv)
    assert probe.layout is not None
    chunk_bytes = probe.layout.chunk_bytes(CHUNK // N)
    probe.close()
    config = KVortexConfig.from_dict(
        {
            "chunk_tokens": CHUNK,
            "cpu_bytes": chunk_bytes * l1_chunks,
            "disk_path": str(path),
            "disk_admission": "all",
            "backend": backend,
        }
    )
    worker = WorkerSide(config, N)
    worker.register(kv)
    sched = SchedulerSide(
        config, Namespace("m"), N, chunk_bytes, hold_blocks_while_loading=False, num_blocks=B
    )
    return sched, worker


def until_idle(
    sched: SchedulerSide, worker: WorkerSide, rounds: int = 50
) -> tuple[set[str], set[int]]:
    recving: set[str] = set()
    errors: set[int] = set()
    for _ in range(rounds):
        _, r, e = run_step(sched, worker)
        recving |= r
        errors |= e
        if worker.disk is not None:
            worker.disk.wait_idle()
        if not worker._loads and not worker._stores:
            _, r, e = run_step(sched, worker)
            return recving | r, errors | e
    raise AssertionError("the worker never went idle")


def test_prefix_comes_back_from_disk_through_the_async_path(
    tmp_path: Any, engine_backend: str
) -> None:
    sched, worker = disk_setup(tmp_path, engine_backend)
    prompts = {
        name: [random.Random(seed).randrange(1000) for _ in range(64)]
        for seed, name in enumerate("abcd")
    }
    expected = {}
    for i, (name, tokens) in enumerate(prompts.items()):
        src = [4 * i, 4 * i + 1, 4 * i + 2, 4 * i + 3]
        expected[name] = blocks_bytes(worker, src)
        assert sched.finished(name, tokens, 64, src) is True
        until_idle(sched, worker)
    # 8 chunks went through a host tier of 3: the first prompts live on disk only now.
    assert sched.disk is not None and len(sched.disk) == 8
    assert sched.directory.match(sched.namespace.chunk_keys(prompts["a"], CHUNK)) == 0
    external, is_async = sched.matched_tokens("r", [*prompts["a"], 1], 65, 0)
    assert (external, is_async) == (64, True)  # from disk: always asynchronous
    dst = [40, 41, 42, 43, 44]
    garble = [b"\x5a" * worker.layout.page_bytes] * worker.layout.num_planes  # type: ignore[union-attr]
    for b in dst:
        for p in worker.layout.planes:  # type: ignore[union-attr]
            ctypes.memset(p.base + b * p.block_stride, 0x5A, worker.layout.page_bytes)  # type: ignore[union-attr]
    sched.after_alloc("r", dst, external)
    recving, errors = until_idle(sched, worker)
    assert recving == {"r"} and not errors
    assert blocks_bytes(worker, dst[:4]) == expected["a"]
    assert blocks_bytes(worker, dst[4:]) == garble
    # The promoted chunks are host-tier hits now.
    assert sched.directory.match(sched._requests["r"].keys) == 2
    assert sched.finished("r", [*prompts["a"], 1], 64, dst) is False
    worker.close()


def test_connector_disk_tier_survives_a_restart(tmp_path: Any, engine_backend: str) -> None:
    sched, worker = disk_setup(tmp_path, engine_backend)
    tokens = [random.Random(5).randrange(1000) for _ in range(64)]
    expected = blocks_bytes(worker, [0, 1, 2, 3])
    sched.finished("a", tokens, 64, [0, 1, 2, 3])
    until_idle(sched, worker)
    worker.close()
    sched2, worker2 = disk_setup(tmp_path, engine_backend)
    assert sched2.disk is not None and len(sched2.disk) == 2
    external, is_async = sched2.matched_tokens("b", [*tokens, 3], 65, 0)
    assert (external, is_async) == (64, True)
    sched2.after_alloc("b", [30, 31, 32, 33, 34], external)
    recving, errors = until_idle(sched2, worker2)
    assert recving == {"b"} and not errors
    assert blocks_bytes(worker2, [30, 31, 32, 33]) == expected
    worker2.close()


def test_a_bad_disk_record_is_a_load_error(tmp_path: Any, engine_backend: str) -> None:
    sched, worker = disk_setup(tmp_path, engine_backend)
    tokens = [random.Random(6).randrange(1000) for _ in range(64)]
    sched.finished("a", tokens, 64, [0, 1, 2, 3])
    until_idle(sched, worker)
    worker.close()
    for seg in sorted(tmp_path.glob("tp0of1/seg-*.kvx")):
        raw = bytearray(seg.read_bytes())
        raw[4096 + 10] ^= 0xFF  # a payload byte of the first record
        seg.write_bytes(bytes(raw))
    sched2, worker2 = disk_setup(tmp_path, engine_backend)
    external, _ = sched2.matched_tokens("b", [*tokens, 3], 65, 0)
    assert external == 64
    sched2.after_alloc("b", [30, 31, 32, 33, 34], external)
    recving, errors = until_idle(sched2, worker2)
    assert recving == {"b"}
    assert errors >= {30, 31}  # the first chunk's blocks: recomputed, never wrong bytes
    assert sched2.disk is not None and sched2.disk.match(sched2._requests["b"].keys) == 0
    worker2.close()
