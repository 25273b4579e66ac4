"""KVortexConnector under the real vLLM Scheduler (0.15 and 0.33), with real worker connectors.

vLLM's Scheduler creates the scheduler-role connector from ``kv_connector_module_path``; each
step's scheduler output goes through a worker-role connector over KV tensors that vLLM itself
allocated on CPU, driven by vLLM's own model-runner plumbing, and the workers' output comes
back through ``update_from_output``. After every step the loop checks that each running
request's computed tokens hold exactly the bytes computed for them (see ``vllm_support``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest

try:
    import vllm  # noqa: F401
except ImportError as exc:
    if os.environ.get("KVORTEX_REQUIRE_VLLM") == "1":
        raise
    pytest.skip(f"vllm is not installed: {exc}", allow_module_level=True)

import torch
from vllm.v1.request import RequestStatus
from vllm_support import (
    ASYNC,
    BLOCK,
    LAYERS,
    MODERN,
    RUNNER_MODES,
    SENTINEL,
    SYNC,
    EngineLoop,
    Worker,
    build_loop,
    extra_config,
    make_request,
    make_scheduler,
    make_vllm_config,
    prompt,
)

from kvortex.errors import ConfigError, KVortexError

pytestmark = pytest.mark.vllm

WAITING_FOR_KV = RequestStatus.WAITING_FOR_REMOTE_KVS


Loops = Callable[..., EngineLoop]


@pytest.fixture
def loops(monkeypatch: pytest.MonkeyPatch) -> Iterator[Loops]:
    """``loops(extra, num_blocks=..., mode=...)`` builds an EngineLoop, closed at teardown."""
    made: list[EngineLoop] = []

    def make(
        extra: dict[str, Any] | None = None,
        *,
        num_blocks: int = 64,
        mode: str | None = None,
        tp_size: int = 1,
    ) -> EngineLoop:
        if MODERN and mode == "v1":  # the scheduler shapes its output for the V1 runner
            monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "0")
        loop = build_loop(extra, num_blocks=num_blocks, mode=mode, tp_size=tp_size)
        made.append(loop)
        return loop

    yield make
    for loop in made:
        loop.close()


def loads_config(loads: str) -> dict[str, Any]:
    return extra_config(async_load_min_tokens=ASYNC if loads == "async" else SYNC)


def new_reqs(so: Any) -> dict[str, int]:
    """``{request id: num_computed_tokens}`` of the requests scheduled for the first time."""
    return {r.req_id: r.num_computed_tokens for r in so.scheduled_new_reqs}


def store_prompt(loop: EngineLoop, tokens: list[int], request_id: str = "A") -> None:
    """Run one request over ``tokens`` to completion, so that its full chunks get stored,
    then drop every local copy of its KV."""
    loop.add(request_id, tokens, max_tokens=2)
    loop.run_until_idle()
    loop.wipe()


def untouched(loop: EngineLoop, blocks: list[int]) -> bool:
    """True if every byte of ``blocks`` still holds what wipe() wrote, on every worker."""
    slots = torch.tensor([b * BLOCK + i for b in blocks for i in range(BLOCK)])
    return all(
        bool((w.kv.read(name, slots) == SENTINEL).all()) for w in loop.workers for name in LAYERS
    )


# -- hits -------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", RUNNER_MODES)
@pytest.mark.parametrize("loads", ["sync", "async"])
def test_miss_then_hit_delivers_the_stored_bytes(loops: Loops, loads: str, mode: str) -> None:
    loop = loops(loads_config(loads), mode=mode)
    p = prompt(72)  # two full chunks and 8 tokens
    loop.add("A", p, max_tokens=2)
    so = loop.step()
    assert new_reqs(so) == {"A": 0}  # a miss
    assert not so.kv_connector_metadata.plan.loads
    reference = loop.snapshot("A", 64)
    loop.run_until_idle()
    assert len(loop.stored_keys()) == 2
    loop.wipe()

    loop.add("B", p, max_tokens=2)
    so = loop.step()
    if loads == "async":
        assert new_reqs(so) == {}
        assert loop.status("B") == WAITING_FOR_KV
        so = loop.step()
    assert new_reqs(so) == {"B": 64}
    assert so.num_scheduled_tokens == {"B": 8}
    got = loop.snapshot("B", 64)
    for want_layers, got_layers in zip(reference, got, strict=True):
        for name in LAYERS:
            assert torch.equal(got_layers[name], want_layers[name]), name
    loop.run_until_idle()
    assert loop.finish_reasons["B"] == "length"
    assert len(loop.stored_keys()) == 2  # B's chunks were stored already
    loop.assert_clean()


def test_async_load_waits_until_the_workers_report_it(loops: Loops) -> None:
    loop = loops(loads_config("async"))
    p = prompt(72)
    store_prompt(loop, p)
    loop.add("B", p, max_tokens=1)
    so = loop.step(withhold=True)  # the load ran, but its report is late
    assert new_reqs(so) == {}
    assert [ops.request_id for ops in so.kv_connector_metadata.plan.loads] == ["B"]
    assert so.kv_connector_metadata.async_loads == frozenset({"B"})
    for _ in range(2):
        so = loop.step(withhold=True)
        assert new_reqs(so) == {}
        assert loop.status("B") == WAITING_FOR_KV
    loop.step()  # finished_recving delivered: B is promoted by the next schedule()
    so = loop.step()
    assert new_reqs(so) == {"B": 64}
    loop.run_until_idle()
    assert loop.finish_reasons["B"] == "length"
    loop.assert_clean()


def test_partial_hit_on_a_shared_prefix(loops: Loops) -> None:
    loop = loops()
    shared = prompt(64)
    store_prompt(loop, [*shared, *prompt(20, 500)])
    loop.add("B", [*shared, *prompt(30, 600)], max_tokens=2)  # both chunks shared
    loop.add("C", [*shared[:40], *prompt(30, 700)], max_tokens=2)  # one chunk and 8 tokens
    loop.add("D", prompt(70, 800), max_tokens=2)  # nothing shared
    so = loop.step()
    assert new_reqs(so) == {"B": 64, "C": 32, "D": 0}
    loop.run_until_idle()
    assert all(loop.finish_reasons[r] == "length" for r in "BCD")
    loop.assert_clean()


def test_identical_requests_store_each_chunk_once(loops: Loops) -> None:
    loop = loops()
    p = prompt(72)
    for rid in ("A1", "A2", "A3"):
        loop.add(rid, p, max_tokens=2)
    loop.step()
    loop.step()  # all three finish in the same step
    loop.run_until_idle()
    [store] = [ops for plan in loop.plans() for ops in plan.stores]
    assert len(store.chunks) == 2
    loop.assert_clean()
    assert loop.side.directory.used == 2
    loop.wipe()
    loop.add("B", p, max_tokens=2)
    assert new_reqs(loop.step()) == {"B": 64}
    loop.run_until_idle()
    loop.assert_clean()


def test_local_hit_inside_a_chunk_skips_its_pages(loops: Loops) -> None:
    loop = loops()
    p = prompt(72)
    store_prompt(loop, p)
    # C puts p's first block (half of chunk 0) into vLLM's local prefix cache.
    loop.add("C", [*p[:16], *prompt(4, 900)], max_tokens=1)
    so = loop.step()
    c_blocks = list(so.scheduled_new_reqs[0].block_ids[0])
    loop.run_until_idle()

    loop.add("B", p, max_tokens=2)
    so = loop.step()
    assert new_reqs(so) == {"B": 64}  # 16 local + 48 loaded
    b_blocks = loop.block_ids("B")
    assert b_blocks[0] == c_blocks[0]  # the local hit
    chunks = loop.loads_of("B")
    assert (
        [(c.block_ids, c.skip_pages) for c in chunks]
        == [
            (tuple(b_blocks[0:2]), 1),  # the first page is vLLM's own: skipped
            (tuple(b_blocks[2:4]), 0),
        ]
    )
    # Nothing outside B's and C's blocks was written.
    others = [b for b in range(1, loop.num_blocks()) if b not in b_blocks + c_blocks]
    assert untouched(loop, others)
    loop.run_until_idle()
    loop.assert_clean()


@pytest.mark.parametrize("loads", ["sync", "async"])
def test_a_hit_never_covers_the_whole_prompt(loops: Loops, loads: str) -> None:
    loop = loops(loads_config(loads))
    p = prompt(64)  # exactly two chunks
    store_prompt(loop, p)
    assert len(loop.stored_keys()) == 2
    loop.add("B", p, max_tokens=2)
    so = loop.step()  # vLLM asserts if a sync hit leaves nothing to compute
    if loads == "async":
        assert loop.status("B") == WAITING_FOR_KV
        so = loop.step()
    computed = new_reqs(so)["B"]
    assert 32 <= computed < 64
    if loads == "sync":
        assert computed == 32
    loop.run_until_idle()
    assert loop.finish_reasons["B"] == "length"
    loop.assert_clean()


# -- failures ---------------------------------------------------------------------------------


@pytest.mark.parametrize("loads", ["sync", "async"])
def test_failed_load_is_recomputed_never_wrong(loops: Loops, loads: str) -> None:
    loop = loops(loads_config(loads))
    p = prompt(72)
    store_prompt(loop, p)
    # The worker restarts: its host tier is empty, the scheduler's directory is not.
    old = loop.workers[0]
    old.close()
    loop.workers[0] = Worker(old.vc, loop.scheduler.kv_cache_config, old.kv.layout, old.mode)
    loop.add("B", p, max_tokens=2)
    so = loop.step()
    if loads == "sync":
        assert new_reqs(so) == {"B": 64}
    failed = set(loop.invalid_block_ids)
    assert failed, "the worker did not report the blocks it could not load"
    assert failed <= {b for c in loop.loads_of("B") for b in c.block_ids}
    assert untouched(loop, sorted(failed))  # refused, not half-written
    steps = 0
    while "B" in loop.scheduler.requests:
        loop.step()
        steps += 1
        assert steps < 10, "the failed load was retried forever"
    assert loop.finish_reasons["B"] == "length"
    loop.run_until_idle()
    loop.assert_clean()
    # B recomputed and stored the prefix again: the next request gets it, with the right bytes.
    loop.wipe()
    loop.invalid_block_ids.clear()
    loop.add("C", p, max_tokens=2)
    so = loop.step()
    if loads == "async":
        so = loop.step()
    assert new_reqs(so) == {"C": 64}
    assert not loop.invalid_block_ids
    loop.run_until_idle()
    loop.assert_clean()


# -- request lifecycle ------------------------------------------------------------------------


@pytest.mark.parametrize("mode", RUNNER_MODES)
def test_preemption_leaks_no_slot_or_pin(loops: Loops, mode: str) -> None:
    loop = loops(num_blocks=9, mode=mode)  # 8 usable blocks
    shared = prompt(32)
    store_prompt(loop, [*shared, *prompt(8, 300)])
    loop.add("P1", [*shared, *prompt(8, 400)], max_tokens=60)
    loop.add("P2", [*shared, *prompt(8, 500)], max_tokens=60)
    preempted: set[str] = set()
    for _ in range(200):
        if not loop.scheduler.requests:
            break
        so = loop.step()
        preempted |= set(so.preempted_req_ids or ())
    assert preempted, "the test did not preempt anything"
    loop.run_until_idle()
    assert loop.finish_reasons["P1"] == loop.finish_reasons["P2"] == "length"
    loop.assert_clean()
    assert loop.side.directory.evictions == 0


def test_blocks_are_held_until_the_store_is_reported(loops: Loops) -> None:
    loop = loops()
    p = prompt(72)
    loop.add("A", p, max_tokens=1)
    loop.add("S", prompt(20, 500), max_tokens=1)  # shorter than a chunk: nothing to store
    loop.step()
    assert loop.status("A") == RequestStatus.FINISHED_LENGTH_CAPPED  # finished, blocks held
    assert "S" not in loop.scheduler.requests  # freed at once
    a_blocks = loop.block_ids("A")
    free = loop.free_blocks()
    probe = make_request("probe", p)
    assert loop.connector.get_num_new_matched_tokens(probe, 0) == (0, False)

    loop.step(withhold=True)  # the workers store A, but their report is late
    assert [ops.request_id for ops in loop.steps[-1].plan.stores] == ["A"]
    assert loop.status("A") == RequestStatus.FINISHED_LENGTH_CAPPED
    assert loop.block_ids("A") == a_blocks
    assert loop.free_blocks() == free
    # Not matchable before the workers say the bytes are there.
    assert loop.connector.get_num_new_matched_tokens(probe, 0) == (0, False)

    loop.step()  # the report arrives
    assert "A" not in loop.scheduler.requests
    assert loop.free_blocks() == loop.num_blocks() - 1
    assert loop.connector.get_num_new_matched_tokens(probe, 0) == (64, False)
    loop.run_until_idle()
    loop.assert_clean()


def test_abort_of_a_running_request(loops: Loops) -> None:
    loop = loops()
    p = prompt(72)
    loop.add("A", p, max_tokens=20)
    loop.step()
    loop.step()
    loop.scheduler.finish_requests(["A"], RequestStatus.FINISHED_ABORTED)
    loop.run_until_idle()
    loop.assert_clean()
    # What A computed before the abort is served to the next request.
    loop.wipe()
    loop.add("B", p, max_tokens=2)
    assert new_reqs(loop.step()) == {"B": 64}
    loop.run_until_idle()
    loop.assert_clean()


@pytest.mark.parametrize("when", ["in_flight", "reported"])
def test_abort_during_an_async_load(loops: Loops, when: str) -> None:
    loop = loops(loads_config("async"))
    p = prompt(72)
    store_prompt(loop, p)
    loop.add("B", p, max_tokens=5)
    if when == "in_flight":
        so = loop.schedule()  # B gets blocks and its load is planned ...
        assert loop.status("B") == WAITING_FOR_KV
        loop.scheduler.finish_requests(["B"], RequestStatus.FINISHED_ABORTED)
        # The blocks stay B's until the load is reported: nobody else may get them while a
        # worker may still be writing into them (0.33 holds them itself; on 0.15 the
        # connector's request_finished must ask for it).
        assert loop.status("B") == RequestStatus.FINISHED_ABORTED
        assert len(loop.block_ids("B")) == 4
        loop.execute(so)  # ... and the workers run it after the abort
    else:
        loop.step()  # the load ran and was reported; B waits for its promotion
        assert loop.status("B") == WAITING_FOR_KV
        loop.scheduler.finish_requests(["B"], RequestStatus.FINISHED_ABORTED)
    loop.run_until_idle()
    loop.assert_clean(recving_ids_may_linger=not MODERN)
    # The prefix is still served, with the right bytes.
    loop.wipe()
    loop.add("C", p, max_tokens=2)
    assert new_reqs(loop.step()) == {}  # async: waiting for its load
    assert new_reqs(loop.step()) == {"C": 64}
    loop.run_until_idle()
    loop.assert_clean(recving_ids_may_linger=not MODERN)


# -- configuration ----------------------------------------------------------------------------


def test_unknown_key_fails_at_scheduler_construction() -> None:
    vc = make_vllm_config(extra_config(no_such_key=1))
    with pytest.raises(ConfigError, match="no_such_key"):
        make_scheduler(vc)


def test_chunk_not_a_multiple_of_the_block_fails_at_construction() -> None:
    vc = make_vllm_config(extra_config(chunk_tokens=24))
    with pytest.raises(KVortexError, match="chunk_tokens"):
        make_scheduler(vc)


def test_layout_and_delivery_flags(loops: Loops) -> None:
    loop = loops()
    connector = loop.connector
    vc = loop.scheduler.vllm_config
    assert type(connector).get_required_kvcache_layout(vc) == ("BLNHC" if MODERN else None)
    if MODERN:
        # The engine core resolved the layout the connector asked for.
        assert vc.cache_config.kv_cache_layout == "BLNHC"
        assert connector.requires_kv_delivery is False


def test_lora_and_multimodal_requests_are_neither_loaded_nor_stored(loops: Loops) -> None:
    """Token ids do not determine their KV: storing it would hand it to other requests."""
    from types import SimpleNamespace

    loop = loops(loads_config("sync"))
    p = prompt(72)
    loop.add("A", p, max_tokens=2)
    loop.run_until_idle()
    assert loop.side.directory.used == 2
    for attr, value in (
        ("lora_request", SimpleNamespace(lora_name="adapter")),
        ("mm_features", [object()]),
    ):
        req = make_request(f"X-{attr}", p, 2)
        setattr(req, attr, value)
        assert loop.connector.get_num_new_matched_tokens(req, 0) == (0, False)
        other = make_request(f"Y-{attr}", prompt(72, start=300), 2)
        setattr(other, attr, value)
        other.num_computed_tokens = 72
        assert loop.connector.request_finished(other, list(range(5))) == (False, None)
    assert loop.side.directory.used == 2
    assert loop.side.pinned_count() == 0


# -- the disk tier ------------------------------------------------------------------------------


def loads_asynchronously_byte_exact(
    loop: EngineLoop, p: list[int], reference: Any, *, tier: str
) -> None:
    """Request B (prompt ``p``, 64 tokens stored below host memory in ``tier``) waits in
    WAITING_FOR_REMOTE_KVS while the workers read and copy, is then scheduled with 64 tokens
    loaded (not computed), and holds ``reference``'s bytes; everything is clean after."""
    loop.add("B", p, max_tokens=2)
    so = loop.step()
    assert new_reqs(so) == {}
    assert so.kv_connector_metadata.async_loads == frozenset({"B"})
    for _ in range(20):  # the read, then the copy, then the report
        if loop.status("B") != WAITING_FOR_KV:
            break
        for w in loop.workers:
            getattr(w.connector.worker_side, tier).wait_idle(30)
        so = loop.step()
    so = so if new_reqs(so) else loop.step()
    assert new_reqs(so) == {"B": 64}
    got = loop.snapshot("B", 64)
    for want_layers, got_layers in zip(reference, got, strict=True):
        for name in LAYERS:
            assert torch.equal(got_layers[name], want_layers[name]), name
    loop.run_until_idle()
    assert loop.finish_reasons["B"] == "length"
    loop.assert_clean()


