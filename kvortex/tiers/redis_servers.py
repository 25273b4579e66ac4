"""The shared tier's servers: URLs, credentials, clients, start-up errors, and which server
holds which key.

URLs (``remote_url``)::

    redis://[user[:password]@]host[:port][/db][?tls options]     one server
    rediss://...                                                 one server over TLS
    redis+cluster://[user[:password]@]host[:port]                a Redis Cluster (any node)
    rediss+cluster://...                                         a Redis Cluster over TLS

A plain ``redis://`` URL that names a cluster node is detected (``INFO cluster``) and served
as a cluster. The password comes from the URL or, when the URL has none, from the environment
variable ``KVORTEX_REMOTE_PASSWORD`` (so configuration files carry no secret); the user name
(a Redis ACL user) only from the URL. TLS options are query parameters: ``ssl_ca_certs``,
``ssl_certfile``, ``ssl_keyfile`` (paths), ``ssl_cert_reqs`` (``required``, ``optional``,
``none``) and ``ssl_check_hostname`` (``true``/``false``). Nothing KVortex logs, raises or
reports carries the password: :func:`redacted_url` replaces it with ``***``.

Clients are redis-py's (with hiredis parsing replies when installed), built without retries:
the tier decides what a failure costs. Every socket operation has a timeout, so nothing here
blocks for long: connecting and each answer of a lookup within the tier's timeout, a transfer
within that plus the time a chunk takes at 100 MB/s. Values are sent by redis-py's own Python
command packer, which hands a large value to the socket from its buffer as is; the hiredis
packer would copy each value twice first (measured on a 4 MiB ``SET``: about 0.3 GB/s against
1.4 GB/s on loopback).

Start-up problems raise :class:`RemoteTierError` (also a ``ConnectionError``) naming the
redacted URL and the reason: unreachable, no answer in time, a password required or refused,
a cluster URL for a server that is not one. A malformed URL is a :class:`ConfigError`.
"""

from __future__ import annotations

import functools
import importlib
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit, urlunsplit

from kvortex.errors import ConfigError, KVortexError
from kvortex.tiers.faults import RateLimitedLog

__all__ = [
    "PASSWORD_ENV",
    "Cluster",
    "Connected",
    "Endpoint",
    "RemoteTierError",
    "Servers",
    "Standalone",
    "connect",
    "parse_url",
    "probe",
    "redacted_url",
    "servers_of",
]

PASSWORD_ENV = "KVORTEX_REMOTE_PASSWORD"
_SCHEMES = {  # scheme -> (TLS, cluster)
    "redis": (False, None),
    "rediss": (True, None),
    "redis+cluster": (False, True),
    "rediss+cluster": (True, True),
}
_CERT_REQS = ("required", "optional", "none")
_TLS_OPTIONS = (
    "ssl_ca_certs",
    "ssl_certfile",
    "ssl_keyfile",
    "ssl_cert_reqs",
    "ssl_check_hostname",
)
_RATE_LIMITED = RateLimitedLog()
_TRANSFER_RATE = 100e6  # bytes/s a transfer's socket timeout allows for, on top of the timeout


class RemoteTierError(KVortexError, ConnectionError):
    """The shared tier cannot start: its server is unreachable, refuses the credentials, or is
    not what the URL says. The message names the URL (without its password) and the reason."""


@dataclass(frozen=True)
class Endpoint:
    """A parsed ``remote_url``."""

    host: str
    port: int
    tls: bool
    cluster: bool | None  # True: the scheme says cluster; None: detect
    db: int
    username: str | None
    password: str | None = field(repr=False)
    tls_options: tuple[tuple[str, Any], ...]
    redacted: str


def redacted_url(url: str) -> str:
    """``url`` with its password (and any query value named like one) replaced by ``***``."""
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if "@" in netloc:
            userinfo, _, hostport = netloc.rpartition("@")
            user, has_password, _ = userinfo.partition(":")
            netloc = f"{user}{':***' if has_password else ''}@{hostport}"
        query = "&".join(
            f"{name}=***" if "pass" in name.lower() else item
            for item in parts.query.split("&")
            if item
            for name in [item.partition("=")[0]]
        )
        return urlunsplit((parts.scheme, netloc, parts.path, query, ""))
    except ValueError:
        return "<unparseable URL>"


