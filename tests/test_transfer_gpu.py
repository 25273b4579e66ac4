"""GPU tests of the CUDA copy engine (``kvortex._cuda``), mostly through :class:`Mover`.

Every layout of :mod:`kvortex.layout` is built with torch on the GPU the way vLLM builds it.
A store followed by a load into *different* block ids must bring back every byte of every
block, leave every other block untouched, and the host chunks the CUDA paths write must be
byte-identical to those of the torch fallback. Small sizes: the whole file runs in seconds.

Skipped as a whole only for a missing capability: no torch, no CUDA device, or no
``kvortex._cuda`` (with ``KVORTEX_REQUIRE_NATIVE=1`` a missing module fails instead).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from kvortex import _loader
from kvortex.errors import InvalidArgumentError

pytestmark = pytest.mark.gpu

DEVICE = "cuda"


def _missing_capability() -> str:
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    loaded = _loader.cuda()
    if loaded.module is None:
        if os.environ.get("KVORTEX_REQUIRE_NATIVE") == "1":
            raise RuntimeError(
                f"KVORTEX_REQUIRE_NATIVE=1 but kvortex._cuda is unavailable: {loaded.reason}"
            )
        return f"kvortex._cuda is unavailable: {loaded.reason}"
    return ""


_MISSING = _missing_capability()
if _MISSING:
    pytest.skip(_MISSING, allow_module_level=True)

import torch  # noqa: E402

from kvortex import memory  # noqa: E402
from kvortex.layout import PagedLayout  # noqa: E402
from kvortex.transfer import Mover  # noqa: E402

POISON = 0xA5  # every GPU byte before a load
SLOT_BYTES = 256 * 1024
NUM_SLOTS = 64
CUDA_PATHS = ["dma", "kernel"]

# kind -> the substring PagedLayout.kind must contain (guards the builders below).
KINDS = {
    "fa-nhd": "flash-attn (NHD)",
    "fa-hnd": "flash-attn (HND)",
    "fi-nhd": "flashinfer (NHD)",
    "fi-hnd": "flashinfer (HND)",
    "lbnhc": "per-layer (LBNHC)",
    "lbhnc": "per-layer (LBHNC)",
    "blnhc": "block-outermost (BLNHC)",
    "blhnc": "block-outermost (BLHNC)",
    "mla": "vllm-0.15 mla",
    "mla-033": "single-head (MLA)",
}


# -- building engine KV caches the way vLLM does ------------------------------------------------


@dataclass
class KV:
    """An engine KV cache plus what the checks need.

    Attributes:
        tensors: layer name -> that layer's KV tensor (what ``register_kv_caches`` gets).
        raw: uint8 tensors that together cover every byte of KV memory.
        block_dim: the block dimension of each layer tensor.
    """

    kind: str
    tensors: dict[str, torch.Tensor]
    raw: list[torch.Tensor]
    block_dim: int
    num_blocks: int
    block_size: int

    def layout(self) -> PagedLayout:
        layout = PagedLayout.from_kv_caches(
            self.tensors, self.block_size, num_blocks=self.num_blocks
        )
        assert KINDS[self.kind] in layout.kind, (self.kind, layout.kind)
        return layout

    def fill_random(self, seed: int) -> None:
        gen = torch.Generator(device=DEVICE)
        gen.manual_seed(seed)
        for r in self.raw:
            r.copy_(torch.randint(0, 256, r.shape, dtype=torch.uint8, device=DEVICE, generator=gen))

    def poison(self) -> None:
        for r in self.raw:
            r.fill_(POISON)

    def block(self, layer: str, block: int) -> torch.Tensor:
        """The bytes of one block of one layer, as the engine indexes it."""
        t = self.tensors[layer].select(self.block_dim, block).contiguous()
        return t.view(torch.uint8).reshape(-1)


def build_kv(
    kind: str,
    *,
    layers: int = 3,
    num_blocks: int = 40,
    block_size: int = 16,
    heads: int = 4,
    head_dim: int = 64,
    dtype: torch.dtype = torch.bfloat16,
) -> KV:
    """The per-layer tensors of one supported layout (see :mod:`kvortex.layout`)."""
    L, B, N, H, D = layers, num_blocks, block_size, heads, head_dim
    assert B > 2 and H != N, "keep shapes unambiguous for layout detection"
    names = [f"model.layers.{i}.self_attn.attn" for i in range(L)]
    # vLLM 0.15 per-layer tensors: HND is the NHD shape over H-before-N memory (a transpose).
    physical = {
        "fa-nhd": ((2, B, N, H, D), None),
        "fa-hnd": ((2, B, H, N, D), (2, 3)),
        "fi-nhd": ((B, 2, N, H, D), None),
        "fi-hnd": ((B, 2, H, N, D), (2, 3)),
        "mla": ((B, N, D), None),  # D is the latent width here (576 for DeepSeek)
    }
    if kind in physical:
        shape, swap = physical[kind]
        bases = [torch.empty(shape, dtype=dtype, device=DEVICE) for _ in names]
        tensors = {
            n: b if swap is None else b.transpose(*swap) for n, b in zip(names, bases, strict=True)
        }
        raw = [b.view(torch.uint8).view(-1) for b in bases]
        return KV(kind, tensors, raw, 1 if kind.startswith("fa") else 0, B, N)
    # vLLM 0.33: one shared buffer, per-layer [B, H, N, C] views; C = K and V concatenated
    # (2 * head_dim), or the latent width for MLA (one head).
    C = D if kind == "mla-033" else 2 * D
    if kind == "mla-033":
        H = 1
    item = torch.empty(0, dtype=dtype).element_size()
    buf = torch.empty(L * B * H * N * C * item, dtype=torch.uint8, device=DEVICE)
    typed = buf.view(dtype)
    if kind in ("lbnhc", "mla-033"):
        views = typed.view(L, B, N, H, C).permute(0, 1, 3, 2, 4)
    elif kind == "lbhnc":
        views = typed.view(L, B, H, N, C)
    elif kind == "blnhc":
        views = typed.view(B, L, N, H, C).permute(1, 0, 3, 2, 4)
    elif kind == "blhnc":
        views = typed.view(B, L, H, N, C).permute(1, 0, 2, 3, 4)
    else:
        raise AssertionError(f"unknown kind {kind}")
    tensors = {n: views[i] for i, n in enumerate(names)}
    return KV(kind, tensors, [buf], 0, B, N)


# -- host slots ---------------------------------------------------------------------------------

_KEEP_ALIVE: list[Any] = []


@pytest.fixture(scope="module")
def pool() -> Iterator[memory.HostSlabPool]:
    # One pool for the module: CUDA registration happens once (the first Mover) and stays.
    p = memory.HostSlabPool(SLOT_BYTES, NUM_SLOTS)
    yield p
    close = getattr(p, "close", None)
    if close is not None:
        close()


@pytest.fixture
def slots(pool: memory.HostSlabPool) -> Iterator[Any]:
    """``take(n)`` allocates n slots; all are freed after the test."""
    taken: list[int] = []

    def take(n: int) -> list[int]:
        new = [pool.alloc() for _ in range(n)]
        taken.extend(new)
        return new

    yield take
    for s in taken:
        pool.free(s)


def host_bytes(pool: memory.HostSlabPool, slot: int, n: int) -> np.ndarray:
    return np.frombuffer(pool.view(slot), dtype=np.uint8, count=n)


def fill_host(pool: memory.HostSlabPool, slot: int, value: int) -> None:
    np.frombuffer(pool.view(slot), dtype=np.uint8)[:] = value


# -- checks -------------------------------------------------------------------------------------


def assert_same_host(
    pool: memory.HostSlabPool, got: Sequence[int], want: Sequence[int], n: int
) -> None:
    """Host chunks in slots ``got`` equal those in ``want`` byte for byte."""
    for c, (g, w) in enumerate(zip(got, want, strict=True)):
        a, b = host_bytes(pool, g, n), host_bytes(pool, w, n)
        if not np.array_equal(a, b):
            bad = np.flatnonzero(a != b)
            pytest.fail(
                f"chunk {c}: {bad.size} of {n} host bytes differ from the torch path's, first at "
                f"byte {bad[0]} (got {a[bad[0]]:#x}, torch wrote {b[bad[0]]:#x})"
            )


def snapshot(kv: KV, blocks: Sequence[int]) -> dict[tuple[str, int], torch.Tensor]:
    return {(n, b): kv.block(n, b).clone() for n in kv.tensors for b in set(blocks)}


def assert_loaded(
    kv: KV,
    src: Sequence[int],
    dst: Sequence[int],
    before: dict[tuple[str, int], torch.Tensor],
) -> None:
    """Block ``dst[i]`` holds what block ``src[i]`` held; every other block is still poison."""
    torch.cuda.synchronize()
    for name in kv.tensors:
        for s, d in zip(src, dst, strict=True):
            got, want = kv.block(name, d), before[(name, s)]
            if not torch.equal(got, want):
                bad = torch.nonzero(got != want).flatten()
                pytest.fail(
                    f"{kv.kind} {name}: block {d} (loaded from block {s}'s chunk) differs in "
                    f"{bad.numel()} of {got.numel()} bytes, first at byte {int(bad[0])}"
                )
        for b in sorted(set(range(kv.num_blocks)) - set(dst)):
            got = kv.block(name, b)
            if not bool((got == POISON).all()):
                pytest.fail(f"{kv.kind} {name}: block {b} was not loaded but was written to")


def store_and_compare(
    kv: KV,
    pool: memory.HostSlabPool,
    take: Any,
    path: str,
    bpc: int,
    src: Sequence[int],
    *,
    max_ctas: int = 16,
) -> tuple[Mover, list[int]]:
    """Store ``src`` with ``path`` and with the torch path; assert identical host bytes.

    Returns the (open) mover and the slots ``path`` wrote."""
    layout = kv.layout()
    chunks = len(src) // bpc
    got, want = take(chunks), take(chunks)
    for s in got:
        fill_host(pool, s, 0x11)  # different garbage, so an unwritten byte cannot match
    for s in want:
        fill_host(pool, s, 0x22)
    mover = Mover(layout, pool, bpc, path=path, max_ctas=max_ctas)
    assert mover.path == path
    with Mover(layout, pool, bpc, path="torch") as reference:
        mover.store(list(src), got).wait()
        reference.store(list(src), want).wait()
    assert_same_host(pool, got, want, layout.chunk_bytes(bpc))
    return mover, got


def roundtrip(
    kv: KV,
    pool: memory.HostSlabPool,
    take: Any,
    path: str,
    bpc: int,
    src: Sequence[int],
    dst: Sequence[int],
    *,
    max_ctas: int = 16,
    seed: int = 0,
) -> None:
    kv.fill_random(seed)
    mover, got = store_and_compare(kv, pool, take, path, bpc, src, max_ctas=max_ctas)
    with mover:
        before = snapshot(kv, src)
        kv.poison()
        mover.load(got, list(dst)).wait()
    assert_loaded(kv, src, dst, before)


# Three chunks of 4: contiguous from block 0; scattered and descending; adjacent but
# descending, through the last block.
SRC = [0, 1, 2, 3, 30, 21, 9, 4, 39, 38, 37, 36]
DST = [10, 11, 12, 13, 35, 34, 33, 32, 5, 22, 8, 39]


# -- the module itself --------------------------------------------------------------------------


def cuda_module() -> Any:
    module = _loader.cuda().module
    assert module is not None
    return module


def test_module_sees_the_device() -> None:
    c = cuda_module()
    assert c.device_count() == torch.cuda.device_count(), (
        f"kvortex._cuda sees {c.device_count()} devices, torch {torch.cuda.device_count()} "
        f"(runtime {c.runtime_version()}, driver {c.driver_version()})"
    )
    assert c.runtime_version() >= 11000
    assert c.driver_version() >= 11000


def test_register_host_is_idempotent() -> None:
    c = cuda_module()
    buf = np.zeros(1 << 20, dtype=np.uint8)
    ptr = buf.ctypes.data
    c.register_host(ptr, buf.nbytes)
    c.register_host(ptr, buf.nbytes)  # already registered: fine
    c.unregister_host(ptr)
    c.unregister_host(ptr)  # not registered any more: ignored


@pytest.mark.parametrize("nbytes", [0, -1])
def test_register_host_rejects_bad_sizes(nbytes: int) -> None:
    buf = np.zeros(4096, dtype=np.uint8)
    with pytest.raises(InvalidArgumentError, match="nbytes"):
        cuda_module().register_host(buf.ctypes.data, nbytes)


def _args(layout: PagedLayout, ids: list[int], addrs: list[int], bpc: int) -> dict[str, Any]:
    return {
        "plane_bases": np.array([p.base for p in layout.planes], dtype=np.uint64),
        "block_stride": layout.planes[0].block_stride,
        "page_bytes": layout.page_bytes,
        "blocks_per_chunk": bpc,
        "block_ids": np.array(ids, dtype=np.int64),
        "slot_addrs": np.array(addrs, dtype=np.uint64),
    }


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"method": 4}, "method"),
        ({"method": -1}, "method"),
        ({"page_bytes": 0}, "page_bytes"),
        ({"blocks_per_chunk": 0}, "blocks_per_chunk"),
        ({"max_ctas": 0}, "max_ctas"),
        ({"block_stride": 16}, "block_stride"),
        ({"block_ids": np.array([0, 1, 2], dtype=np.int64)}, "block ids"),
        ({"block_ids": np.array([0, -2], dtype=np.int64)}, "block_ids"),
        ({"plane_bases": np.zeros(0, dtype=np.uint64)}, "plane_bases"),
        ({"plane_bases": np.zeros(1, dtype=np.uint64)}, "plane_bases"),
        ({"slot_addrs": np.zeros(1, dtype=np.uint64)}, "slot_addrs"),
    ],
)
def test_copy_pages_validates(change: dict[str, Any], message: str) -> None:
    kv = build_kv("fa-nhd", layers=1, num_blocks=4)
    args = _args(kv.layout(), [0, 1], [4096], 2)
    call = {"to_host": True, "method": 0, **args, "stream": 0, "max_ctas": 4, **change}
    with pytest.raises(InvalidArgumentError, match=message):
        cuda_module().copy_pages(**call)


def test_kernel_refuses_unregistered_host_memory() -> None:
    # The kernel would fault on it and poison the CUDA context: it must be refused up front.
    kv = build_kv("blnhc", num_blocks=4)
    layout = kv.layout()
    host = np.zeros(layout.chunk_bytes(1) + 4096, dtype=np.uint8)
    args = _args(layout, [1], [host.ctypes.data], 1)
    stream = torch.cuda.Stream()
    with pytest.raises(InvalidArgumentError, match="register"):
        cuda_module().copy_pages(True, 1, **args, stream=stream.cuda_stream, max_ctas=4)
    torch.cuda.synchronize()  # the context is still healthy
    assert int(torch.ones(8, device=DEVICE).sum()) == 8


def test_copy_pages_refuses_host_plane_bases() -> None:
    host = np.zeros(1 << 16, dtype=np.uint8)
    kv = build_kv("mla", layers=1, num_blocks=4)
    args = _args(kv.layout(), [0], [host.ctypes.data], 1)
    args["plane_bases"] = np.array([host.ctypes.data], dtype=np.uint64)
    with pytest.raises(InvalidArgumentError, match="not GPU memory"):
        cuda_module().copy_pages(True, 0, **args, stream=0, max_ctas=4)


@pytest.mark.parametrize("kind", ["fa-nhd", "blnhc", "mla-033"])
def test_every_method_directly(kind: str, pool: memory.HostSlabPool, slots: Any) -> None:
    """Methods 0-3 of copy_pages (naive and unbatched DMA are not Mover paths)."""
    kv = build_kv(kind)
    kv.fill_random(7)
    layout = kv.layout()
    bpc = 4
    n = layout.chunk_bytes(bpc)
    # A kernel Mover registers the pool (it stays registered for the module).
    with (
        Mover(layout, pool, bpc, path="torch") as reference,
        Mover(layout, pool, bpc, path="kernel"),
    ):
        want = slots(3)
        reference.store(SRC, want).wait()
        before = snapshot(kv, SRC)
        stream = torch.cuda.Stream()
        for method in range(4):
            kv.fill_random(7)  # the same bytes again (the previous load poisoned the rest)
            got = slots(3)
            for s in got:
                fill_host(pool, s, 0x11)
            args = _args(layout, SRC, [pool.address(s) for s in got], bpc)
            stream.wait_stream(torch.cuda.current_stream())
            cuda_module().copy_pages(True, method, **args, stream=stream.cuda_stream, max_ctas=8)
            stream.synchronize()
            assert_same_host(pool, got, want, n)
            kv.poison()
            args = _args(layout, DST, [pool.address(s) for s in got], bpc)
            stream.wait_stream(torch.cuda.current_stream())
            cuda_module().copy_pages(False, method, **args, stream=stream.cuda_stream, max_ctas=8)
            stream.synchronize()
            assert_loaded(kv, SRC, DST, before)


def test_copy_pages_on_the_legacy_default_stream(pool: memory.HostSlabPool, slots: Any) -> None:
    """Stream 0 (no batching there) still copies correctly."""
    kv = build_kv("lbnhc")
    kv.fill_random(8)
    layout = kv.layout()
    with Mover(layout, pool, 4, path="torch") as reference, Mover(layout, pool, 4, path="dma"):
        want, got = slots(3), slots(3)
        reference.store(SRC, want).wait()
        args = _args(layout, SRC, [pool.address(s) for s in got], 4)
        torch.cuda.synchronize()
        cuda_module().copy_pages(True, 0, **args, stream=0, max_ctas=8)
        torch.cuda.synchronize()
        assert_same_host(pool, got, want, layout.chunk_bytes(4))


# -- every layout, both CUDA paths, through Mover ------------------------------------------------


@pytest.mark.parametrize("path", [*CUDA_PATHS, "torch"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_roundtrip_every_layout(
    kind: str, path: str, pool: memory.HostSlabPool, slots: Any
) -> None:
    head_dim = 576 if kind.startswith("mla") else 64
    roundtrip(build_kv(kind, head_dim=head_dim), pool, slots, path, 4, SRC, DST)


@pytest.mark.parametrize("path", CUDA_PATHS)
@pytest.mark.parametrize("kind", ["fa-hnd", "blhnc", "mla"])
def test_one_block_per_chunk(kind: str, path: str, pool: memory.HostSlabPool, slots: Any) -> None:
    kv = build_kv(kind)
    roundtrip(kv, pool, slots, path, 1, [39, 0, 17], [3, 39, 20])


@pytest.mark.parametrize("max_ctas", [1, 3, 64])
def test_kernel_cta_counts(max_ctas: int, pool: memory.HostSlabPool, slots: Any) -> None:
    roundtrip(build_kv("fi-nhd"), pool, slots, "kernel", 4, SRC, DST, max_ctas=max_ctas)


# Pages not a multiple of 16 bytes: the kernel's narrower loops (8, 4, 2 and 1 bytes).
ODD_PAGES = [
    pytest.param(torch.float16, 3, 4, id="fp16-24B"),  # 3 tokens x 1 head x 4 x 2 B
    pytest.param(torch.float32, 5, 3, id="fp32-60B"),
    pytest.param(torch.float16, 5, 3, id="fp16-30B"),
    pytest.param(torch.uint8, 5, 3, id="u8-15B"),
]


@pytest.mark.parametrize("path", CUDA_PATHS)
@pytest.mark.parametrize(("dtype", "block_size", "head_dim"), ODD_PAGES)
@pytest.mark.parametrize("kind", ["fa-nhd", "blnhc"])
def test_odd_page_sizes(
    kind: str,
    dtype: torch.dtype,
    block_size: int,
    head_dim: int,
    path: str,
    pool: memory.HostSlabPool,
    slots: Any,
) -> None:
    kv = build_kv(kind, heads=1, block_size=block_size, head_dim=head_dim, dtype=dtype)
    if kind == "fa-nhd":
        assert kv.layout().page_bytes % 16 != 0
    roundtrip(kv, pool, slots, path, 4, SRC, DST)


@pytest.mark.parametrize("path", CUDA_PATHS)
def test_random_plans_match_torch(path: str, pool: memory.HostSlabPool) -> None:
    rng = np.random.default_rng(1234)
    kinds = list(KINDS)
    for trial in range(12):
        kind = kinds[int(rng.integers(len(kinds)))]
        bpc = int(rng.integers(1, 5))
        chunks = int(rng.integers(1, 5))
        kv = build_kv(kind, head_dim=576 if kind.startswith("mla") else 64)
        src = [int(b) for b in rng.permutation(kv.num_blocks)[: bpc * chunks]]
        dst = [int(b) for b in rng.permutation(kv.num_blocks)[: bpc * chunks]]
        taken: list[int] = []

        def take(n: int, taken: list[int] = taken) -> list[int]:
            new = [pool.alloc() for _ in range(n)]
            taken.extend(new)
            return new

        try:
            roundtrip(kv, pool, take, path, bpc, src, dst, seed=trial)
        finally:
            for s in taken:
                pool.free(s)


@pytest.mark.parametrize("path", CUDA_PATHS)
def test_adjacent_slots_and_blocks(path: str) -> None:
    """Chunk-sized slots: consecutive chunks may merge into one copy across slots."""
    kv = build_kv("blnhc", layers=2)
    layout = kv.layout()
    bpc = 2
    p = memory.HostSlabPool(layout.chunk_bytes(bpc), 8)
    # Never let this pool's memory go while CUDA may still hold it registered (a pool without
    # close() keeps its registration until exit; a reused address would alias stale pages).
    _KEEP_ALIVE.append(p)
    try:
        taken = [p.alloc() for _ in range(4)]
        src = [4, 5, 6, 7, 8, 9, 10, 11]
        dst = [20, 21, 22, 23, 24, 25, 26, 27]
        kv.fill_random(3)
        before = snapshot(kv, src)
        with Mover(layout, p, bpc, path=path) as mover:
            mover.store(src, taken).wait()
            kv.poison()
            mover.load(taken, dst).wait()
        assert_loaded(kv, src, dst, before)
    finally:
        close = getattr(p, "close", None)
        if close is not None:
            close()


@pytest.mark.parametrize("path", CUDA_PATHS)
def test_large_transfers_over_every_dma_lane(path: str) -> None:
    """16 MiB moves: the DMA path splits them over its private copy streams (lanes)."""
    kv = build_kv("fa-nhd", layers=4, num_blocks=96, heads=8, head_dim=128)
    layout = kv.layout()
    bpc = 16
    n = layout.chunk_bytes(bpc)  # 4 MiB
    p = memory.HostSlabPool(n, 16)
    _KEEP_ALIVE.append(p)
    try:
        taken: list[int] = []

        def take(count: int) -> list[int]:
            new = [p.alloc() for _ in range(count)]
            taken.extend(new)
            return new

        src = [b for c in (5, 0, 3, 1) for b in range(c * bpc, (c + 1) * bpc)]
        dst = [b for c in (2, 4, 5, 0) for b in range(c * bpc, (c + 1) * bpc)]
        roundtrip(kv, p, take, path, bpc, src, dst, seed=11)
        # A store and a load at once, each over its own lanes.
        kv.fill_random(12)
        first, second = src[: 2 * bpc], src[2 * bpc :]
        target = [b for c in (2, 4) for b in range(c * bpc, (c + 1) * bpc)]  # neither of them
        with Mover(layout, p, bpc, path=path) as mover, Mover(layout, p, bpc, path="torch") as ref:
            s1, s2, ref2 = take(2), take(2), take(2)
            mover.store(first, s1).wait()
            before = snapshot(kv, first)
            ref.store(second, ref2).wait()
            load = mover.load(s1, target)
            store = mover.store(second, s2)
            load.wait()
            store.wait()
        assert_same_host(p, s2, ref2, n)
        torch.cuda.synchronize()
        for name in kv.tensors:
            for s, d in zip(first, target, strict=True):
                assert torch.equal(kv.block(name, d), before[(name, s)]), (name, s, d)
    finally:
        close = getattr(p, "close", None)
        if close is not None:
            close()


# -- streams and ordering -----------------------------------------------------------------------


def _busy_current_stream() -> None:
    """Queue ~tens of milliseconds of work on the current stream (not synchronised)."""
    sleep = getattr(torch.cuda, "_sleep", None)
    if sleep is not None:
        sleep(50_000_000)
        return
    a = torch.randn(2048, 2048, device=DEVICE)
    for _ in range(50):
        a = a @ a
        a = a / a.norm()


@pytest.mark.parametrize("path", [*CUDA_PATHS, "torch"])
def test_store_is_ordered_after_the_current_stream(
    path: str, pool: memory.HostSlabPool, slots: Any
) -> None:
    kv = build_kv("lbhnc")
    kv.fill_random(1)
    layout = kv.layout()
    fresh = [torch.randint(0, 256, r.shape, dtype=torch.uint8, device=DEVICE) for r in kv.raw]
    torch.cuda.synchronize()
    got, want = slots(3), slots(3)
    with Mover(layout, pool, 4, path=path) as mover, Mover(layout, pool, 4, path="torch") as ref:
        _busy_current_stream()
        for r, f in zip(
            kv.raw, fresh, strict=True
        ):  # the forward pass writing the KV, still queued
            r.copy_(f)
        mover.store(SRC, got).wait()
        torch.cuda.synchronize()
        ref.store(SRC, want).wait()
    assert_same_host(pool, got, want, layout.chunk_bytes(4))


@pytest.mark.parametrize("path", [*CUDA_PATHS, "torch"])
def test_load_is_ordered_after_the_current_stream(
    path: str, pool: memory.HostSlabPool, slots: Any
) -> None:
    kv = build_kv("fa-nhd")
    kv.fill_random(2)
    layout = kv.layout()
    name = next(iter(kv.tensors))
    old = kv.block(name, DST[0]).cpu()
    got = slots(3)
    with Mover(layout, pool, 4, path=path) as mover:
        mover.store(SRC, got).wait()
        torch.cuda.synchronize()
        _busy_current_stream()
        read = kv.block(name, DST[0]).clone()  # a queued kernel still reading the block
        handle = mover.load(got, DST)
        handle.wait()
        torch.cuda.synchronize()
    assert torch.equal(read.cpu(), old), "the load overwrote a block a queued kernel still read"
    assert not torch.equal(kv.block(name, DST[0]).cpu(), old)


@pytest.mark.parametrize("path", CUDA_PATHS)
def test_store_and_load_concurrently(path: str, pool: memory.HostSlabPool, slots: Any) -> None:
    kv = build_kv("fi-hnd", num_blocks=64)
    kv.fill_random(5)
    layout = kv.layout()
    bpc = 4
    first = list(range(0, 16))  # stored first, then loaded into `target`
    second = list(range(16, 32))  # stored while the load runs
    target = list(range(40, 56))
    s1, s2, ref2 = slots(4), slots(4), slots(4)
    with (
        Mover(layout, pool, bpc, path=path) as mover,
        Mover(layout, pool, bpc, path="torch") as ref,
    ):
        mover.store(first, s1).wait()
        before = snapshot(kv, first)
        ref.store(second, ref2).wait()
        for t in kv.tensors.values():  # zero the targets, so the load has to be visible
            for b in target:
                t.select(kv.block_dim, b).zero_()
        torch.cuda.synchronize()
        load = mover.load(s1, target)
        store = mover.store(second, s2)
        load.wait()
        store.wait()
    assert_same_host(pool, s2, ref2, layout.chunk_bytes(bpc))
    for name in kv.tensors:
        for s, d in zip(first, target, strict=True):
            assert torch.equal(kv.block(name, d), before[(name, s)]), (name, s, d)
