"""Directory and eviction policies: lookup latency, operation rate, hit ratios.

1. ``lookup`` of a 128K-token prompt (hashing + index walk), as a KVortexEngine does it, from
   a Python list (what vLLM hands over) and from a numpy array; median and p99. Target: < 1 ms.
2. Directory operations per second: reserve+commit of one chunk, match of a 512-chunk prompt.
3. Hit ratios of LRU and S3-FIFO on a synthetic multi-tenant trace (Zipf-distributed shared
   prefixes, per-request unique suffixes, and bursts of one-off scans) at several cache sizes.
4. L2 disk placement on the same trace: the real Directory as L1 and a model of a
   log-structured disk tier (fixed-size segments, the oldest whole segment deleted when full)
   as L2, for write-through vs write-back, each with admission "all" vs "seen-twice". Reports
   the hit ratio over both tiers, L2's share of the hits, chunks written to disk, write
   amplification (chunks written / chunks computed and stored) and the share of L1 or L2 that
   is on disk at the end (what a restart keeps). Beside them, L1 alone for reference.

    python bench/directory.py [--quick] [--json] [--l1-eviction lru|s3fifo]
        [--segment-chunks 64]
"""

from __future__ import annotations

import random
import time
from collections import OrderedDict, deque
from collections.abc import Callable

import numpy as np
from _harness import Row, Stats, measure, parser, report

from kvortex.directory import Directory, FreeListAllocator
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