def parse_url(url: object, *, key: str = "remote_url", cluster: bool | None = None) -> Endpoint:
    """Read a shared-tier URL (see the module docstring); ``cluster`` overrides the scheme.

    Raises:
        ConfigError: not a string, an unknown scheme or query option, no host, a bad port or db.
    """
    if not isinstance(url, str):
        raise ConfigError(f"{key}: expected a redis:// URL, got {type(url).__name__}")
    shown = redacted_url(url)
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"{key}: cannot read {shown!r} as a URL ({exc})") from None
    scheme = parts.scheme.lower()
    if scheme not in _SCHEMES:
        raise ConfigError(
            f"{key}: {shown!r} has scheme {parts.scheme!r}; expected one of "
            f"{', '.join(s + '://' for s in _SCHEMES)}"
        )
    if not parts.hostname:
        raise ConfigError(f"{key}: {shown!r} names no host")
    tls, scheme_cluster = _SCHEMES[scheme]
    if cluster is None:
        cluster = scheme_cluster
    db = _db(key, shown, parts.path)
    if db and cluster:
        raise ConfigError(f"{key}: {shown!r}: a Redis Cluster has only database 0")
    options: list[tuple[str, Any]] = []
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name not in _TLS_OPTIONS:
            raise ConfigError(
                f"{key}: {shown!r}: unknown option {name!r}; valid options: "
                f"{', '.join(_TLS_OPTIONS)}"
            )
        if not tls:
            raise ConfigError(f"{key}: {shown!r}: {name} needs TLS (a rediss:// URL)")
        options.append((name, _tls_option(key, shown, name, value)))
    return Endpoint(
        host=parts.hostname,
        port=port if port is not None else 6379,
        tls=tls,
        cluster=cluster,
        db=db,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
        tls_options=tuple(options),
        redacted=shown,
    )


def _db(key: str, shown: str, path: str) -> int:
    text = path.strip("/")
    if not text:
        return 0
    if not text.isdigit():
        raise ConfigError(f"{key}: {shown!r}: the path must be a database number, got {text!r}")
    return int(text)


def _tls_option(key: str, shown: str, name: str, value: str) -> Any:
    if name == "ssl_check_hostname":
        if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ConfigError(f"{key}: {shown!r}: {name} must be true or false, got {value!r}")
        return value.lower() in ("true", "1", "yes")
    if name == "ssl_cert_reqs" and value.lower() not in _CERT_REQS:
        raise ConfigError(
            f"{key}: {shown!r}: {name} must be one of {', '.join(_CERT_REQS)}, got {value!r}"
        )
    return value.lower() if name == "ssl_cert_reqs" else value


# -- clients --------------------------------------------------------------------------------------


@dataclass
class Connected:
    """What :func:`connect` found: the client, and what ``kvortex info`` shows about it."""

    client: Any  # redis.Redis or redis.cluster.RedisCluster
    cluster: bool
    server: str  # "redis 7.0.15", "valkey 8.0.1"
    replicas: int  # standalone: replicas attached (cluster: see the client's node table)
    ping_ms: float


def connect(ep: Endpoint, timeout_s: float, payload_bytes: int = 0) -> Connected:
    """Connect to ``ep`` and check it answers within ``timeout_s``.

    Raises:
        RemoteTierError: see the module docstring.
    """
    redis = _import_redis(ep)
    password = ep.password or os.environ.get(PASSWORD_ENV) or None
    common: dict[str, Any] = {
        "username": ep.username,
        "password": password,
        "socket_connect_timeout": timeout_s,
        "socket_timeout": timeout_s + payload_bytes / _TRANSFER_RATE,
        "client_name": "kvortex",
    }
    errors = _errors(redis)
    client: Any = None
    try:
        if ep.cluster is not True:
            client = _standalone(redis, ep, common)
            ping_ms = _ping(client)
            if not int(client.info("cluster").get("cluster_enabled", 0)):
                replicas = int(client.info("replication").get("connected_slaves", 0))
                return Connected(client, False, _server(client.info("server")), replicas, ping_ms)
            client.close()
            client = None
            if ep.cluster is False:
                raise RemoteTierError(
                    f"shared tier {ep.redacted}: the server is a Redis Cluster node; use a "
                    "redis+cluster:// URL"
                )
        client = _cluster(redis, ep, common)
        # Any master that answers will do: a cluster with one master down still serves.
        failed: BaseException = redis.exceptions.ConnectionError("the cluster lists no master")
        for node in client.get_primaries():
            try:
                ping_ms = _ping(client.get_redis_connection(node))
                info = client.get_redis_connection(node).info("server")
                return Connected(client, True, _server(info), 0, ping_ms)
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
                failed = exc
        raise failed
    except RemoteTierError:
        raise
    except errors as exc:
        if client is not None:
            client.close()
        reason = _reason(redis, exc, timeout_s, password)
        if password:
            reason = reason.replace(password, "***")
        raise RemoteTierError(f"shared tier {ep.redacted}: {reason}") from exc


