"""KVortexConnector's worker role on the KV tensors vLLM allocates, for every layout.

0.33: ``allocate_kv_cache`` for LBNHC, LBHNC, BLNHC, BLHNC; 0.15: the GPU model runner's own
allocation for FlashAttention NHD / HND and FlashInfer NHD. Each worker is stepped through
the per-step hooks one by one (handle_preemptions, bind, start_load_kv, per-layer
wait_for_layer_load / save_kv_layer, wait_for_save, get_finished / get_transfer_results,
get_block_ids_with_load_errors, clear), with metadata from a real scheduler-role connector or
built by hand.
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
from vllm_support import (
    BLOCK,
    LAYERS,
    MODERN,
    SENTINEL,
    WORKER_LAYOUTS,
    EngineLoop,
    build_loop,
    make_metadata,
    prompt,
)

from kvortex.plan import ChunkOp, RequestOps, TransferPlan

pytestmark = pytest.mark.vllm

# Planes per layout (docs/architecture.md): a block maps to one page in every plane.
PLANES = {
    "LBNHC": 2,  # one per layer
    "LBHNC": 2,
    "BLNHC": 1,  # block-outermost: one page holds every layer of a block
    "BLHNC": 1,
    "fa-nhd": 4,  # K and V of each layer
    "fa-hnd": 4,
    "fi-nhd": 2,  # one per layer
}


Loops = Callable[..., EngineLoop]


@pytest.fixture
def loops() -> Iterator[Loops]:
    """``loops(layout=..., tp_size=...)``: an EngineLoop whose workers are stepped through the
    hooks one by one; closed at teardown."""
    made: list[EngineLoop] = []

    def make(**kwargs: Any) -> EngineLoop:
        loop = build_loop(mode="manual", **kwargs)
        made.append(loop)
        return loop

    yield make
    for loop in made:
        loop.close()


def slots_of(blocks: list[int]) -> torch.Tensor:
    return torch.tensor([b * BLOCK + i for b in blocks for i in range(BLOCK)])


def stored_prompt(loop: EngineLoop, tokens: list[int]) -> list[dict[str, torch.Tensor]]:
    """Compute ``tokens`` as request A, let it finish and be stored; return the raw KV words
    of its first two chunks on every worker (taken right after the forward pass)."""
    loop.add("A", tokens, max_tokens=2)
    loop.step()
    reference = loop.snapshot("A", 64)
    loop.run_until_idle()
    assert len(loop.stored_keys()) == 2
    return reference


@pytest.mark.parametrize("layout", WORKER_LAYOUTS)
def test_store_wipe_load_gives_identical_bytes(loops: Loops, layout: str) -> None:
    loop = loops(layout=layout)
    worker = loop.workers[0]
    assert worker.connector.worker_side.layout.num_planes == PLANES[layout]
    p = prompt(72)
    loop.add("A", p, max_tokens=2)
    loop.step()
    a_blocks = loop.block_ids("A")[:4]
    reference = loop.snapshot("A", 64)
    loop.run_until_idle()
    loop.wipe()  # every KV byte overwritten: only the host tier has A's KV now

    loop.add("B", p, max_tokens=2)
    so = loop.step()
    assert {r.req_id: r.num_computed_tokens for r in so.scheduled_new_reqs} == {"B": 64}
    b_blocks = loop.block_ids("B")[:4]
    assert not set(a_blocks) & set(b_blocks), "B should load into other blocks than A's"
    got = loop.snapshot("B", 64)[0]
    for name in LAYERS:
        assert torch.equal(got[name], reference[0][name]), name
    loop.run_until_idle()
    loop.assert_clean()


def test_every_layout_was_allocated_by_vllm(loops: Loops) -> None:
    """The layouts really differ in shape and strides (vLLM's allocator, not ours)."""
    seen = set()
    for layout in WORKER_LAYOUTS:
        t = loops(layout=layout).workers[0].kv.tensors[LAYERS[0]]
        seen.add((tuple(t.shape), t.stride()))
    assert len(seen) == len(WORKER_LAYOUTS)


@pytest.mark.parametrize("layout", WORKER_LAYOUTS)
def test_a_slot_the_worker_never_stored_is_a_load_error(loops: Loops, layout: str) -> None:
    loop = loops(layout=layout)
    p = prompt(72)
    reference = stored_prompt(loop, p)[0]
    [store] = [ops for plan in loop.plans() for ops in plan.stores]
    first, second = store.chunks
    worker = loop.workers[0]
    worker.kv.wipe()
    never = max(first.slot, second.slot) + 5  # a slot no plan ever stored into
    plan = TransferPlan(
        step=10_000,
        loads=(
            RequestOps("never", (ChunkOp(first.key, never, (10, 11)),)),
            RequestOps("other", (ChunkOp(first.key, second.slot, (12, 13)),)),  # other key
            RequestOps("good", (ChunkOp(first.key, first.slot, (14, 15)),)),
            RequestOps("skip", (ChunkOp(second.key, second.slot, (17, 16), skip_pages=1),)),
        ),
    )
    errors: set[int] = set()
    out = worker.run_metadata(make_metadata(plan))
    errors |= set(out.invalid_block_ids or ())
    for _ in range(3):  # a worker may report a step later: poll like vLLM does
        out = worker.run_metadata(make_metadata(TransferPlan(step=10_001)))
        errors |= set(out.invalid_block_ids or ())
    assert errors == {10, 11, 12, 13}

    for name in LAYERS:
        # Refused loads leave their blocks alone.
        assert bool((worker.kv.read(name, slots_of([10, 11, 12, 13])) == SENTINEL).all())
        # The good chunk holds A's chunk 0; the half-skipped one A's tokens 48..63 only.
        assert torch.equal(worker.kv.read(name, slots_of([14, 15])), reference[name][:32])
        assert torch.equal(worker.kv.read(name, slots_of([16])), reference[name][48:64])
        # The skipped page (vLLM's own prefix-cache block) is left alone.
        assert bool((worker.kv.read(name, slots_of([17])) == SENTINEL).all())


def test_two_tensor_parallel_ranks_keep_their_own_shards(loops: Loops) -> None:
    loop = loops(tp_size=2)
    ranks = loop.workers
    assert [w.connector.worker_side.rank for w in ranks] == [0, 1]
    # Each rank holds its share of the KV heads, and different contents.
    assert ranks[0].kv.token_shape() == ranks[1].kv.token_shape()
    p = prompt(72)
    reference = stored_prompt(loop, p)
    assert not torch.equal(reference[0][LAYERS[0]], reference[1][LAYERS[0]])
    loop.wipe()

    loop.add("B", p, max_tokens=2)
    so = loop.step()
    assert {r.req_id: r.num_computed_tokens for r in so.scheduled_new_reqs} == {"B": 64}
    got = loop.snapshot("B", 64)
    for rank in (0, 1):
        for name in LAYERS:
            assert torch.equal(got[rank][name], reference[rank][name]), (rank, name)
    loop.run_until_idle()
    loop.assert_clean()


def test_required_layout(loops: Loops) -> None:
    loop = loops()
    cls = type(loop.workers[0].connector)
    assert cls.get_required_kvcache_layout(loop.scheduler.vllm_config) == (
        "BLNHC" if MODERN else None
    )
