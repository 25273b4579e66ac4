from __future__ import annotations

from pathlib import Path

import pytest

from kvortex.config import KVortexConfig, parse_size
from kvortex.errors import ConfigError, InvalidArgumentError


def test_defaults() -> None:
    cfg = KVortexConfig()
    assert cfg.chunk_tokens == 256
    assert cfg.cpu_bytes == 4 * 2**30
    assert cfg.backend == "auto"
    assert KVortexConfig.from_dict(None) == cfg
    assert KVortexConfig.from_dict({}) == cfg


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (0, 0),
        (4096, 4096),
        ("4096", 4096),
        ("8GiB", 8 * 2**30),
        ("8 gib", 8 * 2**30),
        ("1.5GiB", 3 * 2**29),
        ("512MB", 512 * 10**6),
        ("2TiB", 2 * 2**40),
        ("10b", 10),
    ],
)
def test_parse_size(text: object, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["", "GiB", "-1GiB", "1.3B", "8 parsecs", -5, True, 1.5, None])
def test_parse_size_rejects(bad: object) -> None:
    with pytest.raises(ConfigError):
        parse_size(bad)


def test_from_dict_values_and_frozen() -> None:
    cfg = KVortexConfig.from_dict(
        {"chunk_tokens": 512, "cpu_bytes": "16GiB", "numa_node": 0, "hugepages": False}
    )
    assert (cfg.chunk_tokens, cfg.cpu_bytes, cfg.numa_node, cfg.hugepages) == (
        512,
        16 * 2**30,
        0,
        False,
    )
    with pytest.raises(AttributeError):
        cfg.chunk_tokens = 1  # type: ignore[misc]


def test_unknown_key_names_it_and_lists_valid_keys() -> None:
    with pytest.raises(ConfigError) as info:
        KVortexConfig.from_dict({"chunk_token": 256})
    message = str(info.value)
    assert "'chunk_token'" in message
    for key in KVortexConfig.key_names():
        assert key in message
    assert isinstance(info.value, InvalidArgumentError)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("chunk_tokens", "256"),
        ("chunk_tokens", 0),
        ("chunk_tokens", True),
        ("chunk_tokens", 2.0),
        ("cpu_bytes", "lots"),
        ("backend", "fast"),
        ("hash_algo", "md5"),
        ("numa_node", -1),
        ("hugepages", "sometimes"),
        ("tenant_salt", 7),
    ],
)
def test_wrong_type_or_range_names_the_key(key: str, value: object) -> None:
    with pytest.raises(ConfigError, match=key):
        KVortexConfig.from_dict({key: value})


def test_not_a_mapping() -> None:
    with pytest.raises(ConfigError, match="mapping"):
        KVortexConfig.from_dict([("chunk_tokens", 1)])  # type: ignore[arg-type]


def test_from_env() -> None:
    env = {
        "KVORTEX_CHUNK_TOKENS": "512",
        "KVORTEX_CPU_BYTES": "1GiB",
        "KVORTEX_NUMA_NODE": "none",
        "KVORTEX_HUGEPAGES": "off",
        "KVORTEX_REQUIRE_NATIVE": "1",  # a process switch, not a key: ignored
        "PATH": "/bin",
    }
    cfg = KVortexConfig.from_env(env)
    assert (cfg.chunk_tokens, cfg.cpu_bytes, cfg.numa_node, cfg.hugepages) == (
        512,
        2**30,
        None,
        False,
    )


def test_from_env_rejects_typos_and_bad_ints() -> None:
    with pytest.raises(ConfigError, match=r"KVORTEX_CHUNK_TOKEN\b"):
        KVortexConfig.from_env({"KVORTEX_CHUNK_TOKEN": "512"})
    with pytest.raises(ConfigError, match=r"chunk_tokens|KVORTEX_CHUNK_TOKENS"):
        KVortexConfig.from_env({"KVORTEX_CHUNK_TOKENS": "many"})


def test_from_yaml(tmp_path: Path) -> None:
    path = tmp_path / "kvortex.yaml"
    path.write_text("chunk_tokens: 128\ncpu_bytes: 2GiB\neviction_typo: 1\n")
    with pytest.raises(ConfigError, match="eviction_typo"):
        KVortexConfig.from_yaml(path)
    path.write_text("chunk_tokens: 128\ncpu_bytes: 2GiB\n")
    cfg = KVortexConfig.from_yaml(path)
    assert (cfg.chunk_tokens, cfg.cpu_bytes) == (128, 2 * 2**30)
    path.write_text("")
    assert KVortexConfig.from_yaml(path) == KVortexConfig()
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        KVortexConfig.from_yaml(path)
    path.write_text("a: [\n")
    with pytest.raises(ConfigError, match="YAML"):
        KVortexConfig.from_yaml(path)
    with pytest.raises(ConfigError, match="cannot read"):
        KVortexConfig.from_yaml(tmp_path / "missing.yaml")


def test_round_trip_and_replace() -> None:
    cfg = KVortexConfig.from_dict({"chunk_tokens": 64, "tenant_salt": "acme"})
    assert KVortexConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.replace(chunk_tokens=32).chunk_tokens == 32
    with pytest.raises(ConfigError):
        cfg.replace(chunk_tokens=0)


def test_every_key_is_documented() -> None:
    doc = (Path(__file__).parents[1] / "docs" / "config.md").read_text()
    for key, _default, text in KVortexConfig.describe():
        assert f"`{key}`" in doc, f"docs/config.md does not document {key}"
        assert text
