"""The shared tier (L3): chunks in Redis or Valkey, one server or a Redis Cluster, shared by
every process and machine that points at it.

Keys and values
---------------
A chunk is one string key::

    kvx:1:<namespace fingerprint, 32 hex digits>:<chunk key, 32 raw bytes>

The fingerprint is ``SHA-256(Namespace.encode())[:16]``
(:func:`~kvortex.tiers.records.namespace_fingerprint`): the model, layout, dtype,
tensor-parallel rank and size and the tenant salt all change it, so deployments and tenants
sharing a server never see each other's chunks; ``1`` is the value format version, so a new
format never reads an old one. The value is a header and the payload::

    offset  size  field (little endian)
    0       8     magic b"KVXREMT1"
    8       4     format version (1)
    12      4     header bytes (80)
    16      16    namespace fingerprint
    32      32    chunk key
    64      8     payload bytes
    72      4     payload CRC-32 (zlib's polynomial; kvortex.diskio.crc32)
    76      4     header CRC-32 over bytes 0..75
    80      P     payload (the chunk, P = payload bytes)

A value is served only if its header CRC, magic, version, size, namespace, key and length
match and the payload's CRC-32 is right, all checked before anything is copied to the
caller's memory: a value overwritten with something else, truncated or damaged reads as a
miss, never as wrong bytes, and is deleted (the next offer writes it again). A valid value of
another chunk size is a miss left alone.

Operations
----------
``match``: one ``EXISTS`` per key, pipelined, so a 128K-token prompt (512 chunks of 256
tokens) is one round trip per server (a cluster: one per master holding its keys, all in
parallel); beyond 1024 keys, further round trips while everything so far was found. The
caller waits at most ``timeout_ms``. ``offer``: background writes; one pipelined ``EXISTS``
(``EXPIRE`` with a TTL, renewing it) finds the chunks the server already holds, from this
process or any other, and only the rest is sent as pipelined ``SET`` (``EX ttl``) of at most
8 MiB per round trip (at least one value). ``fetch``: pipelined ``GET`` (with ``EXPIRE`` under
a TTL) of at most 8 MiB per round trip, each value checked, then copied to its address. The
CRC-32 and copies of one round trip's values run on helper threads (the GIL released) while
the next round trip travels; a writing thread keeps two sets of value buffers of 8 MiB (or
one value, if larger) until the tier closes: large values are sent from there as they are.

Write policy (``write``): ``seen-twice`` sends a chunk the second time this process offers it
(a bounded memory of first offers, like the disk tier's admission): hot prefixes reach the
shared tier, one-off prompts cost no network and no server memory. ``all`` sends every chunk
offered; ``none`` only reads what others wrote. In-flight writes are bounded
(``max_inflight_bytes``): beyond it an offer is dropped and counted, never waited for.

Failures are misses: a server down, slow (timeouts), restarted (empty), evicting under
``maxmemory``, a value damaged, a cluster resharding (``MOVED``/``ASK``: the key is a miss and
the slot map is refreshed) or failing over. Each is counted in :attr:`RemoteTier.faults` and
logged at most once a minute per kind; nothing raises into the caller. Every server (each
cluster master) has a :class:`~kvortex.tiers.faults.CircuitBreaker`: after 3 consecutive
failures (an error, a timeout, or a lookup answered after its deadline) it is not contacted
for 0.5 s, doubling to 30 s, and its keys are misses at once; in a cluster the other masters
go on serving. Run cluster nodes with
``cluster-require-full-coverage no`` so that a dead master does not stop the others.

Threading: every public method may be called from any thread. ``match`` runs its pipelines on
a small pool of lookup threads and stops waiting at its deadline. Writes and reads run on the
tier's I/O thread in FIFO order (a cluster's masters in parallel on helper threads); completion
callbacks run on the I/O thread (or on the calling thread before ``fetch`` returns when there
is nothing to read). Connecting and routing: :mod:`kvortex.tiers.redis_servers`.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import functools
import logging
import queue
import struct
import threading
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from kvortex import diskio
from kvortex.errors import InvalidArgumentError
from kvortex.tiers.faults import CircuitBreaker, RateLimitedLog
from kvortex.tiers.records import namespace_fingerprint
from kvortex.tiers.redis_servers import (
    PASSWORD_ENV,
    RemoteTierError,
    Servers,
    connect,
    parse_url,
    probe,
    redacted_url,
    servers_of,
)

__all__ = [
    "HEADER_BYTES",
    "PASSWORD_ENV",
    "WRITE_POLICIES",
    "RemoteTier",
    "RemoteTierError",
    "ValueHeader",
    "pack_value_header",
    "probe",
    "redacted_url",
    "remote_key",
    "unpack_value_header",
]

log = logging.getLogger("kvortex")

VERSION = 1
MAGIC = b"KVXREMT1"
_HEAD = struct.Struct("<8sII16s32sQI")  # bytes 0..75
_HEAD_CRC = struct.Struct("<I")
HEADER_BYTES = _HEAD.size + _HEAD_CRC.size  # 80
KEY_BYTES = 32
WRITE_POLICIES = ("all", "seen-twice", "none")

_MATCH_BATCH = 1024  # keys per lookup round trip
_PIPELINE_BYTES = 8 << 20  # value bytes per write/read round trip (at least one value)
_SEEN_MAX = 16384  # first offers remembered by "seen-twice"
_RATE_LIMITED = RateLimitedLog()


# -- the value format -------------------------------------------------------------------------


@dataclass(frozen=True)
class ValueHeader:
    """A value header's fields (see the module docstring)."""

    ns: bytes
    key: bytes
    payload: int
    crc: int