@pytest.mark.parametrize("mode", RUNNER_MODES)
def test_a_prefix_evicted_from_host_memory_comes_back_from_disk(
    loops: Loops, tmp_path: Any, mode: str
) -> None:
    """A host tier of three chunks, a disk tier behind it: A's chunks are evicted from host
    memory by later prompts, and B (A's prompt again) loads them from disk through vLLM's
    asynchronous load path, byte for byte."""
    probe = loops()
    chunk_bytes = probe.side.chunk_bytes
    extra = extra_config(cpu_bytes=3 * chunk_bytes, disk_path=str(tmp_path), disk_admission="all")
    loop = loops(extra, mode=mode)
    p = prompt(72)
    loop.add("A", p, max_tokens=2)
    loop.step()
    reference = loop.snapshot("A", 64)
    loop.run_until_idle()
    for n, other in enumerate(("C", "D")):  # 4 more chunks through 3 host slots
        store_prompt(loop, prompt(72, start=300 + 100 * n), other)
    loop.wipe()
    side = loop.side
    assert side.disk is not None and len(side.disk) == 6
    assert side.directory.match(side.namespace.chunk_keys(p, side.chunk)) == 0
    for w in loop.workers:
        disk = w.connector.worker_side.disk
        assert disk is not None and disk.wait_idle()

    loads_asynchronously_byte_exact(loop, p, reference, tier="disk")


# -- the shared tier ----------------------------------------------------------------------------


@pytest.fixture
def redis_url(tmp_path: Any) -> Iterator[str]:
    from conftest import require_redis
    from redis_launcher import RedisServer

    require_redis()
    server = RedisServer(tmp_path / "redis").start()
    yield server.url
    server.stop()


@pytest.mark.redis
def test_two_vllm_instances_share_kv_through_redis(loops: Loops, redis_url: str) -> None:
    """Instance A computes and stores a prompt; instance B (its own scheduler, workers and
    host tier) gets the prefix from Redis through the asynchronous load path, byte for byte."""
    extra = extra_config(remote_url=redis_url, remote_write="all")
    a, b = loops(extra), loops(extra)
    p = prompt(72)
    a.add("A", p, max_tokens=2)
    a.step()
    reference = a.snapshot("A", 64)
    a.run_until_idle()
    for w in a.workers:
        remote = w.connector.worker_side.remote
        assert remote is not None and remote.wait_idle(30) and remote.written == 2

    loads_asynchronously_byte_exact(b, p, reference, tier="remote")
