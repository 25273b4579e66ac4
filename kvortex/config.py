"""KVortex configuration: one frozen, typed dataclass built once at the boundary.

Three sources, one set of keys (flat, documented in ``docs/config.md``):

- :meth:`KVortexConfig.from_dict` — what vLLM's ``kv_connector_extra_config`` passes;
- :meth:`KVortexConfig.from_yaml` — a YAML file holding one mapping of the same keys;
- :meth:`KVortexConfig.from_env` — ``KVORTEX_<KEY>`` environment variables.

Unknown keys and values of the wrong type or range raise :class:`ConfigError`, which names the
key and lists the valid ones. Sizes accept human units (``"8GiB"``, ``"512 MB"``) or plain ints.
``KVORTEX_*`` variables that are not keys are refused as typos unless they are one of the
project's documented :data:`PROCESS_SWITCHES`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal

from kvortex.backend import BACKENDS
from kvortex.errors import ConfigError

__all__ = ["ENV_PREFIX", "PROCESS_SWITCHES", "KVortexConfig", "parse_size"]

ENV_PREFIX = "KVORTEX_"

# KVORTEX_* variables the project reads outside the configuration: from_env skips them instead
# of calling them typos. docs/config.md's "Process switches" table lists exactly these
# (tests/test_config.py checks), so a new switch is added here and there together.
PROCESS_SWITCHES: dict[str, str] = {
    "KVORTEX_BACKEND": (
        "Process default backend (`auto`, `native`, `python`) of every hot path whose backend "
        "is `inherit`/`None` (`hash_chunks`, `SPSCQueue`, `HostSlabPool`, the engine); "
        "`from_env` also reads it as the `backend` key."
    ),
    "KVORTEX_DMA_LANES": (
        "`1`..`4`: caps the DMA copy lanes of the CUDA copy engine (default 4; a tuning and "
        "diagnostic knob, read once per process)."
    ),
    "KVORTEX_REQUIRE_NATIVE": (
        "`1`: the test suite fails instead of skipping when the native core or the CUDA copy "
        "engine did not build; CI sets it."
    ),
    "KVORTEX_REMOTE_PASSWORD": (
        "Password of the shared tier when `remote_url` carries none (the user name, if any, "
        "stays in the URL): configuration files then hold no secret. Never logged; `kvortex "
        "info` shows `***`."
    ),
    "KVORTEX_REQUIRE_REDIS": (
        "`1`: the shared-tier tests fail instead of skipping when `redis-server` or the "
        "`redis` package is missing; CI sets it."
    ),
    "KVORTEX_REQUIRE_VLLM": (
        "`1`: the vLLM connector tests fail instead of skipping when `vllm` cannot be imported "
        "(`scripts/test-vllm.sh` sets it)."
    ),
    "KVORTEX_TESTS_ONLY": (
        "`1`: `bench/gpu_session.sh` runs the GPU tests and stops before the benchmarks."
    ),
    "KVORTEX_TEST_TORCH": "The torch version `scripts/test.sh` installs into its environment.",
    "KVORTEX_TEST_VENV": "The virtual environment `scripts/test.sh` uses (default `.venv-test`).",
    "KVORTEX_VLLM_VENV_DIR": (
        "Directory of the per-version vLLM environments of `scripts/test-vllm.sh` (default "
        "`.venv-vllm`)."
    ),
    "KVORTEX_VLLM_VERSIONS": (
        "Space-separated vLLM versions `scripts/test.sh` tests the connector against; empty "
        "skips them."
    ),
}

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE_RE = re.compile(r"^\s*([+-]?)([0-9]+)(?:\.([0-9]+))?\s*([a-zA-Z]*)\s*$")


def _shown(value: object) -> str:
    """``repr`` for a message, kept short; an int too long to print is described instead."""
    if isinstance(value, int) and value.bit_length() > 128:
        return f"an int of {value.bit_length()} bits"
    text = repr(value)
    return text if len(text) <= 100 else f"{text[:100]}... ({len(text)} characters)"


def parse_size(value: object, *, key: str = "size") -> int:
    """Bytes from an int or a string with a unit (B, KB, MB, GB, TB, KiB, MiB, GiB, TiB).

    Exact: the number is read as a fraction, never a float, so ``"9007199254740993"`` stays
    that integer and ``"1.5KiB"`` is 1536; a value that is not a whole number of bytes is
    refused.

    >>> parse_size("8GiB")
    8589934592
    """
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected a size such as 8GiB or an int, got {_shown(value)}")
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(f"{key}: a size cannot be negative, got {_shown(value)}")
        return value
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        unit = m.group(4).lower() if m else None
        if m is None or unit not in _UNITS:
            raise ConfigError(
                f"{key}: cannot read {_shown(value)} as a size; expected a number with one of the "
                f"units {', '.join(u for u in _UNITS if u)} (e.g. '8GiB')"
            )
        sign, whole, decimals = m.group(1), m.group(2), m.group(3) or ""
        try:
            number = Fraction(int(whole + decimals), 10 ** len(decimals)) * _UNITS[unit]
        except ValueError:  # int() refuses more digits than sys.get_int_max_str_digits()
            raise ConfigError(f"{key}: {_shown(value)} has too many digits for a size") from None
        if sign == "-" and number:
            raise ConfigError(f"{key}: a size cannot be negative, got {_shown(value)}")
        if number.denominator != 1:
            raise ConfigError(f"{key}: {_shown(value)} is not a whole number of bytes")
        return int(number)
    raise ConfigError(f"{key}: expected a size such as 8GiB or an int, got {type(value).__name__}")


def _int(minimum: int, maximum: int | None = None, why: str = "") -> Callable[[str, object], int]:
    def parse(key: str, value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an int, got {_shown(value)}")
        if value < minimum or (maximum is not None and value > maximum):
            bound = f">= {minimum}" if maximum is None else f"between {minimum} and {maximum}"
            raise ConfigError(f"{key}: must be {bound}, got {_shown(value)}{why}")
        return value

    return parse


def _optional_int(minimum: int) -> Callable[[str, object], int | None]:
    parse_int = _int(minimum)

    def parse(key: str, value: object) -> int | None:
        if value is None:
            return None
        return parse_int(key, value)

    return parse


def _choice(*choices: str) -> Callable[[str, object], str]:
    def parse(key: str, value: object) -> str:
        if not isinstance(value, str) or value.strip().lower() not in choices:
            raise ConfigError(f"{key}: expected one of {', '.join(choices)}, got {_shown(value)}")
        return value.strip().lower()

    return parse


def _backend(key: str, value: object) -> str | None:
    # None ("inherit") defers to the process default at each use: KVORTEX_BACKEND, else auto.
    if value is None:
        return None
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered == "inherit":
            return None
        if lowered in BACKENDS:
            return lowered
    raise ConfigError(
        f"{key}: expected inherit (or None), {', '.join(BACKENDS)}, got {_shown(value)}"
    )


def _physical_memory() -> int | None:
    """Bytes of RAM in this machine, or None where the platform does not say."""
    try:
        pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):  # no sysconf, or no such name here
        return None
    return pages * page_size if pages > 0 and page_size > 0 else None


def _gib(size: int) -> str:
    if size.bit_length() > 128:  # beyond a float, and beyond any machine
        return f"2**{size.bit_length() - 1} bytes or more"
    return f"{size / 2**30:.1f} GiB"


def _host_bytes(key: str, value: object) -> int:
    size = parse_size(value, key=key)
    if size == 0:
        raise ConfigError(f"{key}: the host tier needs more than 0 bytes, got {_shown(value)}")
    # Pinned host memory cannot be swapped: a tier larger than the machine can never be built.
    physical = _physical_memory()
    if physical is not None and size > physical:
        raise ConfigError(
            f"{key}: {_shown(value)} ({_gib(size)}) is more than this machine's physical memory "
            f"({_gib(physical)})"
        )
    return size


def _seconds(key: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{key}: expected a number of seconds, got {_shown(value)}")
    try:
        seconds = float(value)
    except OverflowError:  # an int too large for a float
        raise ConfigError(f"{key}: {_shown(value)} seconds is out of range") from None
    if not math.isfinite(seconds) or seconds < 0:
        raise ConfigError(f"{key}: expected a finite number of seconds >= 0, got {_shown(value)}")
    return seconds


def _tristate(key: str, value: object) -> bool | Literal["auto"]:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered == "auto":
            return "auto"
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
    raise ConfigError(f"{key}: expected 'auto', true or false, got {_shown(value)}")


def _salt(key: str, value: object) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{key}: expected a string, got {type(value).__name__}")
    return value


def _optional_path(key: str, value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str):
        raise ConfigError(f"{key}: expected a directory path, got {type(value).__name__}")
    if not value.strip():
        return None
    if "\0" in value:
        raise ConfigError(f"{key}: the path holds a NUL byte")
    return value


def _disk_size(key: str, value: object) -> int:
    size = parse_size(value, key=key)
    if size < 64 * 2**20:
        raise ConfigError(
            f"{key}: {_shown(value)} is too small for a disk tier; give it at least 64MiB"
        )
    return size


def _remote_url(key: str, value: object) -> str | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    from kvortex.tiers.redis_servers import parse_url  # no redis import: the URL is only read

    parse_url(value, key=key)
    assert isinstance(value, str)
    return value.strip()


def _path_text(key: str, text: str) -> object:
    return None if text.strip().lower() in ("", "none") else text


def _int_text(key: str, text: str) -> object:
    """Environment values are text: read an int where the key wants one."""
    stripped = text.strip()
    if stripped.lower() in ("", "none"):
        return None
    try:
        return int(stripped)
    except ValueError:
        raise ConfigError(f"{key}: expected an int, got {_shown(text)}") from None


def _float_text(key: str, text: str) -> object:
    try:
        return float(text.strip())
    except ValueError:
        raise ConfigError(f"{key}: expected a number, got {_shown(text)}") from None


def _backend_text(key: str, text: str) -> object:
    # An empty KVORTEX_BACKEND means auto to backend.default_backend(); inheriting says the same.
    return None if text.strip().lower() in ("", "none") else text


def _key(
    default: Any,
    parse: Callable[[str, object], Any],
    doc: str,
    text: Callable[[str, str], object] | None = None,
) -> Any:
    return field(default=default, metadata={"parse": parse, "doc": doc, "text": text})


_MAX_CHUNK_TOKENS = 65536


def _unknown_key(key: object, valid: tuple[str, ...]) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=1) if isinstance(key, str) else []
    hint = f"did you mean {close[0]!r}? " if close else ""
    return ConfigError(
        f"unknown configuration key {_shown(key)}; {hint}valid keys: {', '.join(valid)}"
    )


def _unknown_variable(name: str, variables: tuple[str, ...]) -> ConfigError:
    known = tuple(dict.fromkeys((*variables, *PROCESS_SWITCHES)))
    # Match without the shared prefix: against it every KVORTEX_ name looks "close".
    close = difflib.get_close_matches(
        name[len(ENV_PREFIX) :], [k[len(ENV_PREFIX) :] for k in known], n=1
    )
    hint = f"did you mean {ENV_PREFIX}{close[0]}? " if close else ""
    switches = [s for s in PROCESS_SWITCHES if s not in variables]
    return ConfigError(
        f"unknown environment variable {name}; {hint}configuration variables: "
        f"{', '.join(variables)}; other KVORTEX_ switches: {', '.join(switches)} (docs/config.md)"
    )


@dataclass(frozen=True)
class KVortexConfig:
    """Every KVortex setting, validated. Build it with one of the ``from_*`` constructors.

    The field ``doc`` texts are the "meaning" column of ``docs/config.md`` (Markdown).
    """

    chunk_tokens: int = _key(
        256,
        _int(
            1,
            _MAX_CHUNK_TOKENS,
            " (a chunk is one host-pool slot: 65536 tokens of an 8B model are already 8 GiB)",
        ),
        "Tokens per stored chunk, 1 to 65536 (a chunk is one host-pool slot: 65536 tokens of an "
        "8B model are already 8 GiB); a multiple of the engine's KV block size. Only full chunks "
        "are stored.",
        _int_text,
    )
    cpu_bytes: int = _key(
        parse_size("4GiB"),
        _host_bytes,
        "Size of the pinned host-memory tier (L1), e.g. `32GiB`; more than 0 and at most the "
        "machine's physical memory.",
    )
    eviction: str = _key(
        "lru",
        _choice("lru", "s3fifo"),
        "Eviction policy of the host tier: `lru`, or `s3fifo` (scan resistant: a burst of "
        "one-off prompts does not flush the hot set).",
    )
    async_load_min_tokens: int = _key(
        4096,
        _int(1),
        "vLLM: loads of at least this many tokens run asynchronously (the request waits in "
        "`WAITING_FOR_REMOTE_KVS` while other requests run); shorter ones finish inside the "
        "step. 4096 tokens of an 8B model are 512 MiB, about 10 ms at the measured 52 GB/s "
        "(H200).",
        _int_text,
    )
    backend: str | None = _key(
        None,
        _backend,
        "Hot-path implementations: `inherit` (or `None`: the process default, `KVORTEX_BACKEND`, "
        "else `auto`), `auto` (native when built, else Python), `native` (fail if not built) or "
        "`python`.",
        _backend_text,
    )
    hash_algo: str = _key(
        "sha256",
        _choice("sha256"),
        "Chunk-key hash function (SHA-256 is the only one offered: keys must be collision "
        "resistant across tenants).",
    )
    numa_node: int | None = _key(
        None,
        _optional_int(0),
        "NUMA node to bind the host pool to; none means no binding.",
        _int_text,
    )
    hugepages: bool | Literal["auto"] = _key(
        "auto",
        _tristate,
        "Transparent huge pages for the host pool: `auto` (use when available), `true` "
        "(required) or `false`.",
    )
    tenant_salt: str = _key(
        "",
        _salt,
        "Mixed into every chunk key: tenants with different salts never share cached prefixes.",
    )
    disk_path: str | None = _key(
        None,
        _optional_path,
        "Directory of the local disk tier (L2); none (the default) means no disk tier. Chunks "
        "in host memory are also written here (write-through, see `disk_admission`) and "
        "survive a restart; one process owns the directory at a time (under vLLM each "
        "tensor-parallel rank uses a subdirectory `tp<rank>of<size>`).",
        _path_text,
    )
    disk_bytes: int = _key(
        parse_size("64GiB"),
        _disk_size,
        "Capacity of the disk tier, e.g. `500GiB` (at least `64MiB`); the oldest segment files "
        "are deleted to stay within it.",
    )
    disk_admission: str = _key(
        "seen-twice",
        _choice("all", "seen-twice"),
        "Which chunks the disk tier writes: `seen-twice` (a chunk on its second use, stored or "
        "hit: one-off prompts cost no disk writes; on the multi-tenant trace 7-15 % of the "
        "bytes of `all` for an equal or better hit ratio, docs/PERF.md) or `all` (every "
        "stored chunk).",
    )
    remote_url: str | None = _key(
        None,
        _remote_url,
        "Shared tier (L3) on Redis or Valkey; none (the default) means no shared tier. "
        "`redis://host:6379/0`, `rediss://` (TLS), `redis+cluster://` or `rediss+cluster://` "
        "(a Redis Cluster, any node; a `redis://` URL of a cluster node is detected). Keep the "
        "password out of the URL: `redis://user@host` takes it from `KVORTEX_REMOTE_PASSWORD`; "
        "logs and `kvortex info` never show it. TLS options as query parameters: "
        "`ssl_ca_certs`, `ssl_certfile`, `ssl_keyfile`, `ssl_cert_reqs`, `ssl_check_hostname`.",
        _path_text,
    )
    remote_timeout_ms: int = _key(
        200,
        _int(1, 60000),
        "Time budget of one shared-tier lookup, and the connect timeout, in milliseconds (1 to "
        "60000): a lookup that takes longer is a miss. A server that fails 3 times in a row "
        "is not contacted for 0.5 s, doubling up to 30 s (its chunks are misses meanwhile).",
        _int_text,
    )
    remote_write: str = _key(
        "seen-twice",
        _choice("all", "seen-twice", "none"),
        "Which chunks are written to the shared tier: `seen-twice` (a chunk the second time "
        "this process offers it: hot prefixes such as system prompts reach every instance, "
        "one-off prompts cost no network and no server memory, and a 4096-token prompt of an "
        "8B model is 512 MiB), `all` (every chunk) or `none` (read only: use what other "
        "processes wrote). A chunk the server already holds is never sent again.",
    )
    remote_ttl_s: int | None = _key(
        None,
        _optional_int(1),
        "Expiry of shared-tier chunks in seconds, renewed when a chunk is read or offered "
        "again; none (the default) leaves forgetting to the server (run it with `maxmemory` "
        "and `maxmemory-policy allkeys-lru`).",
        _int_text,
    )
    log_interval_s: float = _key(
        10.0,
        _seconds,
        "Seconds between the INFO log line with lookups, hit tokens and bytes moved (vLLM "
        "connector and engine); 0 turns it off.",
        _float_text,
    )

    def __post_init__(self) -> None:
        # However it was built (constructor, from_*, replace, dataclasses.replace), every value
        # is checked here and normalised in place ("8GiB" -> bytes, "inherit" -> None).
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, f.metadata["parse"](f.name, getattr(self, f.name)))

    @classmethod
    def key_names(cls) -> tuple[str, ...]:
        """The valid configuration keys, in documentation order."""
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def describe(cls) -> list[tuple[str, Any, str]]:
        """``(key, default, doc)`` for every key (``docs/config.md``'s key table follows this)."""
        return [(f.name, f.default, f.metadata["doc"]) for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None) -> KVortexConfig:
        """Build from a flat mapping of keys to values; unknown keys raise :class:`ConfigError`."""
        if values is None:
            return cls()
        if not isinstance(values, Mapping):
            raise ConfigError(
                f"configuration must be a mapping of keys to values, got {type(values).__name__}"
            )
        valid = cls.key_names()
        for key in values:
            if key not in valid:
                raise _unknown_key(key, valid)
        return cls(**values)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str]) -> KVortexConfig:
        """Build from a UTF-8 YAML file whose top level is a mapping of configuration keys."""
        import yaml  # imported here: only YAML users pay for it

        if not isinstance(path, (str, os.PathLike)):
            raise ConfigError(
                f"configuration file: expected a path (str or os.PathLike), got "
                f"{type(path).__name__}"
            )
        fspath = os.fspath(path)
        if not isinstance(fspath, str):  # an os.PathLike that gives bytes
            raise ConfigError(f"configuration file: expected a str path, got {fspath!r}")
        if not fspath:  # Path("") would be the current directory
            raise ConfigError("configuration file: the path is empty")
        file, shown = Path(fspath), repr(fspath)
        try:
            raw = file.read_bytes()
        except OSError as exc:
            raise ConfigError(
                f"cannot read configuration file {shown}: {exc.strerror or exc}"
            ) from exc
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise ConfigError(
                f"configuration file {shown} is not UTF-8 text (byte {exc.start}: {exc.reason})"
            ) from None
        try:
            data = yaml.safe_load(text)
        # ValueError: e.g. an impossible date; RecursionError: absurdly deep nesting.
        except (yaml.YAMLError, ValueError, RecursionError) as exc:
            raise ConfigError(f"configuration file {shown} is not valid YAML: {exc}") from None
        if data is None:  # an empty file: the defaults
            data = {}
        if not isinstance(data, Mapping):
            raise ConfigError(
                f"configuration file {shown}: the top level must be a mapping of configuration "
                f"keys, got {type(data).__name__}"
            )
        try:
            return cls.from_dict(data)
        except ConfigError as exc:
            raise ConfigError(f"configuration file {shown}: {exc}") from None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> KVortexConfig:
        """Build from ``KVORTEX_<KEY>`` variables (e.g. ``KVORTEX_CPU_BYTES=16GiB``).

        The project's other switches (:data:`PROCESS_SWITCHES`) are skipped; any other
        ``KVORTEX_*`` variable is taken for a misspelled key and refused.
        """
        env = os.environ if environ is None else environ
        if not isinstance(env, Mapping):
            raise ConfigError(
                f"environment: expected a mapping of variable names to text, got "
                f"{type(env).__name__}"
            )
        fields = {ENV_PREFIX + f.name.upper(): f for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for name, value in env.items():
            if not isinstance(name, str):
                raise ConfigError(f"environment: variable names must be str, got {_shown(name)}")
            if not name.startswith(ENV_PREFIX):
                continue
            if name not in fields:
                if name in PROCESS_SWITCHES:
                    continue
                raise _unknown_variable(name, tuple(fields))
            if not isinstance(value, str):
                raise ConfigError(f"{name}: expected text, got {type(value).__name__}")
            # Parsed here, under the variable's name, so an error names what the user set.
            f = fields[name]
            text = f.metadata["text"]
            values[f.name] = f.metadata["parse"](name, text(name, value) if text else value)
        return cls(**values)

    def replace(self, **changes: Any) -> KVortexConfig:
        """A copy with ``changes`` applied, validated like :meth:`from_dict`."""
        merged = {**self.to_dict(), **changes}
        return type(self).from_dict(merged)

    def to_dict(self) -> dict[str, Any]:
        """The configuration as a plain dict (round-trips through :meth:`from_dict`)."""
        return dataclasses.asdict(self)

    def redacted(self) -> dict[str, Any]:
        """:meth:`to_dict` for reports and logs: a password in ``remote_url`` shown as ``***``."""
        shown = self.to_dict()
        if self.remote_url is not None:
            from kvortex.tiers.redis_servers import redacted_url

            shown["remote_url"] = redacted_url(self.remote_url)
        return shown

    def __repr__(self) -> str:  # dataclass keeps this one: a repr never shows a password
        fields = ", ".join(f"{key}={value!r}" for key, value in self.redacted().items())
        return f"{type(self).__name__}({fields})"
