"""KVortexEngine on CUDA tensors: store, garble, retrieve into other blocks, bytes equal.

Skipped as a whole only when there is no CUDA device or no ``kvortex._cuda``.
"""

from __future__ import annotations

import random
import threading

import pytest
import torch
from kv_layouts import LAYOUTS, fill_random

from kvortex import _loader
from kvortex.engine import KVortexEngine
from kvortex.errors import InvalidArgumentError

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("torch sees no CUDA device", allow_module_level=True)
if _loader.cuda().module is None:
    pytest.skip(f"kvortex._cuda: {_loader.cuda().reason}", allow_module_level=True)

L, B, N, H, D = 4, 96, 16, 2, 64
CHUNK = 64


def block(t: torch.Tensor, name: str, b: int) -> torch.Tensor:
    """Block ``b`` of one layer tensor as raw 16-bit words (random bytes hold bf16 NaNs, which
    never compare equal). The K/V dim comes first in FlashAttention's shape."""
    return (t[:, b] if name.startswith("fa_") else t[b]).view(torch.int16)


@pytest.mark.parametrize("path", ["auto", "dma", "kernel"])
@pytest.mark.parametrize("name", ["fa_nhd", "flashinfer", "lbnhc", "blnhc", "mla_033"])
def test_engine_round_trip_on_gpu(name: str, path: str) -> None:
    kv = LAYOUTS[name](L, B, N, H, D, torch.bfloat16, "cuda")
    fill_random(kv, seed=11)
    engine = KVortexEngine(
        {"chunk_tokens": CHUNK, "cpu_bytes": "64MiB"}, model="gpu-test", transfer_path=path
    )
    engine.register_kv_caches(kv, N)
    rng = random.Random(5)
    tokens = [rng.randrange(50_000) for _ in range(200)]  # 3 chunks + 8 tokens
    src = list(range(20, 33))
    dst = rng.sample(range(40, B), 13)  # scattered: the kernel path's case
    expected = [[block(t, name, b).clone() for t in kv.values()] for b in src[:12]]
    with engine:
        engine.store(tokens, src).wait(30)
        for b in src + dst:
            for t in kv.values():
                block(t, name, b).fill_(-3)
        r = engine.retrieve(tokens, dst)
        r.wait(30)
        assert r.tokens == 192
        for i, b in enumerate(dst[:12]):
            for j, t in enumerate(kv.values()):
                assert torch.equal(block(t, name, b), expected[i][j]), (i, j)
        assert all(bool((block(t, name, dst[12]) == -3).all()) for t in kv.values())


@pytest.mark.parametrize("path", ["dma", "kernel"])
@pytest.mark.parametrize("name", ["fa_nhd", "blnhc"])
def test_skipped_pages_on_gpu(name: str, path: str) -> None:
    from kvortex.layout import PagedLayout
    from kvortex.memory import HostSlabPool
    from kvortex.transfer import Mover

    kv = LAYOUTS[name](L, B, N, H, D, torch.bfloat16, "cuda")
    fill_random(kv, seed=3)
    layout = PagedLayout.from_kv_caches(kv, N)
    with HostSlabPool(layout.chunk_bytes(4), 2) as pool, Mover(layout, pool, 4, path=path) as m:
        slot = pool.alloc()
        expected = [[block(t, name, b).clone() for t in kv.values()] for b in (10, 11, 12, 13)]
        m.store([10, 11, 12, 13], [slot]).wait()
        for b in (50, 51, 52, 53):
            for t in kv.values():
                block(t, name, b).fill_(-3)
        m.load([slot], [50, 51, 52, 53], skip=[True, False, True, False]).wait()
        with pytest.raises(InvalidArgumentError):  # -1 is no block id
            m.load([slot], [-1, 51, -1, 53])
        for b in (50, 52):
            assert all(bool((block(t, name, b) == -3).all()) for t in kv.values())
        for i, b in ((1, 51), (3, 53)):
            assert all(
                torch.equal(block(t, name, b), expected[i][j]) for j, t in enumerate(kv.values())
            )


