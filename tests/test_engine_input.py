"""KVortexEngine refuses bad input at the call and leaves its stored state exactly as it was;
``close()`` is final; a failed registration leaves nothing behind. Every test runs over both
hot-path backends (the engine's hashing, queue and pool)."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from kv_layouts import LAYOUTS, fill_random

from kvortex import backend
from kvortex.engine import KVortexEngine, StoreHandle
from kvortex.errors import (
    EngineClosedError,
    InvalidArgumentError,
    KVortexError,
    LayoutError,
    NotRegisteredError,
    TransferTimeout,
)
from kvortex.layout import PagedLayout
from kvortex.queue import SPSCQueue

L, B, N, H, D = 2, 64, 16, 2, 8
CHUNK = 32  # two blocks per chunk


def kv_cache() -> dict[str, torch.Tensor]:
    kv = LAYOUTS["lbnhc"](L, B, N, H, D, torch.float16, "cpu")
    fill_random(kv, seed=11)
    return kv


def make(engine_backend: str, slots: int = 8) -> KVortexEngine:
    kv = kv_cache()
    chunk_bytes = PagedLayout.from_kv_caches(kv, N).chunk_bytes(CHUNK // N)
    engine = KVortexEngine(
        {"chunk_tokens": CHUNK, "cpu_bytes": chunk_bytes * slots, "backend": engine_backend},
        model="input-test",
    )
    engine.register_kv_caches(kv, N)
    return engine


def tokens(n: int, seed: int = 0) -> list[int]:
    rng = np.random.default_rng(seed)
    return [int(t) for t in rng.integers(0, 100_000, n)]


def state(engine: KVortexEngine) -> tuple[object, ...]:
    """Everything a refused call must leave unchanged."""
    assert engine.directory is not None and engine.pool is not None
    d = engine.directory
    keys = sorted(k for k in d._entries)
    return (d.used, engine.pool.used, d.evictions, tuple(keys), tuple(d.slot_of(k) for k in keys))


BAD_BLOCK_IDS = [
    pytest.param([-1, 0, 1, 2], id="skip-marker"),
    pytest.param([0, 1, 2, B], id="one-past-the-end"),
    pytest.param([0, 1, 2, 10**12], id="huge"),
    pytest.param(np.array([0, 1, 2, 2**64 - 1], dtype=np.uint64), id="uint64-max"),
    pytest.param(np.array([0, 1, 2, -1], dtype=np.int8), id="int8-minus-one"),
    pytest.param([0, 1, 2, 3.0], id="float-in-list"),
    pytest.param(np.array([0.0, 1.0, 2.0, 3.0]), id="float-array"),
    pytest.param(torch.tensor([0.0, 1.0, 2.0, 3.0]), id="float-tensor"),
    pytest.param([0, 1, 2, True], id="bool-in-list"),
    pytest.param(torch.tensor([True, False, True, False]), id="bool-tensor"),
    pytest.param([0, 1, 2, "3"], id="str-in-list"),
    pytest.param("0123", id="str"),
    pytest.param(None, id="None"),
    pytest.param([0, 1, 2, None], id="None-in-list"),
    pytest.param(np.array([[0, 1], [2, 3]]), id="2-D"),
    pytest.param(np.int64(3), id="numpy-scalar"),
    pytest.param(7, id="int"),
    pytest.param(torch.tensor(3), id="0-d-tensor"),
    pytest.param([0, 1, 2], id="too-few"),
    pytest.param([0, 1, 2, 3, 4], id="too-many"),
]


@pytest.mark.parametrize("ids", BAD_BLOCK_IDS)
@pytest.mark.parametrize("op", ["store", "retrieve"])
def test_bad_block_ids_refused_at_the_call(engine_backend: str, op: str, ids: object) -> None:
    with make(engine_backend, slots=2) as engine:
        # A full tier: an accepted store would have to evict to make room.
        for seed in (1, 2):
            engine.store(tokens(32, seed), [10, 11]).wait(10)
        before = state(engine)
        with pytest.raises(InvalidArgumentError):
            getattr(engine, op)(tokens(64, 3), ids)
        assert state(engine) == before
        # Nothing was queued: the mover thread has no job, the next call works as usual.
        engine.store(tokens(64, 3), [0, 1, 2, 3]).wait(10)
        assert engine.lookup(tokens(64, 3)) == 64


@pytest.mark.parametrize(
    "ids",
    [
        pytest.param([0, 1, 2, 3], id="list"),
        pytest.param((0, 1, 2, 3), id="tuple"),
        pytest.param([np.int32(0), np.int64(1), np.uint8(2), 3], id="numpy-scalars"),
        pytest.param(np.arange(4, dtype=np.uint16), id="uint16-array"),
        pytest.param(torch.arange(4, dtype=torch.int32), id="int32-tensor"),
    ],
)
def test_integer_block_ids_of_every_kind_are_accepted(engine_backend: str, ids: object) -> None:
    with make(engine_backend) as engine:
        t = tokens(64, 4)
        engine.store(t, ids).wait(10)
        assert engine.lookup(t) == 64
        r = engine.retrieve(t, ids)
        r.wait(10)
        assert r.tokens == 64


def test_retrieve_refuses_repeated_blocks_store_allows_them(engine_backend: str) -> None:
    with make(engine_backend) as engine:
        t = tokens(64, 5)
        engine.store(t, [4, 4, 5, 5]).wait(10)  # reading a block twice harms nothing
        assert engine.lookup(t) == 64
        before = state(engine)
        with pytest.raises(InvalidArgumentError, match="more than once"):
            engine.retrieve(t, [0, 1, 2, 1])
        assert state(engine) == before
        assert not any(engine.directory.pinned(k) for k in engine.directory._entries)  # type: ignore[union-attr]


BAD_TOKENS = [
    pytest.param(None, id="None"),
    pytest.param([1.0] * 64, id="floats"),
    pytest.param(np.zeros((2, 32), dtype=np.int64), id="2-D"),
    pytest.param(np.zeros(64, dtype=np.float32), id="float-array"),
    pytest.param("a prompt", id="str"),
    pytest.param([-1] * 64, id="negative"),
]


@pytest.mark.parametrize("bad", BAD_TOKENS)
def test_bad_tokens_refused_with_typed_errors(engine_backend: str, bad: object) -> None:
    with make(engine_backend) as engine:
        engine.store(tokens(64, 6), [0, 1, 2, 3]).wait(10)
        before = state(engine)
        for call in (
            lambda: engine.lookup(bad),
            lambda: engine.store(bad, [0, 1, 2, 3]),
            lambda: engine.retrieve(bad, [0, 1, 2, 3]),
        ):
            with pytest.raises(KVortexError):
                call()
        assert state(engine) == before
    unregistered = KVortexEngine({"backend": engine_backend})
    with pytest.raises(KVortexError):
        unregistered.lookup(bad)


def test_close_is_final_and_idempotent(engine_backend: str) -> None:
    threads_before = threading.active_count()
    engine = make(engine_backend)
    t = tokens(64, 7)
    engine.store(t, [0, 1, 2, 3]).wait(10)
    pool = engine.pool
    engine.close()
    engine.close()
    assert pool is not None and pool.closed
    assert threading.active_count() == threads_before  # the mover thread is gone
    for call in (
        lambda: engine.lookup(t),
        lambda: engine.store(t, [0, 1, 2, 3]),
        lambda: engine.retrieve(t, [0, 1, 2, 3]),
        lambda: engine.register_kv_caches(kv_cache(), N),
    ):
        with pytest.raises(EngineClosedError, match="closed"):
            call()
    assert threading.active_count() == threads_before  # nothing was started again
    never_registered = KVortexEngine({"backend": engine_backend})
    never_registered.close()
    with pytest.raises(EngineClosedError):
        never_registered.register_kv_caches(kv_cache(), N)
    assert issubclass(EngineClosedError, RuntimeError)


def test_failed_registration_leaves_nothing_and_can_be_corrected(engine_backend: str) -> None:
    threads_before = threading.active_count()
    engine = KVortexEngine(
        {"chunk_tokens": CHUNK, "cpu_bytes": "1MiB", "backend": engine_backend}, model="m"
    )
    kv = kv_cache()
    with pytest.raises(InvalidArgumentError, match="multiple"):
        engine.register_kv_caches(kv, 24)  # 32-token chunks are not whole 24-token blocks
    with pytest.raises(LayoutError):
        engine.register_kv_caches(kv, 8)  # the tensors hold 16-token blocks
    with pytest.raises(KVortexError):
        engine.register_kv_caches({}, N)
    for bad in (0, -16, 16.0, True, None):
        with pytest.raises(InvalidArgumentError):
            engine.register_kv_caches(kv, bad)  # type: ignore[arg-type]
    assert engine.layout is None and engine.pool is None and engine.mover is None
    assert threading.active_count() == threads_before
    with pytest.raises(NotRegisteredError):
        engine.store(tokens(64), [0, 1, 2, 3])
    engine.register_kv_caches(kv, N)  # the corrected call
    with engine:
        engine.store(tokens(64, 8), [0, 1, 2, 3]).wait(10)
        assert engine.lookup(tokens(64, 8)) == 64


def test_registration_checks_path_and_size_before_building() -> None:
    kv = kv_cache()
    gpu_only = KVortexEngine({"chunk_tokens": CHUNK}, transfer_path="dma")
    with pytest.raises(InvalidArgumentError, match="CUDA"):
        gpu_only.register_kv_caches(kv, N)
    assert gpu_only.pool is None and gpu_only.mover is None
    tiny = KVortexEngine({"chunk_tokens": CHUNK, "cpu_bytes": 100})
    with pytest.raises(InvalidArgumentError, match="cannot hold one chunk"):
        tiny.register_kv_caches(kv, N)
    assert tiny.pool is None
    for model in ("", "  ", None, 3):
        with pytest.raises(InvalidArgumentError, match="model"):
            KVortexEngine(model=model)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="transfer path"):
        KVortexEngine(transfer_path="fast")


def test_wait_timeout_is_a_typed_timeout_error() -> None:
    handle = StoreHandle(0, 0, False)
    with pytest.raises(TransferTimeout) as info:
        handle.wait(0.01)
    assert isinstance(info.value, TimeoutError) and isinstance(info.value, KVortexError)
    handle._finish()
    handle.wait(0)  # waiting again after the copy finished succeeds


def test_engine_inherits_the_process_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVORTEX_BACKEND", "python")
    kv = kv_cache()
    engine = KVortexEngine({"chunk_tokens": CHUNK, "cpu_bytes": "1MiB"})
    assert engine.config.backend is None  # "inherit"
    engine.register_kv_caches(kv, N)
    with engine:
        assert engine.pool is not None and engine.pool.backend == "python"
        assert type(engine._queue).__name__ == type(SPSCQueue(1, backend="python")).__name__
        assert engine.mover is not None and engine.mover.path == "torch"
        engine.store(tokens(64, 9), [0, 1, 2, 3]).wait(10)
        assert engine.lookup(tokens(64, 9)) == 64


@pytest.mark.skipif(bool(backend.native_reason("pool")), reason="native core not built")
def test_explicit_backend_overrides_the_process_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVORTEX_BACKEND", "python")
    engine = KVortexEngine({"chunk_tokens": CHUNK, "cpu_bytes": "1MiB", "backend": "native"})
    engine.register_kv_caches(kv_cache(), N)
    with engine:
        assert engine.pool is not None and engine.pool.backend == "native"