def _ping(client: Any) -> float:
    """Milliseconds of one PING round trip (after a first one that connects)."""
    client.ping()
    started = time.perf_counter()
    client.ping()
    return (time.perf_counter() - started) * 1e3


def _import_redis(ep: Endpoint) -> Any:
    try:
        import redis
        import redis.cluster
    except ImportError as exc:
        raise RemoteTierError(
            f"shared tier {ep.redacted}: the redis package is not installed "
            f"(pip install 'kvortex[redis]'): {exc}"
        ) from exc
    return redis


def _errors(redis: Any) -> tuple[type[BaseException], ...]:
    return (redis.exceptions.RedisError, redis.exceptions.RedisClusterException, OSError)


@functools.cache
def _connection_classes() -> tuple[type[Any], type[Any]]:
    """(plain, TLS) redis-py connection classes that send with the Python command packer."""
    # Any: looked up at run time (the names moved across redis-py versions), with a fallback.
    rc: Any = importlib.import_module("redis.connection")
    packer_class = getattr(rc, "PythonRespSerializer", None)
    if packer_class is None:  # a redis-py without pluggable packers: its default
        return rc.Connection, rc.SSLConnection
    packer = packer_class(6000, rc.Encoder("utf-8", "strict", False).encode)

    class Connection(rc.Connection):  # type: ignore[misc]
        def __init__(self, **kwargs: Any) -> None:
            kwargs.setdefault("command_packer", packer)
            super().__init__(**kwargs)

    class SSLConnection(rc.SSLConnection):  # type: ignore[misc]
        def __init__(self, **kwargs: Any) -> None:
            kwargs.setdefault("command_packer", packer)
            super().__init__(**kwargs)

    return Connection, SSLConnection


def _no_retry(redis: Any) -> Any:
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    return Retry(NoBackoff(), 0)


def _standalone(redis: Any, ep: Endpoint, common: dict[str, Any]) -> Any:
    plain, tls = _connection_classes()
    pool = redis.ConnectionPool(
        connection_class=tls if ep.tls else plain,
        host=ep.host,
        port=ep.port,
        db=ep.db,
        retry=_no_retry(redis),
        **common,
        **dict(ep.tls_options),
    )
    return redis.Redis(connection_pool=pool)


def _cluster(redis: Any, ep: Endpoint, common: dict[str, Any]) -> Any:
    # Given a URL, redis-py builds each node's pool from the keyword arguments, connection
    # class included; given host and port it would not take one. The URL holds no secret and
    # always says redis://: TLS comes with the connection class and the ssl_* arguments.
    plain, tls = _connection_classes()
    host = f"[{ep.host}]" if ":" in ep.host else ep.host
    return redis.cluster.RedisCluster(
        url=f"redis://{host}:{ep.port}",
        connection_class=tls if ep.tls else plain,
        require_full_coverage=False,  # serve the slots that have a node; the rest are misses
        retry=_no_retry(redis),
        **common,
        **dict(ep.tls_options),
    )


def _server(info: dict[str, Any]) -> str:
    if "valkey_version" in info:
        return f"valkey {info['valkey_version']}"
    return f"{info.get('server_name', 'redis')} {info.get('redis_version', '?')}"


def _reason(redis: Any, exc: BaseException, timeout_s: float, password: str | None) -> str:
    text = str(exc).strip() or type(exc).__name__
    ex = redis.exceptions
    auth = isinstance(exc, ex.AuthenticationError) or "WRONGPASS" in text or "NOAUTH" in text
    if auth and not password:
        return f"the server requires a password; give it in the URL or in {PASSWORD_ENV} ({text})"
    if auth:
        return f"authentication failed: wrong user name or password ({text})"
    lowered = text.lower()
    if ("cluster" in lowered and "not enabled" in lowered) or "cluster support disabled" in lowered:
        return f"not a Redis Cluster; use a redis:// URL ({text})"
    if isinstance(exc, ex.TimeoutError):
        return f"no answer within {timeout_s * 1e3:g} ms ({text})"
    if isinstance(exc, (ex.ConnectionError, ex.RedisClusterException, OSError)):
        return f"unreachable ({text})"
    return f"{type(exc).__name__}: {text}"


