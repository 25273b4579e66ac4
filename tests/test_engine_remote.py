"""The shared tier (L3) under the engine and the connector, against a real redis-server:
KV stored by one instance is served, byte for byte, to another that never computed it."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import require_redis, run_isolated
from kv_layouts import LAYOUTS, fill_random
from redis_launcher import RedisServer
from test_connector_core import blocks_bytes, run_step

from kvortex.config import KVortexConfig
from kvortex.engine import KVortexEngine
from kvortex.integrations.scheduler import SchedulerSide
from kvortex.integrations.worker import WorkerSide
from kvortex.keys import Namespace
from kvortex.layout import PagedLayout

pytestmark = pytest.mark.redis

L, B, N, H, D = 2, 64, 16, 2, 8
CHUNK = 32


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    require_redis()
    s = RedisServer(tmp_path / "redis").start()
    yield s
    s.stop()


def prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(100_000) for _ in range(n)]


def engine(url: str, backend: str, salt: str = "") -> KVortexEngine:
    kv = LAYOUTS["lbnhc"](L, B, N, H, D, torch.float16, "cpu")
    chunk_bytes = PagedLayout.from_kv_caches(kv, N).chunk_bytes(CHUNK // N)
    e = KVortexEngine(
        {
            "chunk_tokens": CHUNK,
            "cpu_bytes": 8 * chunk_bytes,
            "remote_url": url,
            "remote_write": "all",
            "tenant_salt": salt,
            "backend": backend,
        },
        model="remote-test",
    )
    e.register_kv_caches(kv, N)
    return e


_WRITER = """
import sys, random, torch
sys.path.insert(0, {tests!r})
from kv_layouts import LAYOUTS
from kvortex.engine import KVortexEngine
from kvortex.layout import PagedLayout
kv = LAYOUTS["lbnhc"]({L}, {B}, {N}, {H}, {D}, torch.float16, "cpu")
chunk = PagedLayout.from_kv_caches(kv, {N}).chunk_bytes(2)
e = KVortexEngine({{"chunk_tokens": 32, "cpu_bytes": 8 * chunk, "remote_url": {url!r},
                   "remote_write": "all", "backend": {backend!r}}}, model="remote-test")
e.register_kv_caches(kv, {N})
rng = random.Random(1)
tokens = [rng.randrange(100000) for _ in range(96)]
for b in range(6):
    for t in kv.values():
        t[b].fill_(float(b + 1))
e.store(tokens, list(range(6))).wait(30)
assert e.remote.wait_idle(30) and e.remote.written == 3, e.remote.describe()
e.close()
print("stored")
"""


def test_another_process_stores_this_engine_hits(server: RedisServer, engine_backend: str) -> None:
    tests = str(Path(__file__).resolve().parent)
    out = run_isolated(
        _WRITER.format(tests=tests, L=L, B=B, N=N, H=H, D=D, url=server.url, backend=engine_backend)
    )
    assert "stored" in out
    with engine(server.url, engine_backend) as reader:  # fresh host tier, no disk
        tokens = prompt(96, 1)
        assert reader.lookup(tokens) == 96
        kv = reader.layout.tensors  # type: ignore[union-attr]
        r = reader.retrieve(tokens, [20, 21, 22, 23, 24, 25])
        r.wait(30)
        assert r.tokens == 96
        for i, b in enumerate(range(20, 26)):
            assert all(bool((t[b] == float(i + 1)).all()) for t in kv)
        assert reader.remote is not None and reader.remote.read_chunks == 3


def test_tenants_share_one_redis_without_aliasing(server: RedisServer, engine_backend: str) -> None:
    with engine(server.url, engine_backend, salt="tenant-a") as a:
        tokens = prompt(64, 2)
        a.store(tokens, [0, 1, 2, 3]).wait(30)
        assert a.remote is not None and a.remote.wait_idle(30)
    with engine(server.url, engine_backend, salt="tenant-b") as b:
        assert b.lookup(tokens) == 0
    with engine(server.url, engine_backend, salt="tenant-a") as a2:
        assert a2.lookup(tokens) == 64


def test_server_stopped_mid_workload_is_a_miss(server: RedisServer, engine_backend: str) -> None:
    with engine(server.url, engine_backend) as e:
        tokens = prompt(64, 3)
        e.store(tokens, [0, 1, 2, 3]).wait(30)
        assert e.remote is not None and e.remote.wait_idle(30)
        server.stop()
        other = prompt(64, 4)
        assert e.lookup(other) == 0  # a miss within the timeout, no exception
        e.store(other, [4, 5, 6, 7]).wait(30)  # host tier still works
        assert e.lookup(other) == 64


# -- two vLLM-less connector instances sharing one Redis ------------------------------------------


def instance(url: str, backend: str) -> tuple[SchedulerSide, WorkerSide]:
    kv = LAYOUTS["lbnhc"](L, B, N, H, D, torch.float16, "cpu")
    fill_random(kv, seed=random.randrange(1000))
    chunk_bytes = PagedLayout.from_kv_caches(kv, N).chunk_bytes(CHUNK // N)
    config = KVortexConfig.from_dict(
        {
            "chunk_tokens": CHUNK,
            "cpu_bytes": 8 * chunk_bytes,
            "remote_url": url,
            "remote_write": "all",
            "backend": backend,
        }
    )
    worker = WorkerSide(config, N)
    worker.register(kv)
    sched = SchedulerSide(
        config, Namespace("m"), N, chunk_bytes, hold_blocks_while_loading=False, num_blocks=B
    )
    return sched, worker


def test_two_connector_instances_share_kv(server: RedisServer, engine_backend: str) -> None:
    sched_a, worker_a = instance(server.url, engine_backend)
    sched_b, worker_b = instance(server.url, engine_backend)
    try:
        tokens = prompt(64, 5)
        expected = blocks_bytes(worker_a, [0, 1, 2, 3])
        assert sched_a.finished("a", tokens, 64, [0, 1, 2, 3]) is True
        sending: set[str] = set()
        for _ in range(20):
            sending |= run_step(sched_a, worker_a)[0]
            if "a" in sending:
                break
        assert sending == {"a"}
        assert worker_a.remote is not None and worker_a.remote.wait_idle(30)
        # Instance B never saw this prompt: its host tier is empty, the shared tier has it.
        external, is_async = sched_b.matched_tokens("b", [*tokens, 9], 65, 0)
        assert (external, is_async) == (64, True)
        sched_b.after_alloc("b", [30, 31, 32, 33, 34], external)
        run_step(sched_b, worker_b)  # B's worker opens its shared-tier client on this first plan
        recving: set[str] = set()
        errors: set[int] = set()
        for _ in range(50):
            _, r, e = run_step(sched_b, worker_b)
            recving |= r
            errors |= e
            if "b" in recving:
                break
            if worker_b.remote is not None:
                worker_b.remote.wait_idle(30)
        assert recving == {"b"} and not errors
        assert blocks_bytes(worker_b, [30, 31, 32, 33]) == expected
    finally:
        for side in (worker_a, worker_b):
            side.close()
        for s in (sched_a, sched_b):
            s.close()
