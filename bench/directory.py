"""Directory and eviction policies: lookup latency, operation rate, hit ratios.

1. ``lookup`` of a 128K-token prompt (hashing + index walk), as a KVortexEngine does it, from
   a Python list (what vLLM hands over) and from a numpy array; median and p99. Target: < 1 ms.
2. Directory operations per second: reserve+commit of one chunk, match of a 512-chunk prompt.
3. Hit ratios of LRU and S3-FIFO on a synthetic multi-tenant trace (Zipf-distributed shared
   prefixes, per-request unique suffixes, and bursts of one-off scans) at several cache sizes.

    python bench/directory.py [--quick] [--json]
"""

from __future__ import annotations

import random
import time

import numpy as np
from _harness import Row, Stats, measure, parser, report

from kvortex.directory import Directory
from kvortex.keys import Namespace


def lookup_rows(quick: bool, repeat: int) -> tuple[list[Row], dict[str, float]]:
    ns = Namespace("bench-model", "layoutfp", "torch.bfloat16")
    n = 16_384 if quick else 131_072
    chunk = 256
    ids = np.random.default_rng(0).integers(0, 128_000, n).astype(np.int64)
    directory = Directory(4096)
    keys = ns.chunk_keys(ids, chunk)
    r = directory.reserve_store(keys)
    directory.commit_store([k for _, k, _ in r.chunks])
    rows, ratios = [], {}
    for source, tokens in (("numpy", ids), ("list", ids.tolist())):
        st = measure(lambda t=tokens: directory.match(ns.chunk_keys(t, chunk)), repeat=repeat)
        assert directory.match(ns.chunk_keys(tokens, chunk)) == n // chunk
        rows.append(Row(f"lookup {n // 1024}K tokens ({source})", "native", st, {}))
        ratios[f"lookup {source} vs 1 ms target"] = 1e-3 / st.median
    return rows, ratios


def ops_rows(quick: bool) -> list[Row]:
    ns = Namespace("bench-model")
    count = 2_000 if quick else 50_000
    keys = [ns.chunk_keys(list(range(i, i + 16)), 16)[0] for i in range(count)]
    directory = Directory(count // 2, eviction="lru")

    def churn() -> None:
        for k in keys:
            r = directory.reserve_store([k])
            directory.commit_store([k2 for _, k2, _ in r.chunks])

    st = measure(churn, repeat=3, warmup=1)
    per = Stats(st.median / count, st.p99 / count, st.runs)
    prompt = ns.chunk_keys(list(range(512 * 16)), 16)
    d2 = Directory(1024)
    r = d2.reserve_store(prompt)
    d2.commit_store([k for _, k, _ in r.chunks])
    m = measure(lambda: d2.match(prompt), repeat=50)
    return [
        Row("reserve+commit 1 chunk (with eviction)", "python", per, {"ops/s": 1 / per.median}),
        Row("match 512-chunk prompt", "python", m, {"chunks/s": 512 / m.median}),
    ]


def multi_tenant_trace(seed: int, requests: int) -> list[list[int]]:
    """Requests as lists of chunk ids: a shared prefix (Zipf over 200 system prompts / documents
    of 2-16 chunks), 1-4 chunks of the request's own, and every 50 requests a scan of 30
    one-off single-chunk requests."""
    rng = random.Random(seed)
    prefixes = [[rng.randrange(1 << 30) for _ in range(rng.randint(2, 16))] for _ in range(200)]
    weights = [1 / (i + 1) ** 1.1 for i in range(len(prefixes))]
    trace = []
    for i in range(requests):
        prefix = rng.choices(prefixes, weights)[0]
        trace.append(prefix + [rng.randrange(1 << 30) for _ in range(rng.randint(1, 4))])
        if i % 50 == 49:
            trace += [[rng.randrange(1 << 30)] for _ in range(30)]
    return trace


def hit_ratio(policy: str, trace: list[list[int]], capacity: int) -> tuple[float, float]:
    """(hit ratio, seconds to replay the trace through a Directory)."""
    t0 = time.perf_counter()
    ns = Namespace("trace")
    directory = Directory(capacity, eviction=policy)
    hit = total = 0
    for req in trace:
        keys = ns.chunk_keys(req, 1)
        n = directory.match(keys)
        directory.touch(keys[:n])
        hit += n
        total += len(keys)
        r = directory.reserve_store(keys)
        directory.commit_store([k for _, k, _ in r.chunks])
    return hit / total, time.perf_counter() - t0


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    repeat = args.repeat or (10 if args.quick else 200)
    rows, ratios = lookup_rows(args.quick, repeat)
    rows += ops_rows(args.quick)
    trace = multi_tenant_trace(0, 400 if args.quick else 6000)
    for capacity in (64, 256) if args.quick else (128, 256, 512, 1024, 2048):
        lru, t_lru = hit_ratio("lru", trace, capacity)
        s3, t_s3 = hit_ratio("s3fifo", trace, capacity)
        for name, value, seconds in (("lru", lru, t_lru), ("s3fifo", s3, t_s3)):
            rows.append(
                Row(
                    f"trace replay, {capacity} chunks",
                    name,
                    Stats(seconds, seconds, 1),
                    {"hit ratio": value},
                )
            )
        ratios[f"s3fifo/lru hit ratio at {capacity}"] = s3 / lru if lru else float("inf")
    report("directory and eviction", rows, ratios, args.json)


if __name__ == "__main__":
    main()
