"""``kvortex info``: in process through :func:`kvortex.cli.main`, and as a real process for what
only a process shows (the exit status, stderr without a traceback, the real environment)."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from test_config import BAD_CONFIG_CASES, bad_config_files

import kvortex
from kvortex.cli import main


def clean_env(**extra: str) -> dict[str, str]:
    """The current environment without KVORTEX_* variables, plus ``extra``; the child imports
    the same kvortex as this process, wherever it was started."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVORTEX_")}
    package_parent = str(Path(kvortex.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_parent, env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def run_cli(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kvortex.cli", *args],
        cwd=tmp_path,
        env=clean_env(**env),
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def no_kvortex_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("KVORTEX_"):
            monkeypatch.delenv(name)


def test_info_accepts_process_switches(tmp_path: Path) -> None:
    result = run_cli(
        tmp_path, "info", "--no-cuda", KVORTEX_DMA_LANES="2", KVORTEX_REQUIRE_NATIVE="0"
    )
    assert result.returncode == 0, result.stderr
    assert "KVORTEX_DMA_LANES=2" in result.stdout
    assert "Traceback" not in result.stderr


def test_info_refuses_a_misspelled_key_without_traceback(tmp_path: Path) -> None:
    result = run_cli(tmp_path, "info", "--no-cuda", KVORTEX_CPU_BYTE="1GiB")
    assert result.returncode == 2
    assert result.stderr.startswith("kvortex: error: unknown environment variable KVORTEX_CPU_BYTE")
    assert "did you mean KVORTEX_CPU_BYTES?" in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize("case", ["directory", "not utf-8", "list", "int scalar", "deep"])
def test_info_bad_config_file_process(tmp_path: Path, case: str) -> None:
    path, pattern = bad_config_files(tmp_path)[case]
    result = run_cli(tmp_path, "info", "--no-cuda", "--config", str(path))
    assert result.returncode == 2, result.stdout
    assert result.stderr.startswith("kvortex: error: ")
    assert re.search(pattern, result.stderr), result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.usefixtures("no_kvortex_env")
@pytest.mark.parametrize("case", BAD_CONFIG_CASES)
def test_info_bad_config_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    path, pattern = bad_config_files(tmp_path)[case]
    assert main(["info", "--no-cuda", "--config", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("kvortex: error: ")
    assert re.search(pattern, err), err


@pytest.mark.usefixtures("no_kvortex_env")
def test_info_empty_config_path(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "--no-cuda", "--config", ""]) == 2
    assert "the path is empty" in capsys.readouterr().err


@pytest.mark.usefixtures("no_kvortex_env")
def test_info_bad_value_from_env(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("KVORTEX_CPU_BYTES", "0")
    assert main(["info", "--no-cuda"]) == 2
    assert capsys.readouterr().err.startswith("kvortex: error: KVORTEX_CPU_BYTES: ")
    monkeypatch.setenv("KVORTEX_CPU_BYTES", "1GiB")
    monkeypatch.setenv("KVORTEX_CHUNK_TOKENS", "1000000")
    assert main(["info", "--no-cuda"]) == 2
    assert "KVORTEX_CHUNK_TOKENS: must be between 1 and 65536" in capsys.readouterr().err


@pytest.mark.usefixtures("no_kvortex_env")
def test_info_json_from_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "kvortex.yaml"
    path.write_text("chunk_tokens: 128\nbackend: inherit\nlog_interval_s: 0\n")
    assert main(["info", "--no-cuda", "--json", "--config", str(path)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["config"]["chunk_tokens"] == 128
    assert report["config"]["backend"] is None
    assert report["config"]["log_interval_s"] == 0.0
    assert report["process_switches"] == {}
    assert {c["requested"] for c in report["hot_paths"].values()} == {"auto"}


@pytest.mark.usefixtures("no_kvortex_env")
def test_info_text_shows_inherited_backend(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["info", "--no-cuda"]) == 0
    out = capsys.readouterr().out
    assert "backend = None  (inherit: process default 'auto')" in out
    assert "process switches" not in out
    monkeypatch.setenv("KVORTEX_BACKEND", "python")
    monkeypatch.setenv("KVORTEX_TESTS_ONLY", "1")
    assert main(["info", "--no-cuda"]) == 0
    out = capsys.readouterr().out
    assert "backend = 'python'" in out
    assert "process switches: KVORTEX_BACKEND=python, KVORTEX_TESTS_ONLY=1" in out


def test_info_shared_tier_unreachable_shows_no_password(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = run_cli(
        tmp_path,
        "info",
        "--no-cuda",
        "--json",
        KVORTEX_REMOTE_URL=f"redis://kv:url-secret@127.0.0.1:{port}/0",
        KVORTEX_REMOTE_PASSWORD="env-secret",
        KVORTEX_REMOTE_TIMEOUT_MS="100",
    )
    assert result.returncode == 0, result.stderr
    assert "secret" not in result.stdout + result.stderr
    report = json.loads(result.stdout)
    tier = report["remote_tier"]
    assert tier["enabled"] and not tier["reachable"] and "unreachable" in tier["problem"]
    assert tier["url"] == report["config"]["remote_url"] == f"redis://kv:***@127.0.0.1:{port}/0"
    assert report["process_switches"]["KVORTEX_REMOTE_PASSWORD"] == "***"
    text = run_cli(tmp_path, "info", "--no-cuda", KVORTEX_REMOTE_URL=f"redis://127.0.0.1:{port}")
    assert f"shared tier: redis://127.0.0.1:{port} NOT reachable (" in text.stdout
    assert "shared tier: off (no remote_url)" in run_cli(tmp_path, "info", "--no-cuda").stdout
