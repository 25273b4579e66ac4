from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

import pytest

from kvortex import backend as kvortex_backend
from kvortex import config as config_module
from kvortex.config import ENV_PREFIX, PROCESS_SWITCHES, KVortexConfig, parse_size
from kvortex.errors import ConfigError, InvalidArgumentError

ROOT = Path(__file__).parents[1]


def test_defaults() -> None:
    cfg = KVortexConfig()
    assert cfg.chunk_tokens == 256
    assert cfg.cpu_bytes == 4 * 2**30
    assert cfg.backend is None  # inherit the process default
    assert cfg.log_interval_s == 10.0
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
        ("1.5KiB", 1536),
        ("0.5KiB", 512),
        ("1.000B", 1),
        ("+4KiB", 4096),
        (2**53 + 1, 2**53 + 1),
        ("9007199254740993", 2**53 + 1),  # 2**53 + 1: a float would give ...992
        ("9007199254740993 B", 2**53 + 1),
        ("9007199254740993KiB", (2**53 + 1) * 2**10),
        ("123456789012345678901234567890.5 TiB", 123456789012345678901234567890 * 2**40 + 2**39),
        ("9" * 400 + "TiB", int("9" * 400) * 2**40),
        ("0.0001TB", 10**8),
    ],
)
def test_parse_size(text: object, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "GiB",
        "-1GiB",
        "-1",
        "-0.5KiB",
        "1.3B",
        "0.1B",
        "0.1",
        "1.0000000001KiB",
        "1e3",
        "1e400",
        "inf",
        "nan",
        "1.",
        ".5KiB",
        "9" * 5000,  # more digits than int() reads
        "8 parsecs",
        -5,
        True,
        1.5,
        None,
        b"8GiB",
    ],
)
def test_parse_size_rejects(bad: object) -> None:
    with pytest.raises(ConfigError, match=r"^memory: "):
        parse_size(bad, key="memory")


@pytest.mark.parametrize(("text", "why"), [("0.1B", "whole"), ("-1", "negative"), (-1, "negative")])
def test_parse_size_says_why(text: object, why: str) -> None:
    with pytest.raises(ConfigError, match=why):
        parse_size(text)


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
        ("chunk_tokens", 65537),
        ("chunk_tokens", 2**40),
        ("cpu_bytes", "lots"),
        ("cpu_bytes", 0),
        ("cpu_bytes", "0GiB"),
        ("cpu_bytes", -1),
        ("backend", "fast"),
        ("backend", ""),
        ("backend", 1),
        ("log_interval_s", -1),
        ("log_interval_s", "10"),
        ("log_interval_s", True),
        ("log_interval_s", float("nan")),
        ("log_interval_s", float("inf")),
        ("log_interval_s", 10**400),
        ("hash_algo", "md5"),
        ("numa_node", -1),
        ("hugepages", "sometimes"),
        ("tenant_salt", 7),
        ("remote_url", 5),
        ("remote_url", "http://cache:6379"),
        ("remote_url", "redis://cache/x"),
        ("remote_timeout_ms", 0),
        ("remote_timeout_ms", 60001),
        ("remote_timeout_ms", "200"),
        ("remote_write", "sometimes"),
        ("remote_ttl_s", 0),
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


def test_chunk_tokens_bounds_say_why() -> None:
    assert KVortexConfig.from_dict({"chunk_tokens": 65536}).chunk_tokens == 65536
    assert KVortexConfig.from_dict({"chunk_tokens": 1}).chunk_tokens == 1
    with pytest.raises(ConfigError, match=r"chunk_tokens: must be between 1 and 65536.*8 GiB"):
        KVortexConfig.from_dict({"chunk_tokens": 65537})
    with pytest.raises(ConfigError, match=r"KVORTEX_CHUNK_TOKENS: must be between 1 and 65536"):
        KVortexConfig.from_env({"KVORTEX_CHUNK_TOKENS": "100000"})


