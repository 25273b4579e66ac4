"""KVortexEngine end to end: store and retrieve of one prompt's KV, against the raw Mover.

An 8B-shaped KV cache (32 layers, 8 KV heads, head 128, bf16, 16-token blocks: 128 KiB per
token), an 8K-token prompt, 256-token chunks. Each store uses a fresh prompt (a stored prompt
costs nothing to store again) in a host tier of a few prompts, so later stores also evict. Two
baselines: the Mover alone moving the same chunks (no hashing, no Directory, no mover thread:
the ratio says what the engine's bookkeeping costs), and one pinned memcpy of the same bytes
(the link's ceiling: the ratio says how close the public API comes to it). The engine is timed
through its public API from a Python list of token ids, block ids validated, hashing included.

    python bench/engine.py [--device cuda|cpu] [--layouts lbnhc,blnhc,fa_nhd] [--quick] [--json]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch
from _harness import Row, Stats, parser, report

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from kv_layouts import LAYOUTS, fill_random

from kvortex.engine import KVortexEngine
from kvortex.memory import HostSlabPool
from kvortex.transfer import Mover


def timed(fn: object, device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()  # type: ignore[operator]
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def run_layout(
    name: str, device: str, dims: tuple[int, int, int, int], repeat: int, rng: np.random.Generator
) -> tuple[list[Row], dict[str, float]]:
    """Engine and bare-Mover store/load figures for one layout."""
    L, H, D, tokens_n = dims
    N, chunk = 16, 256
    blocks = tokens_n // N
    rows: list[Row] = []
    ratios: dict[str, float] = {}
    kv = LAYOUTS[name](L, 2 * blocks + 1, N, H, D, torch.bfloat16, device)
    fill_random(kv, seed=1)
    nbytes_prompt = L * 2 * H * D * 2 * tokens_n
    engine = KVortexEngine(
        {"chunk_tokens": chunk, "cpu_bytes": 3 * nbytes_prompt}, model="bench-8b"
    )
    engine.register_kv_caches(kv, N)
    assert engine.layout is not None and engine.mover is not None
    src = list(range(blocks))
    dst = list(range(blocks, 2 * blocks))
    store_s, load_s = [], []
    for i in range(repeat + 1):
        tokens = rng.integers(0, 128_000, tokens_n).tolist()
        t_store = timed(lambda tok=tokens: engine.store(tok, src).wait(), device)
        h = None

        def retrieve(tok: list[int] = tokens) -> None:
            nonlocal h
            h = engine.retrieve(tok, dst)
            h.wait()

        t_load = timed(retrieve, device)
        assert h is not None and h.tokens == tokens_n, "retrieve must load the whole prompt"
        if i:  # the first round warms up (CUDA registration, module load)
            store_s.append(t_store)
            load_s.append(t_load)
    # Baseline: the Mover alone on a pool of its own, same chunks.
    bpc = chunk // N
    pool = HostSlabPool(engine.layout.chunk_bytes(bpc), tokens_n // chunk)
    mover = Mover(engine.layout, pool, bpc, path=engine.mover.path)
    slots = [pool.alloc() for _ in range(tokens_n // chunk)]
    raw_store = [timed(lambda: mover.store(src, slots).wait(), device) for _ in range(repeat)]
    raw_load = [timed(lambda: mover.load(slots, dst).wait(), device) for _ in range(repeat)]
    mover.close()
    pool.close()
    engine.close()
    memcpy_store, memcpy_load = _memcpy(nbytes_prompt, device, repeat)
    gb = nbytes_prompt / 1e9
    for impl, direction, samples in (
        ("memcpy", "store", memcpy_store),
        ("mover", "store", raw_store),
        ("engine", "store", store_s),
        ("memcpy", "load", memcpy_load),
        ("mover", "load", raw_load),
        ("engine", "retrieve", load_s),
    ):
        st = Stats.of(samples)
        rows.append(Row(f"{name} {direction}", impl, st, {"GB/s": gb / st.median}))
    ratios[f"{name} engine/mover store"] = Stats.of(raw_store).median / Stats.of(store_s).median
    ratios[f"{name} engine/mover load"] = Stats.of(raw_load).median / Stats.of(load_s).median
    ratios[f"{name} engine/memcpy store"] = Stats.of(memcpy_store).median / Stats.of(store_s).median
    ratios[f"{name} engine/memcpy load"] = Stats.of(memcpy_load).median / Stats.of(load_s).median
    return rows, ratios


def _memcpy(nbytes: int, device: str, repeat: int) -> tuple[list[float], list[float]]:
    """One contiguous copy of ``nbytes`` each way between device memory and pinned host memory
    (on CPU: two host buffers): the ceiling for the same bytes."""
    pinned = device.startswith("cuda")
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dev.fill_(7)
    to_host = [timed(lambda: host.copy_(dev, non_blocking=True), device) for _ in range(repeat + 1)]
    to_dev = [timed(lambda: dev.copy_(host, non_blocking=True), device) for _ in range(repeat + 1)]
    return to_host[1:], to_dev[1:]


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--layouts", default="lbnhc,blnhc,fa_nhd")
    args = p.parse_args()
    if args.quick:
        L, H, D, tokens_n, repeat = 2, 2, 16, 1024, args.repeat or 3
    else:
        L, H, D, tokens_n, repeat = 32, 8, 128, 8192, args.repeat or 8
    rows: list[Row] = []
    ratios: dict[str, float] = {}
    rng = np.random.default_rng(0)
    for name in args.layouts.split(","):
        layout_rows, layout_ratios = run_layout(name, args.device, (L, H, D, tokens_n), repeat, rng)
        rows += layout_rows
        ratios.update(layout_ratios)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    report(f"engine end to end, {tokens_n} tokens, {device}", rows, ratios, args.json)


if __name__ == "__main__":
    main()