class _SlowMover:
    """Builds a Mover whose CUDA copy signals, then dawdles before launching: the window in
    which another thread may close the pool."""

    @staticmethod
    def build(layout, pool, bpc, path):  # type: ignore[no-untyped-def]
        from kvortex.transfer import Mover

        class Slow(Mover):
            copying = threading.Event()

            def _cuda_copy(self, *args, **kwargs):  # type: ignore[no-untyped-def]
                self.copying.set()
                threading.Event().wait(0.3)
                return super()._cuda_copy(*args, **kwargs)

        return Slow(layout, pool, bpc, path=path)


@pytest.mark.parametrize("path", ["dma", "kernel"])
def test_pool_close_during_a_transfer_being_prepared(path: str) -> None:
    """Closing the pool while another thread prepares a copy: close waits for the launch and
    the copy, then unregisters and unmaps; the copy never runs against unmapped memory."""
    from kvortex.layout import PagedLayout
    from kvortex.memory import HostSlabPool

    kv = LAYOUTS["blnhc"](L, B, N, H, D, torch.bfloat16, "cuda")
    fill_random(kv, seed=4)
    layout = PagedLayout.from_kv_caches(kv, N)
    pool = HostSlabPool(layout.chunk_bytes(4), 2)
    mover = _SlowMover.build(layout, pool, 4, path)
    slot = pool.alloc()
    view = pool.view(slot)  # keeps the memory readable after the pool closes
    ids = [20, 21, 22, 23]
    expected = torch.cat(
        [block(t, "blnhc", b).reshape(-1).view(torch.uint8).cpu() for b in ids for t in kv.values()]
    )
    errors: list[BaseException] = []

    def store() -> None:
        try:
            mover.store(ids, [slot]).wait()
        except BaseException as exc:  # reported below
            errors.append(exc)

    thread = threading.Thread(target=store)
    thread.start()
    assert mover.copying.wait(10)
    pool.close()
    thread.join(30)
    assert not thread.is_alive() and not errors, errors
    torch.cuda.synchronize()
    host = torch.frombuffer(bytearray(view[: layout.chunk_bytes(4)]), dtype=torch.uint8)
    assert sorted(host.numpy().tobytes()) == sorted(expected.numpy().tobytes())


@pytest.mark.parametrize("path", ["dma", "kernel"])
def test_engine_disk_tier_on_gpu(path: str, tmp_path: object) -> None:
    """CUDA KV, a host tier of two chunks, the disk tier behind it: a prompt evicted from
    host memory comes back from disk into the GPU blocks, bit for bit; and after a restart."""
    from kvortex.layout import PagedLayout

    name = "blnhc"
    kv = LAYOUTS[name](L, B, N, H, D, torch.bfloat16, "cuda")
    fill_random(kv, seed=13)
    chunk_bytes = PagedLayout.from_kv_caches(kv, N).chunk_bytes(CHUNK // N)
    config = {
        "chunk_tokens": CHUNK,
        "cpu_bytes": 2 * chunk_bytes,
        "disk_path": str(tmp_path),
        "disk_admission": "all",
    }
    rng = random.Random(6)
    prompts = [[rng.randrange(50_000) for _ in range(128)] for _ in range(3)]  # 2 chunks each
    src = list(range(0, 8))
    expected = []
    with KVortexEngine(config, model="gpu-disk", transfer_path=path) as engine:
        engine.register_kv_caches(kv, N)
        for p in prompts:
            fill_random(kv, seed=len(expected) + 20)
            expected.append([[block(t, name, b).clone() for t in kv.values()] for b in src])
            engine.store(p, src).wait(30)
            assert engine.disk is not None and engine.disk.wait_idle(30)
        dst = list(range(60, 68))
        r = engine.retrieve(prompts[0], dst)  # evicted from host memory: from disk
        r.wait(30)
        assert r.tokens == 128 and engine.disk.read_chunks >= 2
        for i, b in enumerate(dst):
            for j, t in enumerate(kv.values()):
                assert torch.equal(block(t, name, b), expected[0][i][j]), (i, j)
    with KVortexEngine(config, model="gpu-disk", transfer_path=path) as again:
        again.register_kv_caches(kv, N)
        for k, p in enumerate(prompts):
            dst = list(range(70, 78))
            for b in dst:
                for t in kv.values():
                    block(t, name, b).fill_(-3)
            r = again.retrieve(p, dst)
            r.wait(30)
            assert r.tokens == 128
            for i, b in enumerate(dst):
                for j, t in enumerate(kv.values()):
                    assert torch.equal(block(t, name, b), expected[k][i][j]), (k, i, j)