def test_cpu_bytes_tiny_stays_valid_zero_does_not() -> None:
    # Tests elsewhere build engines with a few hundred bytes of host tier on purpose.
    assert KVortexConfig.from_dict({"cpu_bytes": 100}).cpu_bytes == 100
    assert KVortexConfig.from_dict({"cpu_bytes": "1KiB"}).cpu_bytes == 1024
    with pytest.raises(ConfigError, match=r"cpu_bytes: .*more than 0"):
        KVortexConfig.from_dict({"cpu_bytes": 0})
    with pytest.raises(ConfigError, match=r"KVORTEX_CPU_BYTES: .*more than 0"):
        KVortexConfig.from_env({"KVORTEX_CPU_BYTES": "0"})


def test_cpu_bytes_above_physical_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    physical = config_module._physical_memory()
    if physical is not None:  # the real machine
        assert KVortexConfig.from_dict({"cpu_bytes": physical}).cpu_bytes == physical
        with pytest.raises(ConfigError, match=r"cpu_bytes: .*physical memory"):
            KVortexConfig.from_dict({"cpu_bytes": physical + 1})
    monkeypatch.setattr(config_module, "_physical_memory", lambda: 2**30)
    assert KVortexConfig.from_dict({"cpu_bytes": "1GiB"}).cpu_bytes == 2**30
    with pytest.raises(ConfigError, match=r"cpu_bytes: '2GiB' \(2\.0 GiB\) .*\(1\.0 GiB\)"):
        KVortexConfig.from_dict({"cpu_bytes": "2GiB"})
    with pytest.raises(ConfigError, match=r"KVORTEX_CPU_BYTES: .*physical memory"):
        KVortexConfig.from_env({"KVORTEX_CPU_BYTES": "2GiB"})
    # Where the platform does not say how much memory there is, the check is skipped.
    monkeypatch.setattr(config_module, "_physical_memory", lambda: None)
    assert KVortexConfig.from_dict({"cpu_bytes": "1000TiB"}).cpu_bytes == 1000 * 2**40


@pytest.mark.parametrize("sysconf_result", [ValueError("unknown name"), -1, 0])
def test_physical_memory_unknown(monkeypatch: pytest.MonkeyPatch, sysconf_result: object) -> None:
    def sysconf(name: str) -> int:
        if isinstance(sysconf_result, Exception):
            raise sysconf_result
        assert isinstance(sysconf_result, int)
        return sysconf_result

    monkeypatch.setattr(os, "sysconf", sysconf)
    assert config_module._physical_memory() is None


def test_constructor_and_dataclasses_replace_validate() -> None:
    with pytest.raises(ConfigError, match="cpu_bytes"):
        KVortexConfig(cpu_bytes=0)
    with pytest.raises(ConfigError, match="chunk_tokens"):
        dataclasses.replace(KVortexConfig(), chunk_tokens=10**6)
    # ...and normalised the same way as from_dict.
    cfg = KVortexConfig(cpu_bytes="1GiB", backend="INHERIT", log_interval_s=3)  # type: ignore[arg-type]
    assert (cfg.cpu_bytes, cfg.backend, cfg.log_interval_s) == (2**30, None, 3.0)
    assert isinstance(cfg.log_interval_s, float)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("inherit", None),
        (" Inherit ", None),
        ("auto", "auto"),
        ("native", "native"),
        ("PYTHON", "python"),
    ],
)
def test_backend_values(value: object, expected: str | None) -> None:
    cfg = KVortexConfig.from_dict({"backend": value})
    assert cfg.backend == expected
    assert KVortexConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.replace(chunk_tokens=128).backend == expected