# -- routing keys to servers ----------------------------------------------------------------


class Standalone:
    """One server: every key goes to it."""

    mode = "standalone"

    def __init__(self, conn: Connected) -> None:
        self._conn = conn
        self.name = "server"

    def route(self, rkeys: Sequence[bytes]) -> dict[str, list[int]]:
        return {self.name: list(range(len(rkeys)))}

    def client(self, name: str) -> Any:
        return self._conn.client

    def masters(self) -> int:
        return 1

    def names(self) -> list[str]:
        return [self.name]

    def shape(self) -> dict[str, int]:
        return {"masters": 1, "replicas": self._conn.replicas}

    def refresh(self) -> None:
        pass

    def close(self) -> None:
        self._conn.client.close()


class Cluster:
    """A Redis Cluster: keys go to their slot's master, as redis-py's slot map says. Keys are
    grouped per master here rather than by redis-py's cluster pipeline, which fails a whole
    batch when one master is unreachable and retries failed commands one at a time."""

    mode = "cluster"
    _REFRESH_EVERY_S = 0.5

    def __init__(self, client: Any, url: str) -> None:
        self._rc = client
        self._url = url
        self._refresh_lock = threading.Lock()
        self._refreshed = float("-inf")

    def route(self, rkeys: Sequence[bytes]) -> dict[str, list[int]]:
        groups: dict[str, list[int]] = {}
        for i, rkey in enumerate(rkeys):
            try:
                name = self._rc.get_node_from_key(rkey).name
            except Exception:  # no node serves the slot (SlotNotCoveredError): a miss
                name = ""
            groups.setdefault(name, []).append(i)
        return groups

    def client(self, name: str) -> Any:
        node = self._rc.get_node(node_name=name)
        if node is None:
            raise ConnectionError(f"cluster node {name} left the slot map")
        return self._rc.get_redis_connection(node)

    def masters(self) -> int:
        return max(1, len(self._rc.get_primaries()))

    def names(self) -> list[str]:
        return [node.name for node in self._rc.get_primaries()]

    def shape(self) -> dict[str, int]:
        return {"masters": len(self._rc.get_primaries()), "replicas": len(self._rc.get_replicas())}

    def refresh(self) -> None:
        """Reread the slot map (at most every 0.5 s; a failing read is tried again later)."""
        if not self._refresh_lock.acquire(blocking=False):
            return  # another thread is at it
        try:
            if time.monotonic() - self._refreshed < self._REFRESH_EVERY_S:
                return
            self._refreshed = time.monotonic()
            self._rc.nodes_manager.initialize()
        except Exception as exc:
            _RATE_LIMITED.warn(
                "remote slot map",
                f"kvortex: shared tier {self._url}: slot map refresh failed: {exc}",
            )
        finally:
            self._refresh_lock.release()

    def close(self) -> None:
        self._rc.close()


Servers = Standalone | Cluster


def probe(url: str, *, timeout_ms: int = 1000, cluster: bool | None = None) -> dict[str, Any]:
    """What ``kvortex info`` shows about a configured shared tier: connect with ``timeout_ms``,
    report reachable, server version, mode and cluster shape. Never raises."""
    report: dict[str, Any] = {"url": redacted_url(url), "reachable": False}
    try:
        endpoint = parse_url(url, cluster=cluster)
        conn = connect(endpoint, timeout_ms / 1e3)
    except Exception as exc:
        report["problem"] = str(exc)
        return report
    try:
        servers = servers_of(conn, endpoint.redacted)
        report.update(
            reachable=True,
            mode=servers.mode,
            server=conn.server,
            ping_ms=round(conn.ping_ms, 3),
            **servers.shape(),
        )
    except Exception as exc:
        report["problem"] = str(exc)
    finally:
        conn.client.close()
    return report


def servers_of(conn: Connected, url: str) -> Servers:
    """The routing of a connected client."""
    return Cluster(conn.client, url) if conn.cluster else Standalone(conn)
