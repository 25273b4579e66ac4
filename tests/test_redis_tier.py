"""The shared tier (L3) against real redis-server processes: standalone, a 3-master cluster,
TLS, another process, and every fault the tier must turn into a miss.

Servers are started per test on free loopback ports (:mod:`redis_launcher`). Without
``redis-server`` or the ``redis`` package these tests skip, unless ``KVORTEX_REQUIRE_REDIS=1``
(CI), where they fail. Every wait is bounded; the tests that could hang a thread pass a
timeout to everything they wait on.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import require_redis, run_isolated
from redis_launcher import LaunchError, RedisCluster, RedisServer, TLSFiles

from kvortex import HostSlabPool, KVortexError
from kvortex.config import KVortexConfig
from kvortex.errors import ConfigError, InvalidArgumentError
from kvortex.keys import Namespace
from kvortex.tiers.faults import CircuitBreaker
from kvortex.tiers.records import namespace_fingerprint
from kvortex.tiers.redis import (
    HEADER_BYTES,
    RemoteTier,
    RemoteTierError,
    ValueHeader,
    pack_value_header,
    probe,
    remote_key,
    unpack_value_header,
)
from kvortex.tiers.redis_servers import parse_url, redacted_url

NS = Namespace("meta-llama/Llama-3-8B", "layout", "torch.bfloat16", 2, 0).encode()
P = 64 * 1024  # payload bytes of most tests
WAIT = 30.0  # seconds any wait may take before the test fails


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    require_redis()
    s = RedisServer(tmp_path / "redis").start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    require_redis()
    c = RedisCluster(tmp_path_factory.mktemp("cluster")).start()
    yield c
    c.stop()


class Chunks:
    """``n`` chunks of random bytes and as many cleared destinations, in numpy memory."""

    def __init__(self, n: int, payload: int = P, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.keys = [rng.bytes(32) for _ in range(n)]
        self.src = np.frombuffer(rng.bytes(n * payload), dtype=np.uint8).reshape(n, payload).copy()
        self.dst = np.zeros_like(self.src)
        self.payload = payload

    def sources(self) -> list[tuple[bytes, int]]:
        return [(k, self.src[i].ctypes.data) for i, k in enumerate(self.keys)]

    def addresses(self) -> list[int]:
        return [self.dst[i].ctypes.data for i in range(len(self.keys))]

    def same(self, i: int) -> bool:
        return bool(np.array_equal(self.src[i], self.dst[i]))


def store(tier: RemoteTier, chunks: Sequence[tuple[bytes, int]]) -> dict[bytes, bool]:
    """Offer ``chunks`` and wait: ``{accepted key: ok}``."""
    results: dict[bytes, bool] = {}
    tier.offer(chunks, lambda keys, ok: results.update(zip(keys, ok, strict=True)))
    assert tier.wait_idle(WAIT), "writes did not finish"
    return results


def fetch(tier: RemoteTier, keys: Sequence[bytes], addresses: Sequence[int]) -> list[bool]:
    got: list[list[bool]] = []
    event = threading.Event()

    def done(ok: list[bool]) -> None:
        got.append(ok)
        event.set()

    tier.fetch(keys, addresses, done)
    assert event.wait(WAIT), "fetch did not finish"
    return got[0]


# -- format and URLs (no server) ----------------------------------------------------------------


def test_value_header_round_trip_and_every_bit_flip_is_caught() -> None:
    h = ValueHeader(b"n" * 16, bytes(range(32)), 123_456, 0xDEADBEEF)
    raw = pack_value_header(h)
    assert len(raw) == HEADER_BYTES == 80 and unpack_value_header(raw) == h
    for bit in range(HEADER_BYTES * 8):
        flipped = bytearray(raw)
        flipped[bit // 8] ^= 1 << (bit % 8)
        assert unpack_value_header(bytes(flipped)) is None, bit
    assert unpack_value_header(raw[:-1]) is None
    assert unpack_value_header(bytes(HEADER_BYTES)) is None


def test_key_carries_version_and_namespace_fingerprint() -> None:
    fp = namespace_fingerprint(NS)
    key = remote_key(fp, b"k" * 32)
    assert key == b"kvx:1:" + fp.hex().encode() + b":" + b"k" * 32
    other = Namespace("meta-llama/Llama-3-8B", "layout", "torch.bfloat16", 2, 1).encode()
    assert remote_key(namespace_fingerprint(other), b"k" * 32) != key


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:s3cret@host:1/2", "redis://:***@host:1/2"),
        ("rediss://kv:s3cret@host", "rediss://kv:***@host"),
        ("redis://kv@host:6379", "redis://kv@host:6379"),
        ("redis+cluster://host:7000", "redis+cluster://host:7000"),
        (
            "rediss://h?ssl_ca_certs=/ca.pem&password=x",
            "rediss://h?ssl_ca_certs=/ca.pem&password=***",
        ),
    ],
)
def test_redacted_url(url: str, shown: str) -> None:
    assert redacted_url(url) == shown


def test_parse_url() -> None:
    ep = parse_url("rediss+cluster://kv:p%40ss@10.0.0.1:7000?ssl_cert_reqs=none")
    assert (ep.host, ep.port, ep.tls, ep.cluster, ep.username, ep.password) == (
        "10.0.0.1",
        7000,
        True,
        True,
        "kv",
        "p@ss",
    )
    assert dict(ep.tls_options) == {"ssl_cert_reqs": "none"}
    assert "p@ss" not in repr(ep) and "p%40ss" not in ep.redacted
    plain = parse_url("redis://h/3")
    assert (plain.port, plain.db, plain.cluster, plain.tls) == (6379, 3, None, False)
    assert parse_url("redis://h", cluster=True).cluster is True
    for bad, pattern in [
        ("http://h", "scheme"),
        ("redis://", "no host"),
        ("redis://h:99999", "URL"),
        ("redis://h/x", "database number"),
        ("redis+cluster://h/1", "only database 0"),
        ("redis://h?ssl_ca_certs=/x", "needs TLS"),
        ("rediss://h?timeout=3", "unknown option 'timeout'.*ssl_ca_certs"),
        ("rediss://h?ssl_cert_reqs=maybe", "ssl_cert_reqs"),
        (42, "expected a redis:// URL"),
    ]:
        with pytest.raises(ConfigError, match=pattern):
            parse_url(bad)


def test_circuit_breaker_opens_backs_off_and_recovers() -> None:
    now = [0.0]
    b = CircuitBreaker("s", threshold=3, backoff_s=0.5, max_backoff_s=2.0, clock=lambda: now[0])
    for _ in range(2):
        assert b.allow()
        b.record(False)
    assert b.state == "closed"
    b.record(False)
    assert b.state == "open" and not b.allow() and b.is_open()
    now[0] = 0.6
    assert b.allow() and b.state == "half-open"
    assert not b.allow()  # one probe at a time
    b.record(False)  # the probe failed: backoff doubles
    assert b.state == "open" and b.backoff_s == 1.0
    now[0] = 1.5
    assert not b.allow()
    for t in (1.7, 3.8, 7.9):
        now[0] = t
        assert b.allow()
        b.record(False)
    assert b.backoff_s == 2.0  # capped
    now[0] = 10.0
    assert b.allow()
    b.record(True)
    assert b.state == "closed" and b.backoff_s == 0.5 and b.allow()


def test_arguments_are_checked_before_connecting() -> None:
    for kwargs, pattern in [
        ({"timeout_ms": 0}, "timeout_ms"),
        ({"timeout_ms": 60001}, "timeout_ms"),
        ({"ttl_s": 0}, "ttl_s"),
        ({"write": "sometimes"}, "write"),
        ({"max_inflight_bytes": -1}, "max_inflight_bytes"),
    ]:
        with pytest.raises(InvalidArgumentError, match=pattern):
            RemoteTier("redis://127.0.0.1:1", NS, P, **kwargs)
    with pytest.raises(InvalidArgumentError, match="payload_bytes"):
        RemoteTier("redis://127.0.0.1:1", NS, 0)
    with pytest.raises(ConfigError, match="scheme"):
        RemoteTier("memcached://127.0.0.1:1", NS, P)


def test_probe_never_raises() -> None:
    assert probe("nonsense://x")["reachable"] is False
    report = probe("redis://:pw@127.0.0.1:1", timeout_ms=200)
    assert report["reachable"] is False and "unreachable" in report["problem"]
    assert "pw" not in str(report).replace("***", "")


# -- standalone -----------------------------------------------------------------------------------


@pytest.mark.redis
def test_round_trip_byte_exact(server: RedisServer, disk_backend: str) -> None:
    with HostSlabPool(P, 16, backend="python") as pool:
        slots = [pool.alloc() for _ in range(16)]
        assert None not in slots
        src, dst = [s for s in slots[:8] if s is not None], [s for s in slots[8:] if s is not None]
        rng = np.random.default_rng(1)
        keys = [rng.bytes(32) for _ in src]
        for slot in src:
            pool.view(slot)[:] = rng.bytes(P)
        with RemoteTier(server.url, NS, P, backend=disk_backend) as tier:
            assert tier.match(keys) == 0
            results = store(tier, [(k, pool.address(s)) for k, s in zip(keys, src, strict=True)])
            assert results == dict.fromkeys(keys, True)
            assert tier.match(keys) == 8 and tier.match([*keys[:3], b"x" * 32, *keys[4:]]) == 3
            ok = fetch(tier, keys, [pool.address(s) for s in dst])
            assert ok == [True] * 8
            for a, b in zip(src, dst, strict=True):
                assert bytes(pool.view(a)) == bytes(pool.view(b))
            d = tier.describe()
            assert (d["mode"], d["masters"], d["breaker"], d["faults"]) == (
                "standalone",
                1,
                "closed",
                0,
            )
            assert d["server"].startswith(("redis ", "valkey ")) and d["written"] == 8
            with server.client() as admin:
                raw = admin.get(remote_key(tier.fingerprint, keys[0]))
            assert len(raw) == HEADER_BYTES + P and raw[HEADER_BYTES:] == bytes(pool.view(src[0]))


@pytest.mark.redis
def test_another_process_stores_this_one_reads(server: RedisServer) -> None:
    run_isolated(
        f"""
        import numpy as np
        from kvortex.tiers.redis import RemoteTier
        rng = np.random.default_rng(7)
        keys = [rng.bytes(32) for _ in range(6)]
        data = np.frombuffer(rng.bytes(6 * {P}), dtype=np.uint8).reshape(6, {P}).copy()
        ok = []
        with RemoteTier({server.url!r}, {NS!r}, {P}) as tier:
            tier.offer([(k, data[i].ctypes.data) for i, k in enumerate(keys)],
                       lambda _k, good: ok.extend(good))
            assert tier.wait_idle(30)
        assert ok == [True] * 6, ok
        """,
        timeout=WAIT,
    )
    rng = np.random.default_rng(7)
    keys = [rng.bytes(32) for _ in range(6)]
    want = np.frombuffer(rng.bytes(6 * P), dtype=np.uint8).reshape(6, P)
    got = np.zeros((6, P), dtype=np.uint8)
    with RemoteTier(server.url, NS, P) as tier:
        assert tier.match(keys) == 6
        assert fetch(tier, keys, [got[i].ctypes.data for i in range(6)]) == [True] * 6
    assert np.array_equal(got, want)


@pytest.mark.redis
def test_tenants_never_see_each_others_chunks(server: RedisServer) -> None:
    a = Namespace("m", "l", "bf16", tenant_salt="acme").encode()
    b = Namespace("m", "l", "bf16", tenant_salt="globex").encode()
    chunks = Chunks(4)  # the very same chunk keys under both namespaces
    with RemoteTier(server.url, a, P) as ta, RemoteTier(server.url, b, P) as tb:
        assert store(ta, chunks.sources()) == dict.fromkeys(chunks.keys, True)
        assert tb.match(chunks.keys) == 0
        assert fetch(tb, chunks.keys, chunks.addresses()) == [False] * 4
        assert not chunks.dst.any()
        with RemoteTier(server.url, a, P) as again:  # the same tenant elsewhere: shared
            assert again.match(chunks.keys) == 4
        with server.client() as admin:
            assert admin.dbsize() == 4


@pytest.mark.redis
def test_lookup_of_512_keys_is_one_round_trip(
    server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    import redis.connection

    chunks = Chunks(2048, payload=64)
    original = redis.connection.Connection.send_packed_command

    def round_trips(keys: list[bytes]) -> tuple[int, int]:
        """(the match, the pipelines it sent); only the tier talks while they are counted."""
        sends = []

        def counting(self: Any, command: Any, check_health: bool = True) -> None:
            sends.append(1)
            original(self, command, check_health)

        with monkeypatch.context() as patch:
            patch.setattr(redis.connection.Connection, "send_packed_command", counting)
            n = tier.match(keys)
        return n, len(sends)

    with RemoteTier(server.url, NS, 64) as tier, server.client() as admin:
        assert all(store(tier, chunks.sources()[:300]).values())
        tier.match(chunks.keys[:1])  # connections made, handshakes done

        def exists_calls() -> int:
            return int(admin.info("commandstats").get("cmdstat_exists", {}).get("calls", 0))

        before = exists_calls()
        assert round_trips(chunks.keys[:512]) == (300, 1)  # one write, one read of the answers
        assert exists_calls() - before == 512
        assert all(store(tier, chunks.sources()[300:]).values())
        assert round_trips(chunks.keys) == (2048, 2)  # 1024 keys per round trip


@pytest.mark.redis
def test_many_round_trips_per_job(server: RedisServer, monkeypatch: pytest.MonkeyPatch) -> None:
    import kvortex.tiers.redis as tier_module

    # 3 values per round trip: 10 chunks take 4 writes and 4 reads, overlapping the checks and
    # copies of one with the next, through both sets of value buffers.
    monkeypatch.setattr(tier_module, "_PIPELINE_BYTES", 3 * (HEADER_BYTES + P))
    chunks = Chunks(10, seed=8)
    with RemoteTier(server.url, NS, P, ttl_s=60) as tier:
        assert store(tier, chunks.sources()) == dict.fromkeys(chunks.keys, True)
        assert fetch(tier, chunks.keys, chunks.addresses()) == [True] * 10
        assert all(chunks.same(i) for i in range(10))
        with server.client() as admin:
            admin.delete(remote_key(tier.fingerprint, chunks.keys[7]))
        chunks.dst[:] = 0
        assert fetch(tier, chunks.keys, chunks.addresses()) == [i != 7 for i in range(10)]
        assert all(chunks.same(i) for i in range(10) if i != 7)


@pytest.mark.redis
def test_write_policies_and_dedup(server: RedisServer) -> None:
    chunks = Chunks(6)
    src = chunks.sources()
    with RemoteTier(server.url, NS, P, write="seen-twice") as tier:
        assert tier.offer(src[:3], lambda *_: None) == []
        assert store(tier, src[:3]) == dict.fromkeys(chunks.keys[:3], True)
    with RemoteTier(server.url, NS, P, write="none") as tier:
        assert tier.offer(src, lambda *_: None) == [] and tier.match(chunks.keys) == 3
    with RemoteTier(server.url, NS, P, write="all") as tier:
        assert store(tier, src) == dict.fromkeys(chunks.keys, True)
        d = tier.describe()
        assert (d["already_stored"], d["written"]) == (3, 3)  # what the server held: not sent


@pytest.mark.redis
def test_inflight_bound_drops_offers_instead_of_blocking(server: RedisServer) -> None:
    chunks = Chunks(5)
    with RemoteTier(server.url, NS, P, max_inflight_bytes=2 * P) as tier:
        gate = threading.Event()
        accepted = tier.offer(chunks.sources(), lambda *_: gate.wait(WAIT))
        assert accepted == chunks.keys[:2]
        assert tier.describe()["dropped"] == 3
        gate.set()
        assert tier.wait_idle(WAIT)
        assert tier.describe()["inflight_bytes"] == 0
        assert len(tier.offer(chunks.sources()[2:4], lambda *_: None)) == 2


@pytest.mark.redis
def test_ttl_is_set_and_renewed_by_reads(server: RedisServer) -> None:
    chunks = Chunks(2)
    with RemoteTier(server.url, NS, P, ttl_s=100) as tier, server.client() as admin:
        assert all(store(tier, chunks.sources()).values())
        rkey = remote_key(tier.fingerprint, chunks.keys[0])
        assert 90 <= admin.ttl(rkey) <= 100
        admin.expire(rkey, 5)
        assert fetch(tier, chunks.keys, chunks.addresses()) == [True, True]
        assert admin.ttl(rkey) > 90
        admin.expire(rkey, 5)
        assert all(store(tier, chunks.sources()).values())  # a re-offer renews it too
        assert admin.ttl(rkey) > 90


@pytest.mark.redis
def test_closed_tier_serves_misses(server: RedisServer) -> None:
    chunks = Chunks(2)
    tier = RemoteTier(server.url, NS, P)
    tier.close()
    tier.close()
    assert tier.match(chunks.keys) == 0
    assert tier.offer(chunks.sources(), lambda *_: None) == []
    assert fetch(tier, chunks.keys, chunks.addresses()) == [False, False]
    with pytest.raises(InvalidArgumentError, match="32 bytes"):
        tier.match([b"short"])


# -- faults ---------------------------------------------------------------------------------------


@pytest.mark.redis
def test_server_killed_then_restarted(
    server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    chunks = Chunks(8)
    caplog.set_level(logging.INFO, logger="kvortex")
    with RemoteTier(server.url, NS, P, timeout_ms=200) as tier:
        assert all(store(tier, chunks.sources()[:4]).values())
        server.kill()
        for _ in range(3):
            started = time.monotonic()
            assert tier.match(chunks.keys) == 0
            assert time.monotonic() - started < 1.0
        assert fetch(tier, chunks.keys[:4], chunks.addresses()[:4]) == [False] * 4
        d = tier.describe()
        assert d["breaker"] == "open" and d["reachable"] is False and d["faults"] >= 3
        assert "consecutive failures" in caplog.text
        started = time.monotonic()
        assert tier.match(chunks.keys) == 0  # open: no attempt at all
        assert time.monotonic() - started < 0.1
        assert tier.offer(chunks.sources(), lambda *_: None) == []
        server.start()  # same port, empty
        deadline = time.monotonic() + WAIT
        while tier.describe()["breaker"] != "closed":
            assert time.monotonic() < deadline, "no recovery after the backoff"
            tier.match(chunks.keys)
            time.sleep(0.05)
        assert "reachable again" in caplog.text
        assert tier.match(chunks.keys) == 0  # the restarted server is empty: misses
        assert all(store(tier, chunks.sources()).values())
        assert fetch(tier, chunks.keys, chunks.addresses()) == [True] * 8
        assert all(chunks.same(i) for i in range(8))


@pytest.mark.redis
def test_stalled_server_is_a_miss_within_the_timeout(server: RedisServer) -> None:
    chunks = Chunks(4)
    with RemoteTier(server.url, NS, P, timeout_ms=200) as tier:
        assert all(store(tier, chunks.sources()).values())
        admin = server.client()
        stall = threading.Thread(target=admin.execute_command, args=("DEBUG", "SLEEP", "1.5"))
        stall.start()
        try:
            time.sleep(0.05)
            started = time.monotonic()
            assert tier.match(chunks.keys) == 0
            assert time.monotonic() - started < 0.5
            started = time.monotonic()
            assert fetch(tier, chunks.keys, chunks.addresses()) == [False] * 4
            assert time.monotonic() - started < 1.2
            assert tier.describe()["faults"] >= 2
        finally:
            stall.join(WAIT)
            admin.close()
        deadline = time.monotonic() + WAIT
        while tier.match(chunks.keys) != 4:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert fetch(tier, chunks.keys, chunks.addresses()) == [True] * 4


@pytest.mark.redis
def test_a_server_always_too_slow_is_left_alone(
    server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    # Chunks of 100 MB: transfers may take a second, so the socket would wait for the late
    # answers; the lookup deadline (100 ms) is what counts them as failures.
    keys = Chunks(1).keys
    with RemoteTier(server.url, NS, 100 * 10**6, timeout_ms=100) as tier, server.client() as admin:
        for _ in range(3):
            stall = threading.Thread(target=admin.execute_command, args=("DEBUG", "SLEEP", "0.3"))
            stall.start()
            time.sleep(0.05)
            started = time.monotonic()
            assert tier.match(keys) == 0
            assert time.monotonic() - started < 0.25
            stall.join(WAIT)
            time.sleep(0.1)  # the late answer arrives and is counted
        assert tier.describe()["breaker"] == "open"
        assert "answers after 100 ms" in caplog.text


@pytest.mark.redis
@pytest.mark.parametrize("policy", ["allkeys-lru", "noeviction"])
def test_maxmemory_evictions_and_refusals_are_misses(tmp_path: Path, policy: str) -> None:
    require_redis()
    s = RedisServer(tmp_path, ["--maxmemory", "4mb", "--maxmemory-policy", policy]).start()
    chunks = Chunks(48, payload=256 * 1024)
    try:
        with RemoteTier(s.url, NS, chunks.payload) as tier:
            written = store(tier, chunks.sources())
            ok = fetch(tier, chunks.keys, chunks.addresses())
            assert 0 < sum(ok) < 48
            for i, good in enumerate(ok):
                assert not good or chunks.same(i)
            assert tier.match(chunks.keys) < 48
            assert tier.describe()["faults"] > 0
            if policy == "noeviction":
                assert not all(written.values())  # OOM refusals: failed writes
    finally:
        s.stop()


@pytest.mark.redis
def test_damaged_values_are_misses_counted_and_deleted(server: RedisServer) -> None:
    chunks = Chunks(6)
    with RemoteTier(server.url, NS, P) as tier, server.client() as admin:
        assert all(store(tier, chunks.sources()).values())
        rkeys = [remote_key(tier.fingerprint, k) for k in chunks.keys]
        value = admin.get(rkeys[0])
        admin.set(rkeys[0], b"garbage")
        admin.set(rkeys[1], admin.get(rkeys[1])[:-10])  # truncated
        flipped = bytearray(admin.get(rkeys[2]))
        flipped[HEADER_BYTES + 100] ^= 1
        admin.set(rkeys[2], bytes(flipped))  # payload damaged, header intact
        admin.set(rkeys[3], admin.get(rkeys[4]))  # another chunk's value
        admin.set(rkeys[4], value[:HEADER_BYTES])  # a header alone
        ok = fetch(tier, chunks.keys, chunks.addresses())
        assert ok == [False] * 5 + [True]
        assert not chunks.dst[:5].any()  # a value that fails a check is never copied
        assert tier.describe()["faults"] == 5
        assert admin.exists(*rkeys[:5]) == 0 and admin.exists(rkeys[5]) == 1
        assert tier.match(chunks.keys) == 0
        assert all(store(tier, chunks.sources()).values())  # written again
        assert fetch(tier, chunks.keys, chunks.addresses()) == [True] * 6
        assert all(chunks.same(i) for i in range(6))


@pytest.mark.redis
def test_a_chunk_of_another_size_is_a_miss_left_alone(server: RedisServer) -> None:
    small, big = Chunks(1, payload=P), Chunks(1, payload=2 * P)
    big.keys = small.keys
    with RemoteTier(server.url, NS, 2 * P) as other, RemoteTier(server.url, NS, P) as tier:
        assert all(store(other, big.sources()).values())
        assert fetch(tier, small.keys, small.addresses()) == [False]
        assert tier.describe()["faults"] == 1
        assert fetch(other, big.keys, big.addresses()) == [True]


@pytest.mark.redis
def test_passwords(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    require_redis()
    s = RedisServer(tmp_path, ["--requirepass", "s3cret-pw"]).start()
    monkeypatch.delenv("KVORTEX_REMOTE_PASSWORD", raising=False)
    try:
        with pytest.raises(RemoteTierError, match="requires a password") as info:
            RemoteTier(s.url, NS, P)
        assert isinstance(info.value, KVortexError) and isinstance(info.value, ConnectionError)
        url = f"redis://:wrong-pw@127.0.0.1:{s.port}"
        with pytest.raises(RemoteTierError, match="authentication failed") as info:
            RemoteTier(url, NS, P)
        assert "wrong-pw" not in str(info.value) and "redis://:***@" in str(info.value)
        with RemoteTier(f"redis://:s3cret-pw@127.0.0.1:{s.port}", NS, P) as tier:
            assert "s3cret" not in tier.url and "s3cret" not in str(tier.describe())
            chunks = Chunks(2)
            assert all(store(tier, chunks.sources()).values())
        monkeypatch.setenv("KVORTEX_REMOTE_PASSWORD", "s3cret-pw")
        with RemoteTier(s.url, NS, P) as tier:
            assert tier.match(chunks.keys) == 2
    finally:
        s.stop()


@pytest.mark.redis
def test_acl_user(server: RedisServer) -> None:
    with server.client() as admin:
        admin.execute_command("ACL", "SETUSER", "kv", "on", ">kv-pw", "~kvx:*", "+@all")
    base = f"127.0.0.1:{server.port}"
    with RemoteTier(f"redis://kv:kv-pw@{base}", NS, P) as tier:
        chunks = Chunks(3)
        assert all(store(tier, chunks.sources()).values())
        assert fetch(tier, chunks.keys, chunks.addresses()) == [True] * 3
    with pytest.raises(RemoteTierError, match="authentication failed"):
        RemoteTier(f"redis://kv:nope@{base}", NS, P)


@pytest.mark.redis
def test_unreachable_and_wrong_kind_of_server(server: RedisServer, cluster: RedisCluster) -> None:
    s = RedisServer(server.directory / "gone")  # a free port, nothing started
    started = time.monotonic()
    with pytest.raises(RemoteTierError, match="unreachable"):
        RemoteTier(s.url, NS, P)
    assert time.monotonic() - started < 2
    with pytest.raises(RemoteTierError, match="not a Redis Cluster"):
        RemoteTier(server.url.replace("redis://", "redis+cluster://"), NS, P)
    plain_url = cluster.url.replace("redis+cluster://", "redis://")
    with pytest.raises(RemoteTierError, match="Cluster node"):
        RemoteTier(plain_url, NS, P, cluster=False)
    with RemoteTier(plain_url, NS, P) as tier:  # detected
        assert tier.describe()["mode"] == "cluster"


@pytest.mark.redis
def test_tls(tmp_path: Path) -> None:
    require_redis()
    files = TLSFiles.make(tmp_path / "tls")
    try:
        s = RedisServer(tmp_path / "redis", tls=files).start()
    except LaunchError as exc:
        if "tls" in str(exc).lower():
            pytest.skip(f"this redis-server has no TLS: {exc}")
        raise
    try:
        url = f"{s.url}?ssl_ca_certs={files.cert}"
        with RemoteTier(url, NS, P) as tier:
            chunks = Chunks(3)
            assert all(store(tier, chunks.sources()).values())
            assert fetch(tier, chunks.keys, chunks.addresses()) == [True] * 3
            assert all(chunks.same(i) for i in range(3))
        with pytest.raises(RemoteTierError, match=r"(?i)certificate"):
            RemoteTier(s.url, NS, P)  # the system CAs do not know this certificate
        with pytest.raises(RemoteTierError):
            RemoteTier(s.url.replace("rediss://", "redis://"), NS, P, timeout_ms=500)
    finally:
        s.stop()


# -- cluster --------------------------------------------------------------------------------------


@pytest.mark.redis
def test_cluster_round_trip(cluster: RedisCluster, disk_backend: str) -> None:
    chunks = Chunks(64, seed=3)
    ns = Namespace("cluster-round-trip").encode()
    with RemoteTier(cluster.url, ns, P, backend=disk_backend) as tier:
        d = tier.describe()
        assert (d["mode"], d["masters"], d["replicas"]) == ("cluster", 3, 0)
        assert all(store(tier, chunks.sources()).values())
        assert tier.match(chunks.keys) == 64
        assert fetch(tier, chunks.keys, chunks.addresses()) == [True] * 64
        assert all(chunks.same(i) for i in range(64))
        for node in cluster.nodes:  # spread over every master
            with node.client() as c:
                assert c.dbsize() > 0


@pytest.mark.redis
def test_cluster_moved_and_ask_are_misses_then_served(cluster: RedisCluster) -> None:
    import redis.cluster

    chunks = Chunks(1, seed=4)
    ns = Namespace("cluster-resharding").encode()
    with RemoteTier(cluster.url, ns, P) as tier:
        assert all(store(tier, chunks.sources()).values())
        rkey = remote_key(tier.fingerprint, chunks.keys[0])
        slot = redis.cluster.key_slot(rkey)
        source = cluster.node_of(rkey)
        target = next(n for n in cluster.nodes if n is not source)
        with source.client() as src, target.client() as dst:
            src_id, dst_id = (
                src.execute_command("CLUSTER MYID"),
                dst.execute_command("CLUSTER MYID"),
            )
            dst.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", src_id)
            src.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", dst_id)
            src.execute_command("MIGRATE", "127.0.0.1", target.port, rkey, 0, 5000)
            assert tier.match(chunks.keys) == 0  # ASK: the key is on its way
            for node in cluster.nodes:
                with node.client() as c:
                    c.execute_command("CLUSTER SETSLOT", slot, "NODE", dst_id)
        assert fetch(tier, chunks.keys, chunks.addresses()) == [False]  # MOVED: slot map refresh
        deadline = time.monotonic() + WAIT
        while tier.match(chunks.keys) != 1:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert fetch(tier, chunks.keys, chunks.addresses()) == [True]
        assert chunks.same(0)


@pytest.mark.redis
def test_cluster_node_killed_only_its_keys_miss(tmp_path: Path) -> None:
    require_redis()
    c = RedisCluster(tmp_path).start()
    chunks = Chunks(48, seed=5)
    try:
        with RemoteTier(c.url, NS, P, timeout_ms=200) as tier:
            assert all(store(tier, chunks.sources()).values())
            rkeys = [remote_key(tier.fingerprint, k) for k in chunks.keys]
            owners = [c.node_of(k) for k in rkeys]
            dead = owners[len(owners) // 2]
            dead.kill()
            lost = [o is dead for o in owners]
            for _ in range(4):
                started = time.monotonic()
                assert tier.match(chunks.keys) == lost.index(True)
                assert time.monotonic() - started < 1.0
            chunks.dst[:] = 0
            ok = fetch(tier, chunks.keys, chunks.addresses())
            assert ok == [not x for x in lost]
            assert all(chunks.same(i) for i in range(48) if ok[i])
            d = tier.describe()
            assert d["breaker"] == "partly open" and d["reachable"] is True
            assert d["nodes"][f"127.0.0.1:{dead.port}"] == "open"
            live = [i for i in range(48) if not lost[i]]
            assert tier.match([chunks.keys[i] for i in live]) == len(live)
            fresh = Chunks(16, seed=6)
            results = store(tier, fresh.sources())
            fresh_owners = [c.node_of(remote_key(tier.fingerprint, k)) for k in fresh.keys]
            for key, owner in zip(fresh.keys, fresh_owners, strict=True):
                assert key not in results or results[key] == (owner is not dead)
    finally:
        c.stop()


# -- kvortex info ---------------------------------------------------------------------------------


@pytest.mark.redis
def test_kvortex_info_shows_the_shared_tier(
    server: RedisServer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from kvortex.cli import main
    from kvortex.info import collect

    with server.client() as admin:
        admin.config_set("requirepass", "info-pw")
    monkeypatch.setenv("KVORTEX_REMOTE_PASSWORD", "info-pw")
    cfg = KVortexConfig.from_dict({"remote_url": f"redis://127.0.0.1:{server.port}/0"})
    report = collect(cfg, probe_cuda=False)
    tier = report["remote_tier"]
    assert tier["enabled"] and tier["reachable"] and tier["mode"] == "standalone"
    assert tier["server"].startswith("redis ") and tier["masters"] == 1
    assert report["process_switches"]["KVORTEX_REMOTE_PASSWORD"] == "***"
    monkeypatch.setenv("KVORTEX_REMOTE_URL", f"redis://:info-pw@127.0.0.1:{server.port}")
    assert main(["info", "--no-cuda"]) == 0
    out = capsys.readouterr().out
    assert f"shared tier: redis://:***@127.0.0.1:{server.port}" in out and "reachable" in out
    assert "info-pw" not in out