def pack_value_header(h: ValueHeader, out: bytearray | memoryview | None = None) -> bytes:
    """The :data:`HEADER_BYTES` header bytes of ``h`` (written at the start of ``out`` too)."""
    head = _HEAD.pack(MAGIC, VERSION, HEADER_BYTES, h.ns, h.key, h.payload, h.crc)
    raw = head + _HEAD_CRC.pack(zlib.crc32(head))
    if out is not None:
        out[:HEADER_BYTES] = raw
    return raw


def unpack_value_header(raw: bytes | memoryview) -> ValueHeader | None:
    """The header at the start of ``raw``, or None when it is not a valid header."""
    if len(raw) < HEADER_BYTES:
        return None
    head = bytes(raw[: _HEAD.size])
    (crc,) = _HEAD_CRC.unpack_from(raw, _HEAD.size)
    if zlib.crc32(head) != crc:
        return None
    magic, version, hbytes, ns, key, payload, pcrc = _HEAD.unpack(head)
    if magic != MAGIC or version != VERSION or hbytes != HEADER_BYTES:
        return None
    return ValueHeader(ns, key, payload, pcrc)


def remote_key(fingerprint: bytes, key: bytes) -> bytes:
    """The server key of chunk ``key`` under a namespace fingerprint."""
    return b"kvx:%d:%s:%s" % (VERSION, fingerprint.hex().encode(), key)


# -- the tier ---------------------------------------------------------------------------------


@dataclass
class _Write:
    chunks: list[tuple[bytes, int]]
    done: Callable[[list[bytes], list[bool]], None]


@dataclass
class _Read:
    keys: list[bytes]
    addresses: list[int]
    done: Callable[[list[bool]], None]