def test_backend_inherit_resolves_to_the_process_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KVORTEX_BACKEND", raising=False)
    cfg = KVortexConfig()
    assert [c.requested for c in kvortex_backend.describe(cfg.backend)] == ["auto"] * len(
        kvortex_backend.HOT_PATHS
    )
    monkeypatch.setenv("KVORTEX_BACKEND", "python")
    assert [c.active for c in kvortex_backend.describe(cfg.backend)] == ["python"] * len(
        kvortex_backend.HOT_PATHS
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [("python", "python"), (" Native ", "native"), ("inherit", None), ("", None), ("none", None)],
)
def test_backend_from_env(text: str, expected: str | None) -> None:
    assert KVortexConfig.from_env({"KVORTEX_BACKEND": text}).backend == expected


def test_backend_from_env_rejects_names_the_variable() -> None:
    with pytest.raises(ConfigError, match=r"^KVORTEX_BACKEND: expected inherit"):
        KVortexConfig.from_env({"KVORTEX_BACKEND": "turbo"})


def test_log_interval_s() -> None:
    assert KVortexConfig.from_dict({"log_interval_s": 0}).log_interval_s == 0.0
    assert KVortexConfig.from_dict({"log_interval_s": 2.5}).log_interval_s == 2.5
    cfg = KVortexConfig.from_dict({"log_interval_s": 30})
    assert cfg.log_interval_s == 30.0 and isinstance(cfg.log_interval_s, float)
    assert KVortexConfig.from_dict(cfg.to_dict()) == cfg
    for text, expected in [("0", 0.0), ("2.5", 2.5), (" 60 ", 60.0), ("1e1", 10.0)]:
        assert KVortexConfig.from_env({"KVORTEX_LOG_INTERVAL_S": text}).log_interval_s == expected
    for bad in ["soon", "", "-1", "nan", "inf"]:
        with pytest.raises(ConfigError, match="KVORTEX_LOG_INTERVAL_S"):
            KVortexConfig.from_env({"KVORTEX_LOG_INTERVAL_S": bad})


def test_remote_keys() -> None:
    cfg = KVortexConfig()
    assert (cfg.remote_url, cfg.remote_timeout_ms, cfg.remote_write, cfg.remote_ttl_s) == (
        None,
        200,
        "seen-twice",
        None,
    )
    env = {
        "KVORTEX_REMOTE_URL": "rediss+cluster://kv@cache:7000?ssl_cert_reqs=none",
        "KVORTEX_REMOTE_TIMEOUT_MS": "50",
        "KVORTEX_REMOTE_WRITE": "ALL",
        "KVORTEX_REMOTE_TTL_S": "3600",
        "KVORTEX_REMOTE_PASSWORD": "secret",  # a process switch, not a key
    }
    cfg = KVortexConfig.from_env(env)
    assert cfg.remote_url == env["KVORTEX_REMOTE_URL"]
    assert (cfg.remote_timeout_ms, cfg.remote_write, cfg.remote_ttl_s) == (50, "all", 3600)
    assert "secret" not in str(cfg.to_dict())
    with_password = cfg.replace(remote_url="redis://kv:url-secret@cache:6379")
    assert with_password.redacted()["remote_url"] == "redis://kv:***@cache:6379"
    assert "url-secret" not in repr(with_password) and "kv:***@" in repr(with_password)
    assert with_password.to_dict()["remote_url"] == "redis://kv:url-secret@cache:6379"
    assert KVortexConfig.from_env({"KVORTEX_REMOTE_URL": "none"}).remote_url is None
    assert KVortexConfig.from_dict({"remote_url": " "}).remote_url is None
    with pytest.raises(ConfigError, match=r"KVORTEX_REMOTE_URL: .*scheme"):
        KVortexConfig.from_env({"KVORTEX_REMOTE_URL": "memcached://cache"})


def test_from_dict_suggests_the_closest_key() -> None:
    with pytest.raises(ConfigError, match=r"did you mean 'chunk_tokens'\?"):
        KVortexConfig.from_dict({"chunk_token": 256})
    with pytest.raises(ConfigError) as info:
        KVortexConfig.from_dict({"zzz": 1})
    assert "did you mean" not in str(info.value)
    with pytest.raises(ConfigError, match="unknown configuration key 7"):
        KVortexConfig.from_dict({7: 1})  # type: ignore[dict-item]