class SegmentLog:
    """Model of the L2 disk tier: chunks appended to fixed-size segment files, capacity
    ``max_segments`` segments (the open one included); a write that needs a new segment when
    all are in use first deletes the oldest whole segment, and its chunks are lost. A chunk
    already on disk is not written again; one written after its segment went lands in the
    newest segment. Each chunk is therefore in at most one segment."""

    def __init__(self, capacity_chunks: int, segment_chunks: int) -> None:
        self.segment_chunks = segment_chunks
        self.max_segments = max(1, capacity_chunks // segment_chunks)
        self._segments: deque[list[bytes]] = deque([[]])
        self._keys: set[bytes] = set()
        self.written = 0
        self.lost = 0

    def __contains__(self, key: bytes) -> bool:
        return key in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def keys(self) -> set[bytes]:
        return self._keys

    def write(self, key: bytes) -> None:
        if key in self._keys:
            return
        if len(self._segments[-1]) == self.segment_chunks:
            if len(self._segments) == self.max_segments:
                for k in self._segments.popleft():
                    self._keys.remove(k)
                    self.lost += 1
            self._segments.append([])
        self._segments[-1].append(key)
        self._keys.add(key)
        self.written += 1


class SeenTwice:
    """Admission filter: a key is admitted from its second sighting on. A bounded FIFO of
    recently seen keys (refreshed on each sighting) remembers first sightings; a key that
    falls out of it starts over."""

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._seen: OrderedDict[bytes, int] = OrderedDict()

    def see(self, key: bytes) -> bool:
        """Record a sighting; True when this one admits the key (its second)."""
        n = self._seen.pop(key, 0) + 1
        self._seen[key] = min(n, 2)
        if len(self._seen) > self._capacity:
            self._seen.popitem(last=False)
        return n == 2

    def admitted(self, key: bytes) -> bool:
        return self._seen.get(key, 0) >= 2


class _EvictionLog(FreeListAllocator):
    """Free-list allocator that reports each freed slot. The replay never fails a store, pins
    or discards, so every free is an eviction: the policy's victim or a descendant dropped
    with it (its key chains through the victim). The Directory has no eviction hook."""

    def __init__(self, num_slots: int, on_free: Callable[[int], None]) -> None:
        super().__init__(num_slots)
        self._on_free = on_free

    def free(self, slot: int) -> None:
        super().free(slot)
        self._on_free(slot)


def placement(
    trace: list[list[bytes]],
    after: list[list[bytes]],
    l1_chunks: int,
    l2_chunks: int,
    write: str,
    admission: str,
    *,
    eviction: str,
    segment_chunks: int,
) -> dict[str, float]:
    """Replay ``trace`` (chunk keys per request) through L1 (a Directory) and L2 (a SegmentLog),
    then crash (L1 and the admission filter are lost, the disk stays) and replay ``after``.

    A lookup walks the keys: a hit in L1, else in L2 (promoted: stored into L1 again, which
    may evict), else the walk stops and the rest is computed and stored into L1.
    ``write``: ``"none"`` (no L2), ``"through"`` (a chunk is written when stored into L1),
    ``"back"`` (when L1 evicts it). ``admission``: ``"all"``, or ``"seen-twice"``: every use
    of a chunk by a request (a hit in either tier, or a store after a miss) is a sighting, and
    a chunk is written only once admitted by its second sighting; under write-through a chunk
    admitted while it sits in L1 is written then (its write was deferred). A chunk already on
    disk is never written. Writes are modelled as instant (no crash window).
    """
    t0 = time.perf_counter()
    disk = SegmentLog(l2_chunks if write != "none" else 0, segment_chunks)
    seen: SeenTwice | None = None
    slot_key: dict[int, bytes] = {}  # mirror of L1: slot -> key
    evicted: list[bytes] = []

    def boot() -> Directory:
        nonlocal seen
        slot_key.clear()
        seen = SeenTwice(4 * l2_chunks) if admission == "seen-twice" else None
        log = _EvictionLog(l1_chunks, lambda slot: evicted.append(slot_key.pop(slot)))
        return Directory(l1_chunks, eviction=eviction, allocator=log)

    def admitted(key: bytes) -> bool:
        return seen is None or seen.admitted(key)

    def replay(directory: Directory, requests: list[list[bytes]]) -> tuple[int, int, int, int]:
        l1_hits = l2_hits = requested = stored = 0
        for keys in requests:
            n1 = directory.match(keys)
            n = n1
            if write != "none":
                while n < len(keys) and keys[n] in disk:
                    n += 1
            directory.touch(keys[:n1])
            l1_hits += n1
            l2_hits += n - n1
            requested += len(keys)
            if seen is not None:
                for i, key in enumerate(keys):
                    if seen.see(key) and write == "through" and i < n1:
                        disk.write(key)  # an L1 hit admitted: its deferred write happens now
            r = directory.reserve_store(keys)  # promotes keys[n1:n], stores keys[n:]
            directory.commit_store([k for _, k, _ in r.chunks])
            for i, key, slot in r.chunks:
                slot_key[slot] = key
                if i < n:
                    continue  # promoted from L2
                stored += 1
                if write == "through" and admitted(key):
                    disk.write(key)
            if write == "back":
                for key in evicted:
                    if admitted(key):
                        disk.write(key)
            evicted.clear()
        return l1_hits, l2_hits, requested, stored

    l1_hits, l2_hits, requested, stored = replay(boot(), trace)
    seconds = time.perf_counter() - t0
    resident = set(slot_key.values()) | disk.keys()
    on_disk = len(disk) / len(resident) if resident else 0.0
    written, lost = disk.written, disk.lost
    a1, a2, a_requested, _ = replay(boot(), after)  # after a crash: empty L1, same disk
    hits = l1_hits + l2_hits
    return {
        "seconds": seconds,
        "hit ratio": hits / requested,
        "L2 share of hits": l2_hits / hits if hits else 0.0,
        "chunks written": float(written),
        "write amp": written / stored if stored else 0.0,
        "on disk at end": on_disk,
        "hit ratio after crash": (a1 + a2) / a_requested if a_requested else 0.0,
        "chunks stored": float(stored),
        "L2 lost": float(lost),
    }


PLACEMENTS = (
    ("through", "all"),
    ("through", "seen-twice"),
    ("back", "all"),
    ("back", "seen-twice"),
)


def placement_rows(
    trace: list[list[int]], after: list[list[int]], quick: bool, eviction: str, segment_chunks: int
) -> tuple[list[Row], dict[str, float]]:
    """Rows of the placement replay; ``after`` is the trace's continuation, replayed after a
    simulated crash to measure what the disk kept."""
    ns = Namespace("trace")
    keyed = [ns.chunk_keys(req, 1) for req in trace]
    keyed_after = [ns.chunk_keys(req, 1) for req in after]
    rows, ratios = [], {}
    shown = (
        "hit ratio",
        "L2 share of hits",
        "chunks written",
        "write amp",
        "on disk at end",
        "hit ratio after crash",
        "chunks stored",
        "L2 lost",
    )
    for l1 in (64,) if quick else (128, 512, 2048):
        base = placement(
            keyed,
            keyed_after,
            l1,
            0,
            "none",
            "all",
            eviction=eviction,
            segment_chunks=segment_chunks,
        )
        rows.append(
            Row(
                f"placement L1 {l1}, no L2",
                f"L1 only ({eviction})",
                Stats(base["seconds"], base["seconds"], 1),
                {k: base[k] for k in ("hit ratio", "hit ratio after crash", "chunks stored")},
            )
        )
        for factor in (8, 32):
            l2 = factor * l1
            got: dict[tuple[str, str], dict[str, float]] = {}
            for write, admission in PLACEMENTS:
                m = placement(
                    keyed,
                    keyed_after,
                    l1,
                    l2,
                    write,
                    admission,
                    eviction=eviction,
                    segment_chunks=segment_chunks,
                )
                got[write, admission] = m
                rows.append(
                    Row(
                        f"placement L1 {l1}, L2 {factor}x ({l2})",
                        f"write-{write}/{admission}",
                        Stats(m["seconds"], m["seconds"], 1),
                        {k: m[k] for k in shown},
                    )
                )
            wt, wb = got["through", "all"], got["back", "all"]
            at = f"L1 {l1} L2 {factor}x"
            ratios[f"write-through/write-back chunks written, {at}"] = (
                wt["chunks written"] / wb["chunks written"] if wb["chunks written"] else 0.0
            )
            ratios[f"write-through/write-back hit ratio, {at}"] = wt["hit ratio"] / wb["hit ratio"]
            ts = got["through", "seen-twice"]
            ratios[f"write-through seen-twice/all chunks written, {at}"] = (
                ts["chunks written"] / wt["chunks written"] if wt["chunks written"] else 0.0
            )
            ratios[f"write-through seen-twice/all hit ratio, {at}"] = (
                ts["hit ratio"] / wt["hit ratio"]
            )
    return rows, ratios


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument(
        "--l1-eviction",
        choices=("lru", "s3fifo"),
        default="lru",
        help="L1 eviction policy in the placement replay (default: lru, the default)",
    )
    p.add_argument("--segment-chunks", type=int, default=64, help="chunks per L2 segment file")
    args = p.parse_args()
    if args.segment_chunks < 1:
        p.error("--segment-chunks must be >= 1")
    repeat = args.repeat or (10 if args.quick else 200)
    rows, ratios = lookup_rows(args.quick, repeat)
    rows += ops_rows(args.quick)
    requests = 400 if args.quick else 6000
    trace = multi_tenant_trace(0, requests)
    # The same trace continued (same seed: the first part is identical), for the crash replay.
    longer = multi_tenant_trace(0, requests + (50 if args.quick else 500))
    assert longer[: len(trace)] == trace
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
    more_rows, more_ratios = placement_rows(
        trace, longer[len(trace) :], args.quick, args.l1_eviction, args.segment_chunks
    )
    rows += more_rows
    ratios.update(more_ratios)
    report("directory and eviction", rows, ratios, args.json)


if __name__ == "__main__":
    main()
