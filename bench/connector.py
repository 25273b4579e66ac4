"""The vLLM connector's worker path without vLLM: per-step store and load of one prompt.

Drives the connector's two halves (``SchedulerSide`` plans, ``WorkerSide`` executes) exactly as
the vLLM hooks do (request_finished -> build_connector_meta -> start_load_kv -> get_finished;
get_num_new_matched_tokens -> update_state_after_alloc -> start_load_kv -> wait_for_layer_load)
on an 8B-shaped KV cache (32 layers, 8 KV heads, head 128, bf16, 16-token blocks), 8K-token
prompt, 256-token chunks. Baseline: the bare Mover moving the same chunks. Reports GB/s and
the connector/Mover ratio.

    python bench/connector.py [--device cuda|cpu] [--layouts blnhc,lbnhc,fa_nhd] [--quick] [--json]
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

from kvortex.config import KVortexConfig
from kvortex.integrations.scheduler import SchedulerSide
from kvortex.integrations.worker import WorkerSide
from kvortex.keys import Namespace


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_layout(
    name: str, device: str, dims: tuple[int, int, int, int], repeat: int
) -> tuple[list[Row], dict[str, float]]:
    L, H, D, tokens_n = dims
    N, chunk = 16, 256
    blocks = tokens_n // N
    kv = LAYOUTS[name](L, 2 * blocks + 2, N, H, D, torch.bfloat16, device)
    fill_random(kv, seed=2)
    nbytes = L * 2 * H * D * 2 * tokens_n
    config = KVortexConfig.from_dict(
        {"chunk_tokens": chunk, "cpu_bytes": 3 * nbytes, "async_load_min_tokens": 10**9}
    )
    worker = WorkerSide(config, N)
    worker.register(kv)
    assert worker.layout is not None and worker.mover is not None
    sched = SchedulerSide(
        config,
        Namespace("bench"),
        N,
        worker.layout.chunk_bytes(chunk // N),
        hold_blocks_while_loading=False,
    )
    rng = np.random.default_rng(0)
    src = list(range(blocks))
    dst = list(range(blocks, 2 * blocks))
    store_s, load_s = [], []
    for i in range(repeat + 1):
        tokens = rng.integers(0, 128_000, tokens_n + 1).tolist()
        rid = f"r{i}"
        sync(device)
        t0 = time.perf_counter()
        sched.finished(rid, tokens, tokens_n, src)  # request_finished
        out = sched.step()  # build_connector_meta
        worker.start(out.plan, out.async_loads, out.release_after_load)  # start_load_kv
        while True:  # get_finished, polled once per step by vLLM
            sending, _ = worker.poll()
            if sending:
                break
        sched.on_worker_output(sending, (), ())  # update_connector_output
        t_store = time.perf_counter() - t0
        t0 = time.perf_counter()
        external, _ = sched.matched_tokens(f"q{i}", tokens, tokens_n + 1, 0)
        assert external == tokens_n
        sched.after_alloc(f"q{i}", [*dst, 2 * blocks], external)
        out = sched.step()
        worker.start(out.plan, out.async_loads, out.release_after_load)
        worker.wait_sync_loads()  # wait_for_layer_load: the compute stream waits
        sync(device)
        t_load = time.perf_counter() - t0
        assert not worker.take_load_errors()
        sched.finished(f"q{i}", tokens, 0, dst)
        if i:
            store_s.append(t_store)
            load_s.append(t_load)
    slots = list(range(tokens_n // chunk))
    mover = worker.mover
    raw_store, raw_load = [], []
    for _ in range(repeat):
        sync(device)
        t0 = time.perf_counter()
        mover.store(src, slots).wait()
        raw_store.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        mover.load(slots, dst).wait()
        raw_load.append(time.perf_counter() - t0)
    worker.close()
    gb = nbytes / 1e9
    rows = []
    for impl, direction, samples in (
        ("mover", "store", raw_store),
        ("connector", "store", store_s),
        ("mover", "load", raw_load),
        ("connector", "load", load_s),
    ):
        st = Stats.of(samples)
        rows.append(Row(f"{name} {direction}", impl, st, {"GB/s": gb / st.median}))
    ratios = {
        f"{name} connector/mover store": Stats.of(raw_store).median / Stats.of(store_s).median,
        f"{name} connector/mover load": Stats.of(raw_load).median / Stats.of(load_s).median,
    }
    return rows, ratios


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--layouts", default="blnhc,lbnhc,fa_nhd")
    args = p.parse_args()
    if args.quick:
        dims, repeat = (2, 2, 16, 1024), args.repeat or 3
    else:
        dims, repeat = (32, 8, 128, 8192), args.repeat or 8
    rows: list[Row] = []
    ratios: dict[str, float] = {}
    for name in args.layouts.split(","):
        r, q = run_layout(name, args.device, dims, repeat)
        rows += r
        ratios.update(q)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    report(f"connector worker path, {dims[3]} tokens, {device}", rows, ratios, args.json)


if __name__ == "__main__":
    main()