def test_from_env_skips_every_process_switch() -> None:
    env = {name: "anything" for name in PROCESS_SWITCHES if name != "KVORTEX_BACKEND"}
    env["KVORTEX_DMA_LANES"] = "2"
    assert KVortexConfig.from_env(env) == KVortexConfig()


def test_from_env_suggests_the_closest_variable() -> None:
    with pytest.raises(ConfigError, match=r"KVORTEX_CPU_BYTE; did you mean KVORTEX_CPU_BYTES\?"):
        KVortexConfig.from_env({"KVORTEX_CPU_BYTE": "1GiB"})
    with pytest.raises(ConfigError, match=r"did you mean KVORTEX_REQUIRE_NATIVE\?"):
        KVortexConfig.from_env({"KVORTEX_REQUIRE_NATIV": "1"})
    with pytest.raises(ConfigError, match=r"did you mean KVORTEX_DMA_LANES\?"):
        KVortexConfig.from_env({"KVORTEX_DMA_LANE": "1"})
    # The shared prefix alone does not make a name "close".
    with pytest.raises(ConfigError) as info:
        KVortexConfig.from_env({"KVORTEX_QQQ": "1"})
    assert "did you mean" not in str(info.value)
    assert "KVORTEX_DMA_LANES" in str(info.value)  # lists the switches too
    # KVORTEX_CONFIG was never read by anything: it is not a switch.
    with pytest.raises(ConfigError, match="KVORTEX_CONFIG"):
        KVortexConfig.from_env({"KVORTEX_CONFIG": "x.yaml"})


@pytest.mark.parametrize("environ", [["KVORTEX_CPU_BYTES=1GiB"], 42, "KVORTEX_CPU_BYTES=1GiB"])
def test_from_env_not_a_mapping(environ: object) -> None:
    with pytest.raises(ConfigError, match="environment: expected a mapping"):
        KVortexConfig.from_env(environ)  # type: ignore[arg-type]


def test_from_env_odd_names_and_values() -> None:
    with pytest.raises(ConfigError, match="variable names must be str"):
        KVortexConfig.from_env({b"KVORTEX_CPU_BYTES": "1GiB"})  # type: ignore[dict-item]
    with pytest.raises(ConfigError, match="KVORTEX_CPU_BYTES: expected text, got int"):
        KVortexConfig.from_env({"KVORTEX_CPU_BYTES": 5})  # type: ignore[dict-item]
    assert KVortexConfig.from_env({"kvortex_cpu_bytes": "x", "OTHER": "y"}) == KVortexConfig()


def test_from_env_reads_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith(ENV_PREFIX):
            monkeypatch.delenv(name)
    monkeypatch.setenv("KVORTEX_LOG_INTERVAL_S", "0")
    monkeypatch.setenv("KVORTEX_DMA_LANES", "1")
    assert KVortexConfig.from_env().log_interval_s == 0.0


class _BytesPath:
    def __fspath__(self) -> bytes:
        return b"/tmp/kvortex.yaml"


def bad_config_files(tmp_path: Path) -> dict[str, tuple[object, str]]:
    """Case name -> (what to pass as the path, a regex the ConfigError must match)."""
    cases: dict[str, tuple[object, str]] = {}

    def write(name: str, content: str | bytes) -> Path:
        path = tmp_path / f"{name}.yaml"
        if not tmp_path.is_dir():  # only the case names are wanted
            return path
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
        return path

    cases["missing"] = (tmp_path / "missing.yaml", "cannot read configuration file")
    cases["directory"] = (tmp_path, "cannot read configuration file .*[Dd]irectory")
    cases["not utf-8"] = (write("latin1", b"tenant_salt: caf\xe9\xff\n"), "not UTF-8 text")
    cases["list"] = (write("list", "- 1\n- 2\n"), "top level must be a mapping.* got list")
    cases["int scalar"] = (write("int", "5\n"), "top level must be a mapping.* got int")
    cases["str scalar"] = (write("str", "hello\n"), "top level must be a mapping.* got str")
    cases["bad yaml"] = (write("bad", "a: [\n"), "not valid YAML")
    cases["bad date"] = (write("date", "tenant_salt: 2020-13-45\n"), "not valid YAML")
    cases["deep"] = (write("deep", "[" * 5000), "not valid YAML")
    cases["nul"] = (write("nul", b"chunk_tokens: 1\x00\n"), "not valid YAML")
    cases["unknown key"] = (write("typo", "cpu_byte: 1GiB\n"), "did you mean 'cpu_bytes'")
    cases["bad value"] = (write("zero", "cpu_bytes: 0\n"), "cpu_bytes: .*more than 0")
    return cases


