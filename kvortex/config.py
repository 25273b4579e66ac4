"""KVortex configuration: one frozen, typed dataclass built once at the boundary.

Three sources, one set of keys (flat, documented in ``docs/config.md``):

- :meth:`KVortexConfig.from_dict` — what vLLM's ``kv_connector_extra_config`` passes;
- :meth:`KVortexConfig.from_yaml` — a YAML file holding one mapping of the same keys;
- :meth:`KVortexConfig.from_env` — ``KVORTEX_<KEY>`` environment variables.

Unknown keys and values of the wrong type or range raise :class:`ConfigError`, which names the
key and lists the valid ones. Sizes accept human units (``"8GiB"``, ``"512 MB"``) or plain ints.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from kvortex.errors import ConfigError

__all__ = ["ENV_PREFIX", "KVortexConfig", "parse_size"]

ENV_PREFIX = "KVORTEX_"
# KVORTEX_* variables that are process switches, not configuration keys.
_ENV_NOT_KEYS = frozenset({"KVORTEX_REQUIRE_NATIVE", "KVORTEX_CONFIG"})

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
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(value: object, *, key: str = "size") -> int:
    """Bytes from an int or a string with a unit (B, KB, MB, GB, TB, KiB, MiB, GiB, TiB).

    >>> parse_size("8GiB")
    8589934592
    """
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected a size such as 8GiB or an int, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(f"{key}: a size cannot be negative, got {value}")
        return value
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        unit = m.group(2).lower() if m else None
        if m is None or unit not in _UNITS:
            raise ConfigError(
                f"{key}: cannot read {value!r} as a size; expected a number with one of the "
                f"units {', '.join(u for u in _UNITS if u)} (e.g. '8GiB')"
            )
        number = float(m.group(1)) * _UNITS[unit]
        if not math.isfinite(number) or number != int(number):
            raise ConfigError(f"{key}: {value!r} is not a whole number of bytes")
        return int(number)
    raise ConfigError(f"{key}: expected a size such as 8GiB or an int, got {type(value).__name__}")


def _int(minimum: int) -> Callable[[str, object], int]:
    def parse(key: str, value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an int, got {value!r}")
        if value < minimum:
            raise ConfigError(f"{key}: must be >= {minimum}, got {value}")
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
            raise ConfigError(f"{key}: expected one of {', '.join(choices)}, got {value!r}")
        return value.strip().lower()

    return parse


def _size(key: str, value: object) -> int:
    return parse_size(value, key=key)


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
    raise ConfigError(f"{key}: expected 'auto', true or false, got {value!r}")


def _salt(key: str, value: object) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{key}: expected a string, got {type(value).__name__}")
    return value


def _int_text(key: str, text: str) -> object:
    """Environment values are text: read an int where the key wants one."""
    stripped = text.strip()
    if stripped.lower() in ("", "none"):
        return None
    try:
        return int(stripped)
    except ValueError:
        raise ConfigError(f"{key}: expected an int, got {text!r}") from None


def _key(
    default: Any,
    parse: Callable[[str, object], Any],
    doc: str,
    text: Callable[[str, str], object] | None = None,
) -> Any:
    return field(default=default, metadata={"parse": parse, "doc": doc, "text": text})


@dataclass(frozen=True)
class KVortexConfig:
    """Every KVortex setting, validated. Build it with one of the ``from_*`` constructors."""

    chunk_tokens: int = _key(
        256,
        _int(1),
        "Tokens per stored chunk; a multiple of the engine's KV block size. Only full chunks "
        "are stored.",
        _int_text,
    )
    cpu_bytes: int = _key(
        parse_size("4GiB"), _size, "Size of the pinned host-memory tier (L1), e.g. '32GiB'."
    )
    eviction: str = _key(
        "lru",
        _choice("lru", "s3fifo"),
        "Eviction policy of the host tier: 'lru', or 's3fifo' (scan resistant: a burst of "
        "one-off prompts does not flush the hot set).",
    )
    async_load_min_tokens: int = _key(
        4096,
        _int(1),
        "vLLM: loads of at least this many tokens run asynchronously (the request waits in "
        "WAITING_FOR_REMOTE_KVS while other requests run); shorter ones finish inside the step. "
        "4096 tokens of an 8B model are 512 MiB, about 10 ms at the measured 52 GB/s.",
        _int_text,
    )
    backend: str = _key(
        "auto",
        _choice("auto", "native", "python"),
        "Hot-path implementations: 'auto' (native when built, else Python), 'native' (fail "
        "if not built) or 'python'.",
    )
    hash_algo: str = _key("sha256", _choice("sha256"), "Chunk-key hash function.")
    numa_node: int | None = _key(
        None,
        _optional_int(0),
        "NUMA node to bind the host pool to; none means no binding.",
        _int_text,
    )
    hugepages: bool | Literal["auto"] = _key(
        "auto",
        _tristate,
        "Transparent huge pages for the host pool: 'auto' (use when available), true "
        "(required) or false.",
    )
    tenant_salt: str = _key(
        "",
        _salt,
        "Mixed into every chunk key: tenants with different salts never share cached prefixes.",
    )

    @classmethod
    def key_names(cls) -> tuple[str, ...]:
        """The valid configuration keys, in documentation order."""
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def describe(cls) -> list[tuple[str, Any, str]]:
        """``(key, default, doc)`` for every key (``docs/config.md`` is generated from this)."""
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
        fields = {f.name: f for f in dataclasses.fields(cls)}
        parsed: dict[str, Any] = {}
        for key, value in values.items():
            if key not in fields:
                raise ConfigError(
                    f"unknown configuration key {key!r}; valid keys: {', '.join(fields)}"
                )
            parsed[key] = fields[key].metadata["parse"](key, value)
        return cls(**parsed)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str]) -> KVortexConfig:
        """Build from a YAML file whose top level is a mapping of configuration keys."""
        import yaml  # imported here: only YAML users pay for it

        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read configuration file {str(path)!r}: {exc}") from exc
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{str(path)!r} is not valid YAML: {exc}") from exc
        return cls.from_dict({} if data is None else data)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> KVortexConfig:
        """Build from ``KVORTEX_<KEY>`` variables (e.g. ``KVORTEX_CPU_BYTES=16GiB``)."""
        env = os.environ if environ is None else environ
        fields = {ENV_PREFIX + f.name.upper(): f for f in dataclasses.fields(cls)}
        values: dict[str, object] = {}
        for name, value in env.items():
            if not name.startswith(ENV_PREFIX) or name in _ENV_NOT_KEYS:
                continue
            if name not in fields:
                raise ConfigError(
                    f"unknown environment variable {name}; valid ones: {', '.join(fields)}"
                )
            f = fields[name]
            text = f.metadata["text"]
            values[f.name] = text(name, value) if text is not None else value
        return cls.from_dict(values)

    def replace(self, **changes: Any) -> KVortexConfig:
        """A copy with ``changes`` applied, validated like :meth:`from_dict`."""
        merged = {**self.to_dict(), **changes}
        return type(self).from_dict(merged)

    def to_dict(self) -> dict[str, Any]:
        """The configuration as a plain dict (round-trips through :meth:`from_dict`)."""
        return dataclasses.asdict(self)