class RemoteTier:
    """L3 for chunks of ``payload_bytes`` bytes under one namespace, in Redis or Valkey.

    Args:
        url: ``redis://``, ``rediss://``, ``redis+cluster://`` or ``rediss+cluster://``
            (:mod:`kvortex.tiers.redis_servers`); the password may come from
            ``KVORTEX_REMOTE_PASSWORD``.
        namespace: the encoded namespace (:meth:`kvortex.keys.Namespace.encode`; under tensor
            parallelism the rank's, :meth:`~kvortex.keys.Namespace.for_rank`).
        payload_bytes: bytes of one chunk.
        timeout_ms: a lookup's time budget, and the connect timeout (1 to 60000).
        ttl_s: expiry of written chunks in seconds, renewed on reads and re-offers; None: none.
        write: ``"all"``, ``"seen-twice"`` or ``"none"``.
        max_inflight_bytes: payload bytes offered and not yet written beyond which offers are
            dropped.
        backend: CRC-32 implementation (``None``: the process default).
        cluster: True/False force a Redis Cluster client or a plain one; None: from the URL
            scheme, else detected.

    Raises:
        RemoteTierError: the server is unreachable, refuses the credentials, or is not what the
            URL says (the message names the redacted URL and the reason).
        ConfigError: the URL is malformed.
        InvalidArgumentError: another argument is out of range.
    """

    def __init__(
        self,
        url: str,
        namespace: bytes,
        payload_bytes: int,
        *,
        timeout_ms: int = 200,
        ttl_s: int | None = None,
        write: str = "all",
        max_inflight_bytes: int = 256 << 20,
        backend: str | None = None,
        cluster: bool | None = None,
    ) -> None:
        _check_int("payload_bytes", payload_bytes, 1)
        _check_int("timeout_ms", timeout_ms, 1, 60000)
        _check_int("max_inflight_bytes", max_inflight_bytes, 0)
        if ttl_s is not None:
            _check_int("ttl_s", ttl_s, 1)
        if write not in WRITE_POLICIES:
            raise InvalidArgumentError(f"write={write!r}; expected one of {WRITE_POLICIES}")
        endpoint = parse_url(url, key="url", cluster=cluster)
        self.url = endpoint.redacted
        self.payload_bytes = payload_bytes
        self.timeout_s = timeout_ms / 1e3
        self.ttl_s = ttl_s
        self.write = write
        self.max_inflight_bytes = max_inflight_bytes
        self.backend = backend
        self.fingerprint = namespace_fingerprint(namespace)
        self._prefix = remote_key(self.fingerprint, b"")
        self._per_pipeline = max(1, _PIPELINE_BYTES // (HEADER_BYTES + payload_bytes))
        self._conn = connect(endpoint, self.timeout_s, HEADER_BYTES + payload_bytes)
        self._servers: Servers = servers_of(self._conn, self.url)
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._breakers: dict[str, CircuitBreaker] = {}
        self._seen: OrderedDict[bytes, None] = OrderedDict()
        self._pending: set[bytes] = set()
        self._inflight = 0
        self._lookups = 0
        self._queued = 0
        self._closed = False
        self._local = threading.local()  # per-thread write scratch buffers
        self.faults = self.dropped = self.written = self.already_stored = 0
        self.write_failures = self.read_chunks = self.read_failures = 0
        workers = max(4, 2 * self._servers.masters())
        self._lookup_pool = concurrent.futures.ThreadPoolExecutor(
            workers, thread_name_prefix="kvortex-remote-lookup"
        )
        self._max_lookups = 2 * workers
        self._fanout = concurrent.futures.ThreadPoolExecutor(
            workers, thread_name_prefix="kvortex-remote-io"
        )
        self._helpers = concurrent.futures.ThreadPoolExecutor(
            workers, thread_name_prefix="kvortex-remote-prep"
        )
        self._jobs: queue.SimpleQueue[_Write | _Read | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="kvortex-remote", daemon=True)
        self._thread.start()
        log.info(
            "kvortex: shared tier %s: %s %s, ping %.2f ms, write %s, ttl %s",
            self.url,
            self._servers.mode,
            self._conn.server,
            self._conn.ping_ms,
            write,
            f"{ttl_s} s" if ttl_s else "none",
        )

    # -- queries ------------------------------------------------------------------------------

    def match(self, keys: Sequence[bytes]) -> int:
        """Chunks of ``keys`` the shared tier holds, contiguous from the first; 0 on any
        failure or when ``timeout_ms`` runs out."""
        _check_keys(keys)
        if self._closed or not keys:
            return 0
        deadline = time.monotonic() + self.timeout_s
        n = 0
        for start in range(0, len(keys), _MATCH_BATCH):
            found = self._exists(keys[start : start + _MATCH_BATCH], deadline)
            run = found.index(False) if False in found else len(found)
            n += run
            if run < len(found):
                break
        return n

    def describe(self) -> dict[str, Any]:
        """What ``kvortex info`` and logs show about this tier."""
        for name in self._servers.names():
            self._breaker(name)  # every master listed, contacted or not
        with self._lock:
            breakers = {name: b.state for name, b in self._breakers.items()}
            counters = {
                "written": self.written,
                "already_stored": self.already_stored,
                "write_failures": self.write_failures,
                "dropped": self.dropped,
                "read_chunks": self.read_chunks,
                "read_failures": self.read_failures,
                "faults": self.faults,
                "inflight_bytes": self._inflight,
            }
        states = set(breakers.values()) or {"closed"}
        report: dict[str, Any] = {
            "url": self.url,
            "mode": self._servers.mode,
            "server": self._conn.server,
            "reachable": any(s != "open" for s in breakers.values()) or not breakers,
            **self._servers.shape(),
            "breaker": states.pop() if len(states) == 1 else "partly open",
            "write": self.write,
            "ttl_s": self.ttl_s,
            "timeout_ms": round(self.timeout_s * 1e3),
            "payload_bytes": self.payload_bytes,
            "max_inflight_bytes": self.max_inflight_bytes,
            **counters,
        }
        if self._servers.mode == "cluster":
            report["nodes"] = breakers
        return report

    # -- writes and reads ---------------------------------------------------------------------

    def offer(
        self,
        chunks: Sequence[tuple[bytes, int]],
        done: Callable[[list[bytes], list[bool]], None],
    ) -> list[bytes]:
        """Write chunks ``(key, address of payload_bytes bytes)`` in the background. Returns the
        keys accepted: their memory must stay unchanged until ``done(accepted keys, ok per key)``
        runs (on the I/O thread, possibly before this returns). Never blocks on the server."""
        _check_keys([k for k, _ in chunks])
        accepted: list[tuple[bytes, int]] = []
        refused = self._refused()
        with self._lock:
            if self._closed or self.write == "none":
                return []
            for key, address in chunks:
                if key in self._pending or not self._admit(key):
                    continue
                if refused or self._inflight + self.payload_bytes > self.max_inflight_bytes:
                    self.dropped += 1
                    continue
                self._inflight += self.payload_bytes
                self._pending.add(key)
                accepted.append((key, address))
            if accepted:
                self._put(_Write(accepted, done))
        return [k for k, _ in accepted]

    def fetch(
        self,
        keys: Sequence[bytes],
        addresses: Sequence[int],
        done: Callable[[list[bool]], None],
    ) -> None:
        """Read ``keys`` into ``addresses`` (``payload_bytes`` each); ``done(ok per key)`` runs
        on the I/O thread, or here when nothing can be read (closed, every server refused)."""
        _check_keys(keys)
        if len(keys) != len(addresses):
            raise InvalidArgumentError(f"{len(keys)} keys but {len(addresses)} addresses")
        refused = self._refused()
        with self._lock:
            if not self._closed and keys and not refused:
                self._put(_Read(list(keys), list(addresses), done))
                return
        done([False] * len(keys))

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until every queued write and read ran (tests, close)."""
        with self._idle:
            return self._idle.wait_for(lambda: self._queued == 0, timeout)

    def close(self) -> None:
        """Finish queued writes and reads (each bounded by the socket timeouts), stop the
        threads, disconnect. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._jobs.put(None)
        self._thread.join()
        self._lookup_pool.shutdown(wait=True, cancel_futures=True)
        self._fanout.shutdown(wait=True)
        self._helpers.shutdown(wait=True)
        self._servers.close()

    def __enter__(self) -> RemoteTier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- lookups ------------------------------------------------------------------------------

    def _exists(self, keys: Sequence[bytes], deadline: float) -> list[bool]:
        rkeys = [self._prefix + k for k in keys]
        groups = self._servers.route(rkeys)
        found = [False] * len(keys)
        # Keys after the first one on a refused server cannot extend the prefix: skip them.
        limit = len(keys)
        for name, positions in groups.items():
            if not name or self._breaker(name).is_open():
                limit = min(limit, positions[0])
        futures: dict[concurrent.futures.Future[list[Any] | None], list[int]] = {}
        for name, positions in groups.items():
            wanted = [p for p in positions if p < limit]
            if not wanted:
                continue
            with self._lock:
                busy = self._lookups >= self._max_lookups
                if not busy:
                    self._lookups += 1
            if busy:  # earlier lookups still wait for a stalled server: miss at once
                self._fault("busy", "lookups are still waiting for a stalled server")
                break
            which = [rkeys[p] for p in wanted]
            try:
                future = self._lookup_pool.submit(self._exists_on, name, which, deadline)
            except RuntimeError:  # closed meanwhile
                with self._lock:
                    self._lookups -= 1
                break
            future.add_done_callback(self._lookup_ended)
            futures[future] = wanted
        finished, late = concurrent.futures.wait(
            futures, timeout=max(0.0, deadline - time.monotonic())
        )
        for future in late:
            future.cancel()
        if late:
            self._fault("timeout", f"a lookup took more than {self.timeout_s * 1e3:g} ms")
        for future in finished:
            results = future.result()
            if results is not None:
                for p, r in zip(futures[future], results, strict=True):
                    found[p] = self._answer(r) in (1, True)
        return found

    def _lookup_ended(self, _future: concurrent.futures.Future[list[Any] | None]) -> None:
        with self._lock:
            self._lookups -= 1

    def _exists_on(self, name: str, rkeys: list[bytes], deadline: float) -> list[Any] | None:
        def work(client: Any) -> list[Any]:
            pipe = client.pipeline(transaction=False)
            for rkey in rkeys:
                pipe.execute_command("EXISTS", rkey)
            return list(pipe.execute(raise_on_error=False))

        return self._call(name, work, deadline)

    # -- the I/O thread -----------------------------------------------------------------------

    def _put(self, job: _Write | _Read) -> None:
        self._queued += 1  # under self._lock
        self._jobs.put(job)

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                self._local.__dict__.clear()  # this thread's scratch buffers
                return
            try:
                if isinstance(job, _Write):
                    self._write(job)
                else:
                    self._read(job)
            except Exception as exc:  # never let the I/O thread die: the job's chunks are misses
                log.exception("kvortex: shared tier job failed: %s", exc)
            finally:
                with self._idle:
                    self._queued -= 1
                    self._idle.notify_all()

    def _each_server(self, rkeys: list[bytes], work: Callable[[str, list[int]], None]) -> None:
        """``work(server, positions)`` for the keys of each server: cluster masters in
        parallel, each bounded by its socket timeouts. Never raises: a failure (a bug) leaves
        that server's keys failed, so the job's callback always runs."""
        groups = list(self._servers.route(rkeys).items())
        if len(groups) == 1:
            _attempt(work, *groups[0])
            return
        concurrent.futures.wait([self._fanout.submit(_attempt, work, *g) for g in groups])

    def _write(self, job: _Write) -> None:
        keys = [k for k, _ in job.chunks]
        rkeys = [self._prefix + k for k in keys]
        ok = [False] * len(keys)
        try:
            self._each_server(rkeys, lambda name, pos: self._write_on(name, pos, rkeys, job, ok))
        finally:
            with self._lock:
                self._pending.difference_update(keys)
                self._inflight -= len(keys) * self.payload_bytes
                self.write_failures += ok.count(False)
        job.done(keys, ok)

    def _write_on(
        self, name: str, positions: list[int], rkeys: list[bytes], job: _Write, ok: list[bool]
    ) -> None:
        if not name:
            self._fault("slot", "a key's cluster slot has no node")
            return
        wanted = [rkeys[p] for p in positions]
        present = self._call(name, lambda client: self._renew(client, wanted))
        if present is None:
            return
        todo = []
        for p, r in zip(positions, present, strict=True):
            if self._answer(r) in (1, True):
                ok[p] = True
            else:
                todo.append(p)
        with self._lock:
            self.already_stored += len(positions) - len(todo)
        per = self._per_pipeline
        batches = [todo[i : i + per] for i in range(0, len(todo), per)]
        if not batches:
            return
        # Two sets of value buffers: batch k+1 is built (CRC-32 and copy, the GIL released)
        # on a helper thread while batch k travels.
        odd = len(batches[1]) if len(batches) > 1 else 0  # only the last batch may be short
        sets = [self._scratch(len(batches[0]), 0), self._scratch(odd, 1)]
        building: concurrent.futures.Future[list[memoryview]] | None
        building = self._helpers.submit(self._build, batches[0], sets[0], job)
        try:
            for k, batch in enumerate(batches):
                assert building is not None
                values = building.result()
                building = None
                if k + 1 < len(batches):
                    building = self._helpers.submit(
                        self._build, batches[k + 1], sets[(k + 1) % 2], job
                    )
                send = functools.partial(self._set, batch=batch, values=values, rkeys=rkeys)
                results = self._call(name, send)
                if results is None:
                    return
                for p, r in zip(batch, results, strict=True):
                    ok[p] = self._answer(r) in (True, b"OK")
                with self._lock:
                    self.written += sum(ok[p] for p in batch)
        finally:
            if building is not None:  # never return while a build still reads the chunks
                building.result()

    def _renew(self, client: Any, rkeys: list[bytes]) -> list[Any]:
        """Which keys the server holds (renewing their TTL when there is one)."""
        pipe = client.pipeline(transaction=False)
        for rkey in rkeys:
            if self.ttl_s is None:
                pipe.execute_command("EXISTS", rkey)
            else:
                pipe.execute_command("EXPIRE", rkey, self.ttl_s)
        return list(pipe.execute(raise_on_error=False))

    def _build(
        self, batch: list[int], buffers: list[tuple[bytearray, int]], job: _Write
    ) -> list[memoryview]:
        """The values of ``batch``'s chunks (header, then payload), in ``buffers``."""
        values = []
        for (buf, buf_address), p in zip(buffers, batch, strict=False):
            key, address = job.chunks[p]
            crc = diskio.crc32(address, self.payload_bytes, backend=self.backend)
            pack_value_header(ValueHeader(self.fingerprint, key, self.payload_bytes, crc), buf)
            ctypes.memmove(buf_address + HEADER_BYTES, address, self.payload_bytes)
            values.append(memoryview(buf))
        return values

    def _set(
        self, client: Any, batch: list[int], values: list[memoryview], rkeys: list[bytes]
    ) -> list[Any]:
        pipe = client.pipeline(transaction=False)
        ttl = () if self.ttl_s is None else ("EX", self.ttl_s)
        for p, value in zip(batch, values, strict=True):
            pipe.execute_command("SET", rkeys[p], value, *ttl)
        return list(pipe.execute(raise_on_error=False))

    def _scratch(self, count: int, which: int) -> list[tuple[bytearray, int]]:
        """``count`` value buffers of set ``which`` of this thread (kept: values are built in
        place, and a large one is sent from there without a copy)."""
        sets: list[list[tuple[bytearray, int, Any]]] = self._local.__dict__.setdefault(
            "buffers", [[], []]
        )
        buffers = sets[which]
        while len(buffers) < count:
            buf = bytearray(HEADER_BYTES + self.payload_bytes)
            view = (ctypes.c_char * len(buf)).from_buffer(buf)
            buffers.append((buf, ctypes.addressof(view), view))
        return [(buf, address) for buf, address, _ in buffers[:count]]

    def _read(self, job: _Read) -> None:
        rkeys = [self._prefix + k for k in job.keys]
        ok = [False] * len(rkeys)
        try:
            self._each_server(rkeys, lambda name, pos: self._read_on(name, pos, rkeys, job, ok))
        finally:
            with self._lock:
                self.read_chunks += ok.count(True)
                self.read_failures += ok.count(False)
        job.done(ok)

    def _read_on(
        self, name: str, positions: list[int], rkeys: list[bytes], job: _Read, ok: list[bool]
    ) -> None:
        if not name:
            self._fault("slot", "a key's cluster slot has no node")
            return
        # Batch k's values are checked and copied (the GIL released) on a helper thread while
        # batch k+1 travels.
        checks: list[concurrent.futures.Future[list[bytes]]] = []
        try:
            for start in range(0, len(positions), self._per_pipeline):
                batch = positions[start : start + self._per_pipeline]
                results = self._call(name, functools.partial(self._get, batch=batch, rkeys=rkeys))
                if results is None:
                    break
                checks.append(self._helpers.submit(self._land_all, batch, results, rkeys, job, ok))
        finally:
            damaged = [rkey for check in checks for rkey in check.result()]
        if damaged:
            self._call(name, lambda client: self._delete(client, damaged))

    def _land_all(
        self, batch: list[int], results: list[Any], rkeys: list[bytes], job: _Read, ok: list[bool]
    ) -> list[bytes]:
        """Land one batch's values (see :meth:`_land`); returns the damaged keys."""
        damaged = []
        for p, raw in zip(batch, results, strict=True):
            if isinstance(raw, Exception):
                self._answer(raw)
                continue
            verdict = self._land(job.keys[p], raw, job.addresses[p])
            ok[p] = verdict == "ok"
            if verdict == "damaged":
                damaged.append(rkeys[p])
        return damaged

    def _get(self, client: Any, batch: list[int], rkeys: list[bytes]) -> list[Any]:
        pipe = client.pipeline(transaction=False)
        for p in batch:
            pipe.execute_command("GET", rkeys[p])
            if self.ttl_s is not None:
                pipe.execute_command("EXPIRE", rkeys[p], self.ttl_s)
        results = list(pipe.execute(raise_on_error=False))
        return results if self.ttl_s is None else results[::2]

    @staticmethod
    def _delete(client: Any, rkeys: list[bytes]) -> None:
        pipe = client.pipeline(transaction=False)
        for rkey in rkeys:  # one key per DEL: a cluster refuses keys of several slots
            pipe.execute_command("DEL", rkey)
        pipe.execute(raise_on_error=False)

    def _land(self, key: bytes, raw: Any, address: int) -> str:
        """Check one value, then copy its payload to ``address`` (nothing is written there for
        a value that fails a check): "ok", "miss" or "damaged"."""
        if raw is None:
            self._fault("vanished", "a chunk was gone when read (evicted or expired)")
            return "miss"
        header = unpack_value_header(raw) if isinstance(raw, bytes) else None
        if header is not None and header.ns == self.fingerprint and header.key == key:
            if header.payload != self.payload_bytes:
                self._fault("foreign", "a chunk of another size under this namespace")
                return "miss"
            if len(raw) == HEADER_BYTES + header.payload:
                # The reply's own buffer (c_char_p of a bytes object points into it, no copy);
                # ``raw`` stays referenced, so alive, until the copy is done.
                base = ctypes.cast(ctypes.c_char_p(raw), ctypes.c_void_p).value
                assert base is not None
                payload = base + HEADER_BYTES
                if diskio.crc32(payload, header.payload, backend=self.backend) == header.crc:
                    ctypes.memmove(address, payload, header.payload)
                    return "ok"
        self._fault("damaged", "a damaged chunk (bad header, length or checksum); deleted")
        return "damaged"

    # -- servers, breakers and faults ---------------------------------------------------------

    def _refused(self) -> bool:
        """Whether every server's breaker is open (then there is nobody to ask)."""
        return all(self._breaker(name).is_open() for name in self._servers.names())

    def _breaker(self, name: str) -> CircuitBreaker:
        with self._lock:
            breaker = self._breakers.get(name)
            if breaker is None:
                shown = self.url if self._servers.mode == "standalone" else f"node {name}"
                breaker = self._breakers[name] = CircuitBreaker(shown, logger=_RATE_LIMITED)
            return breaker

    def _call(
        self, name: str, work: Callable[[Any], list[Any] | None], deadline: float | None = None
    ) -> list[Any] | None:
        """``work(client of server name)`` through that server's breaker. None: refused, or
        failed (counted, logged, the breaker told; a cluster's slot map refreshed). An answer
        after ``deadline`` (a lookup's caller stopped waiting) counts as a failure for the
        breaker, so a server that is always too slow is left alone like a dead one."""
        breaker = self._breaker(name)
        if not breaker.allow():
            return None
        try:
            result = work(self._servers.client(name))
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}"
            self._fault(type(exc).__name__, reason)
            breaker.record(False, reason)
            self._servers.refresh()
            return None
        late = deadline is not None and time.monotonic() > deadline
        breaker.record(not late, f"answers after {self.timeout_s * 1e3:g} ms")
        return [] if result is None else result

    def _answer(self, reply: Any) -> Any:
        """A pipeline reply, or None for an error reply (counted; a MOVED refreshes the map)."""
        if not isinstance(reply, Exception):
            return reply
        kind = type(reply).__name__
        self._fault(kind, f"the server answered {kind}: {reply}")
        if kind == "MovedError":
            self._servers.refresh()
        return None

    def _fault(self, kind: str, message: str) -> None:
        with self._lock:
            self.faults += 1
        _RATE_LIMITED.warn(
            f"remote {kind}", f"kvortex: shared tier {self.url}: {message}; served as a miss"
        )

    def _admit(self, key: bytes) -> bool:
        """The write policy (under self._lock)."""
        if self.write == "all":
            return True
        if key in self._seen:
            del self._seen[key]
            return True
        self._seen[key] = None
        if len(self._seen) > _SEEN_MAX:
            self._seen.popitem(last=False)
        return False


def _attempt(work: Callable[[str, list[int]], None], name: str, positions: list[int]) -> None:
    try:
        work(name, positions)
    except Exception:
        log.exception("kvortex: shared tier transfer with %s failed", name or "no node")


def _check_keys(keys: Sequence[bytes]) -> None:
    for key in keys:
        if not isinstance(key, bytes) or len(key) != KEY_BYTES:
            raise InvalidArgumentError(
                f"a chunk key must be {KEY_BYTES} bytes, got {type(key).__name__} of "
                f"{len(key) if isinstance(key, bytes) else '?'}"
            )


def _check_int(name: str, value: object, minimum: int, maximum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgumentError(f"{name} must be an int, got {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        bound = f">= {minimum}" if maximum is None else f"between {minimum} and {maximum}"
        raise InvalidArgumentError(f"{name} must be {bound}, got {value}")