BAD_CONFIG_CASES = list(bad_config_files(Path("/nonexistent")).keys())


@pytest.mark.parametrize("case", BAD_CONFIG_CASES)
def test_from_yaml_bad_files_raise_config_error(tmp_path: Path, case: str) -> None:
    path, pattern = bad_config_files(tmp_path)[case]
    with pytest.raises(ConfigError, match=pattern):
        KVortexConfig.from_yaml(path)  # type: ignore[arg-type]


def test_from_yaml_unreadable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "secret.yaml"
    path.write_text("chunk_tokens: 128\n")
    path.chmod(0)
    if os.access(path, os.R_OK):  # root reads anything: make the read fail the way it would

        def refuse(self: Path) -> bytes:
            raise PermissionError(13, "Permission denied", str(self))

        monkeypatch.setattr(Path, "read_bytes", refuse)
    try:
        with pytest.raises(ConfigError, match=r"cannot read configuration file .*[Pp]ermission"):
            KVortexConfig.from_yaml(path)
    finally:
        path.chmod(0o600)


@pytest.mark.parametrize(
    ("path", "pattern"),
    [
        (None, "expected a path .* got NoneType"),
        (42, "expected a path .* got int"),
        (b"kvortex.yaml", "expected a path .* got bytes"),
        (["kvortex.yaml"], "expected a path .* got list"),
        ("", "the path is empty"),
        (_BytesPath(), "expected a str path"),
    ],
)
def test_from_yaml_not_a_path(path: object, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        KVortexConfig.from_yaml(path)  # type: ignore[arg-type]


def test_from_yaml_new_keys_and_bom(tmp_path: Path) -> None:
    path = tmp_path / "kvortex.yaml"
    path.write_bytes(b"\xef\xbb\xbfbackend: inherit\nlog_interval_s: 0\ntenant_salt: caf\xc3\xa9\n")
    cfg = KVortexConfig.from_yaml(str(path))
    assert (cfg.backend, cfg.log_interval_s, cfg.tenant_salt) == (None, 0.0, "café")
    path.write_text("backend: null\ncpu_bytes: 9007199254740993 B\n")
    with pytest.raises(ConfigError, match="physical memory"):
        KVortexConfig.from_yaml(path)


# --- docs/config.md follows the code --------------------------------------------------------


def _doc_table(heading_pattern: str) -> list[list[str]]:
    """The body rows (cells stripped) of the first Markdown table at or after the first line
    matching ``heading_pattern``."""
    lines = (ROOT / "docs" / "config.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if re.search(heading_pattern, line))
    rows: list[list[str]] = []
    for line in lines[start:]:
        if line.startswith("|"):
            rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
        elif rows:
            break
    return rows[2:]  # below the header and the |---| line


def test_every_key_is_documented_as_described() -> None:
    rows = _doc_table(r"^\| key \| default \| meaning \|$")
    documented = [row[0].strip("`") for row in rows]
    assert documented == list(KVortexConfig.key_names()), "docs/config.md key table is stale"
    for (key, default, text), row in zip(KVortexConfig.describe(), rows, strict=True):
        assert row[2] == text, f"docs/config.md: the meaning of {key} should read:\n{text}"
        # The default cell, read the way the environment would read it, is the real default.
        cell = row[1].strip("`")
        cell = "" if cell == '""' else cell
        from_doc = KVortexConfig.from_env({ENV_PREFIX + key.upper(): cell})
        assert getattr(from_doc, key) == default, f"docs/config.md: default of {key}"


def test_process_switches_are_documented_exactly() -> None:
    rows = _doc_table(r"^## Process switches")
    documented = {row[0].strip("`"): row[1] for row in rows}
    assert documented == PROCESS_SWITCHES
    assert "KVORTEX_CONFIG" not in (ROOT / "docs" / "config.md").read_text()


_ENV_READ_PATTERNS = [
    r"""environ(?:\.get)?[\(\[]\s*["'](KVORTEX_[A-Z0-9_]+)""",  # Python os.environ.get / [...]
    r"""setenv\(\s*["'](KVORTEX_[A-Z0-9_]+)""",  # monkeypatch.setenv
    r"""getenv\(\s*"(KVORTEX_[A-Z0-9_]+)""",  # C/C++ std::getenv
    r"""\$\{(KVORTEX_[A-Z0-9_]+)""",  # shell ${KVORTEX_X...}
    r"""(?:^|\s)(KVORTEX_[A-Z0-9_]+)=""",  # shell KVORTEX_X=... cmd
]


@pytest.mark.skipif(not (ROOT / "scripts").is_dir(), reason="needs the source tree")
def test_process_switches_match_what_the_project_reads() -> None:
    known = {ENV_PREFIX + key.upper() for key in KVortexConfig.key_names()} | set(PROCESS_SWITCHES)
    found: dict[str, str] = {}
    here = {Path(__file__).name, "test_cli.py"}  # these spell typos on purpose
    for folder in ("kvortex", "tests", "scripts", "bench", "csrc"):
        for path in (ROOT / folder).rglob("*"):
            if path.suffix not in {".py", ".sh", ".cc", ".cu", ".h", ".cuh"} or path.name in here:
                continue
            text = path.read_text(errors="replace")
            for pattern in _ENV_READ_PATTERNS:
                for name in re.findall(pattern, text, flags=re.MULTILINE):
                    found.setdefault(name, str(path.relative_to(ROOT)))
    stale = set(PROCESS_SWITCHES) - set(found)
    assert not stale, f"nothing reads these PROCESS_SWITCHES any more: {stale}"
    unknown = {name: where for name, where in found.items() if name not in known}
    assert not unknown, f"add these to PROCESS_SWITCHES and docs/config.md: {unknown}"


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("chunk_tokens", 10**5000),  # too long for str(): messages must not print it
        ("chunk_tokens", -(10**5000)),
        ("cpu_bytes", 10**5000),
        ("cpu_bytes", -(10**5000)),
        ("cpu_bytes", "9" * 4290 + "TiB"),
        ("async_load_min_tokens", -(10**5000)),
        ("log_interval_s", 10**5000),
        ("backend", "x" * 10**6),
    ],
    ids=lambda v: v if isinstance(v, str) and len(v) < 30 else type(v).__name__,
)
def test_absurd_values_still_give_a_short_config_error(key: str, value: object) -> None:
    with pytest.raises(ConfigError, match=f"^{key}: ") as info:
        KVortexConfig.from_dict({key: value})
    assert len(str(info.value)) < 400


def test_absurd_key_and_environment_text() -> None:
    with pytest.raises(ConfigError, match="characters") as info:
        KVortexConfig.from_dict({"k" * 10**6: 1})
    assert len(str(info.value)) < 1000
    with pytest.raises(ConfigError, match="KVORTEX_CHUNK_TOKENS: expected an int"):
        KVortexConfig.from_env({"KVORTEX_CHUNK_TOKENS": "9" * 5000})
    with pytest.raises(ConfigError, match="KVORTEX_LOG_INTERVAL_S"):
        KVortexConfig.from_env({"KVORTEX_LOG_INTERVAL_S": "9" * 5000})  # inf
