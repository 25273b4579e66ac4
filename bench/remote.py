"""Shared tier: chunk put/get GB/s through RemoteTier against raw redis-py SET/GET, and the
lookup latency of a 128K-token prompt, on a standalone server and a 3-master cluster.

The servers are started here on loopback (``tests/redis_launcher.py``, the test fixtures'
launcher: no persistence) and stopped at the end; client and servers share this machine's
cores, so figures are loopback figures.

1. Throughput. For each chunk size (``--chunk-mib``, default 4 and 32 MiB: a 256-token chunk of
   Llama-3-8B is 32 MiB, a TP=8 shard of it 4 MiB; ``--quick``: 256 KiB and 1 MiB), ``--total``
   MiB (default 256) of chunks are put and got back, each round with fresh keys and the server
   flushed after it; one warm-up round, then ``--repeat`` timed ones (default 3):

   - ``RemoteTier``, one per chunk size, connected before the warm-up: ``offer`` in groups of
     ``--batch`` chunks (write policy ``all``, in-flight bound above the total so nothing is
     dropped), then ``wait_idle``; ``fetch`` in groups of ``--batch``, then ``wait_idle``.
     This includes what the tier does besides sending: the lookup of what the server already
     holds before each write, the header and CRC-32 of every value, the copies into and out
     of the values (overlapped with the transfers on helper threads), the checks.
   - ``redis-py``: the same values (header-sized prefix included, built beforehand) as
     ``SET``/``GET`` in non-transactional pipelines of the same bytes as the tier's (8 MiB,
     at least one value), with redis-py's defaults (its hiredis command packer when hiredis is
     installed); standalone also ``redis-py pypack``: the same with redis-py's Python command
     packer, which is what the tier sends with. Cluster: redis-py's cluster pipeline.

   Same connection count: one connection per server on both sides (the tier's I/O thread; in a
   cluster one helper thread per master). Memory: ``--batch`` source chunks reused round-robin
   and ``--batch`` destinations; the bytes of the last group are compared with their sources.
   Reported: GB/s of chunk bytes (median round) and ratios tier/redis-py.

2. Lookup. 512 keys (a 128K-token prompt of 256-token chunks) stored, then ``match`` of all
   512 timed ``--lookups`` times (p50, p99), with the number of round trips one lookup sends
   (pipelines counted at redis-py's ``send_packed_command``; a cluster sends one per master,
   in parallel); baseline: one redis-py pipeline of the same 512 ``EXISTS`` from this thread.

    python bench/remote.py [--quick] [--json] [--repeat N] [--chunk-mib 4,32] [--total MIB]
        [--batch B] [--lookups N] [--no-cluster]
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import redis
import redis.cluster
import redis.connection
from _harness import Row, Stats, parser, report

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from redis_launcher import RedisCluster, RedisServer, missing

from kvortex.keys import Namespace
from kvortex.tiers.redis import HEADER_BYTES, RemoteTier

MiB = 1 << 20
PIPELINE_BYTES = 8 * MiB  # as the tier's
LOOKUP_KEYS = 512


def note(message: str) -> None:
    print(f"# {message}", file=sys.stderr)


class Memory:
    """``batch`` source chunks of random bytes and ``batch`` destinations."""

    def __init__(self, chunk: int, batch: int, rng: np.random.Generator) -> None:
        self.chunk, self.batch = chunk, batch
        self.src = np.frombuffer(rng.bytes(batch * chunk), np.uint8).reshape(batch, chunk).copy()
        self.dst = np.zeros_like(self.src)
        # The raw baseline sends values of the tier's size: a header-sized prefix, the chunk.
        self.values = [bytes(HEADER_BYTES) + self.src[i].tobytes() for i in range(batch)]

    def address(self, i: int) -> int:
        return int(self.src[i % self.batch].ctypes.data)

    def check_last_group(self, chunks: int) -> None:
        first = (chunks - 1) // self.batch * self.batch
        for n, i in enumerate(range(first, chunks)):
            assert np.array_equal(self.dst[n], self.src[i % self.batch]), f"chunk {i} differs"


class Target:
    """One deployment to measure against: a URL, raw clients, and a flush."""

    def __init__(self, name: str, url: str, raw: dict[str, Any], flush: Callable[[], None]):
        self.name, self.url, self.raw, self.flush = name, url, raw, flush


def tier_round(
    tier: RemoteTier, target: Target, mem: Memory, chunks: int, rng: np.random.Generator
) -> tuple[float, float]:
    keys = [rng.bytes(32) for _ in range(chunks)]
    ok: list[bool] = []
    t0 = time.perf_counter()
    for start in range(0, chunks, mem.batch):
        group = [(keys[i], mem.address(i)) for i in range(start, min(chunks, start + mem.batch))]
        accepted = tier.offer(group, lambda _k, good: ok.extend(good))
        assert len(accepted) == len(group)
    assert tier.wait_idle(600)
    put = time.perf_counter() - t0
    assert ok == [True] * chunks, f"{ok.count(False)} writes failed"
    ok.clear()
    mem.dst[:] = 0
    t0 = time.perf_counter()
    for start in range(0, chunks, mem.batch):
        part = keys[start : start + mem.batch]
        tier.fetch(part, [int(mem.dst[n].ctypes.data) for n in range(len(part))], ok.extend)
    assert tier.wait_idle(600)
    get = time.perf_counter() - t0
    assert ok == [True] * chunks, f"{ok.count(False)} reads failed"
    assert tier.describe()["faults"] == 0
    mem.check_last_group(chunks)
    target.flush()
    return put, get


def raw_round(
    client: Any, mem: Memory, chunks: int, rng: np.random.Generator
) -> tuple[float, float]:
    keys = [b"raw:" + rng.bytes(32) for _ in range(chunks)]
    per = max(1, PIPELINE_BYTES // (HEADER_BYTES + mem.chunk))
    t0 = time.perf_counter()
    for start in range(0, chunks, per):
        pipe = client.pipeline(transaction=False)
        for i in range(start, min(chunks, start + per)):
            pipe.set(keys[i], mem.values[i % mem.batch])
        assert all(pipe.execute())
    put = time.perf_counter() - t0
    last: list[bytes] = []
    t0 = time.perf_counter()
    for start in range(0, chunks, per):
        pipe = client.pipeline(transaction=False)
        for i in range(start, min(chunks, start + per)):
            pipe.get(keys[i])
        last = pipe.execute()
    get = time.perf_counter() - t0
    assert last[-1] == mem.values[(chunks - 1) % mem.batch]
    return put, get


def throughput(
    targets: list[Target], sizes: list[int], total: int, batch: int, repeat: int
) -> tuple[list[Row], dict[str, float]]:
    rng = np.random.default_rng(0)
    rows: list[Row] = []
    ratios: dict[str, float] = {}
    for chunk in sizes:
        chunks = max(1, total // chunk)
        mem = Memory(chunk, min(batch, chunks), rng)
        for target in targets:
            samples: dict[tuple[str, str], list[float]] = {}
            ns = Namespace("bench-remote", tenant_salt=rng.bytes(8).hex()).encode()
            inflight = 2 * chunks * chunk  # nothing dropped: the whole round may be queued
            with RemoteTier(
                target.url, ns, chunk, write="all", max_inflight_bytes=inflight
            ) as tier:
                for r in range(repeat + 1):  # round 0 warms up
                    timed = {"RemoteTier": tier_round(tier, target, mem, chunks, rng)}
                    for impl, client in target.raw.items():
                        timed[impl] = raw_round(client, mem, chunks, rng)
                        target.flush()
                    if r:
                        for impl, (put, get) in timed.items():
                            samples.setdefault(("put", impl), []).append(put)
                            samples.setdefault(("get", impl), []).append(get)
            gbps: dict[tuple[str, str], float] = {}
            for op in ("put", "get"):
                for impl in ("RemoteTier", *target.raw):
                    stats = Stats.of(samples[op, impl])
                    gbps[op, impl] = chunks * chunk / stats.median / 1e9
                    case = f"{op} {_size(chunk)} {target.name}"
                    rows.append(Row(case, impl, stats, {"GB/s": gbps[op, impl]}))
                for impl in target.raw:
                    ratios[f"{op} {_size(chunk)} {target.name} tier/{impl}"] = (
                        gbps[op, "RemoteTier"] / gbps[op, impl]
                    )
    return rows, ratios


def count_sends(fn: Callable[[], object]) -> int:
    """Pipelines (and single commands) sent while ``fn`` runs, from any thread."""
    cls = redis.connection.Connection
    original = cls.send_packed_command
    sends: list[int] = []

    def counting(self: Any, command: Any, check_health: bool = True) -> None:
        sends.append(1)
        original(self, command, check_health)

    cls.send_packed_command = counting  # type: ignore[method-assign]
    try:
        fn()
    finally:
        cls.send_packed_command = original  # type: ignore[method-assign]
    return len(sends)


def lookup(target: Target, lookups: int, rng: np.random.Generator) -> list[Row]:
    """Lookup latency of 512 stored keys: RemoteTier.match against one raw EXISTS pipeline."""
    payload = 64
    data = np.frombuffer(rng.bytes(payload), np.uint8).copy()
    keys = [rng.bytes(32) for _ in range(LOOKUP_KEYS)]
    ns = Namespace("bench-lookup").encode()
    with RemoteTier(target.url, ns, payload, write="all") as tier:
        tier.offer([(k, int(data.ctypes.data)) for k in keys], lambda *_: None)
        assert tier.wait_idle(60)
        assert tier.match(keys) == LOOKUP_KEYS
        trips = count_sends(lambda: tier.match(keys))
        samples = []
        for _ in range(lookups):
            t0 = time.perf_counter()
            n = tier.match(keys)
            samples.append(time.perf_counter() - t0)
            assert n == LOOKUP_KEYS
        tier_stats = Stats.of(samples)
        rkeys = [tier._prefix + k for k in keys]  # the very keys the tier asks about
    client = next(iter(target.raw.values()))

    def exists() -> list[Any]:
        pipe = client.pipeline(transaction=False)
        for rkey in rkeys:
            pipe.exists(rkey)
        return list(pipe.execute())

    assert sum(exists()) == LOOKUP_KEYS
    raw_trips = count_sends(exists)
    samples = []
    for _ in range(lookups):
        t0 = time.perf_counter()
        exists()
        samples.append(time.perf_counter() - t0)
    target.flush()
    case = f"lookup {LOOKUP_KEYS} keys {target.name}"
    return [
        Row(case, "RemoteTier.match", tier_stats, {"round trips": trips}),
        Row(case, "redis-py EXISTS pipeline", Stats.of(samples), {"round trips": raw_trips}),
    ]


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--chunk-mib", default=None, help="chunk sizes in MiB (default 4,32)")
    p.add_argument("--total", type=int, default=None, help="MiB per round (default 256)")
    p.add_argument("--batch", type=int, default=None, help="chunks per offer/fetch (default 8)")
    p.add_argument("--lookups", type=int, default=None, help="timed lookups (default 200)")
    p.add_argument("--no-cluster", action="store_true", help="standalone server only")
    args = p.parse_args()
    reason = missing()
    if reason:
        p.error(reason)
    default_sizes = "0.25,1" if args.quick else "4,32"
    sizes = [int(float(s) * MiB) for s in (args.chunk_mib or default_sizes).split(",")]
    total = (args.total or (8 if args.quick else 256)) * MiB
    batch = args.batch or 8
    lookups = args.lookups or (20 if args.quick else 200)
    repeat = args.repeat or (2 if args.quick else 3)
    if min(sizes) < 1 or total < 1 or batch < 1 or lookups < 1:
        p.error("--chunk-mib, --total, --batch and --lookups must be positive")
    base = Path(tempfile.mkdtemp(prefix="kvortex-bench-remote-"))
    server = RedisServer(base / "standalone").start()
    clients: list[Any] = []
    try:
        cluster = None if args.no_cluster else RedisCluster(base / "cluster").start()
        plain = redis.Redis(host="127.0.0.1", port=server.port, socket_timeout=600)
        pypack = redis.Redis(
            connection_pool=redis.ConnectionPool(
                host="127.0.0.1",
                port=server.port,
                socket_timeout=600,
                command_packer=redis.connection.PythonRespSerializer(
                    6000, redis.connection.Encoder("utf-8", "strict", False).encode
                ),
            )
        )
        clients += [plain, pypack]
        raw = {"redis-py": plain, "redis-py pypack": pypack}
        targets = [Target("standalone", server.url, raw, plain.flushall)]
        if cluster is not None:
            rc = redis.cluster.RedisCluster(
                host="127.0.0.1", port=cluster.nodes[0].port, socket_timeout=600
            )
            clients.append(rc)
            nodes = cluster.nodes

            def flush_cluster() -> None:
                for node in nodes:
                    with node.client() as c:
                        c.flushall()

            targets.append(Target("cluster", cluster.url, {"redis-py": rc}, flush_cluster))
        version = plain.info("server")["redis_version"]
        packer = "hiredis" if redis.connection.HIREDIS_AVAILABLE else "python"
        note(f"redis {version}, redis-py {redis.__version__}, default packer {packer}")
        rows, ratios = throughput(targets, sizes, total, batch, repeat)
        lookup_rng = np.random.default_rng(1)
        for target in targets:
            tier_row, raw_row = lookup(target, lookups, lookup_rng)
            rows += [tier_row, raw_row]
            ratios[f"{tier_row.case} p50 redis-py/tier"] = (
                raw_row.stats.median / tier_row.stats.median
            )
    finally:
        for c in clients:
            c.close()
        server.stop()
        if cluster is not None:
            cluster.stop()
        shutil.rmtree(base, ignore_errors=True)
    title = (
        f"shared tier on loopback (redis {version}, redis-py {redis.__version__}), "
        f"{total // MiB} MiB per round, groups of {batch}; {', '.join(t.name for t in targets)}"
    )
    report(title, rows, ratios, args.json)


def _size(nbytes: int) -> str:
    return f"{nbytes // MiB} MiB" if nbytes >= MiB else f"{nbytes // 1024} KiB"


if __name__ == "__main__":
    main()
