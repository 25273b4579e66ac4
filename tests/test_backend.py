from __future__ import annotations

import json
import subprocess
import sys

import pytest

import kvortex
from kvortex import _loader, backend
from kvortex.errors import BackendUnavailable, InvalidArgumentError


def test_default_backend_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVORTEX_BACKEND", "python")
    assert backend.default_backend() == "python"
    assert all(backend.resolve(path) == "python" for path in backend.HOT_PATHS)
    monkeypatch.setenv("KVORTEX_BACKEND", "turbo")
    with pytest.raises(InvalidArgumentError, match="turbo"):
        backend.default_backend()
    monkeypatch.delenv("KVORTEX_BACKEND")
    assert backend.default_backend() == "auto"


def test_resolve_rejects_unknown_names() -> None:
    with pytest.raises(InvalidArgumentError, match="fast"):
        backend.resolve("hashing", "fast")
    with pytest.raises(InvalidArgumentError, match="sorting"):
        backend.resolve("sorting", "auto")


@pytest.mark.parametrize("hot_path", backend.HOT_PATHS)
def test_auto_matches_native_availability(hot_path: str) -> None:
    reason = backend.native_reason(hot_path)
    expected = "python" if reason else "native"
    assert backend.resolve(hot_path, "auto") == expected
    assert backend.resolve(hot_path, "python") == "python"
    if reason:
        with pytest.raises(BackendUnavailable) as info:
            backend.resolve(hot_path, "native")
        assert info.value.reason == reason
    else:
        assert backend.resolve(hot_path, "native") == "native"


def test_native_core_required_in_ci() -> None:
    """With KVORTEX_REQUIRE_NATIVE=1 (CI), every hot path must run native under 'auto'."""
    import os

    if os.environ.get("KVORTEX_REQUIRE_NATIVE") != "1":
        pytest.skip("KVORTEX_REQUIRE_NATIVE is not set (a build without the native core)")
    assert _loader.native().ok, _loader.native().reason
    for choice in backend.describe("auto"):
        assert choice.active == "native", choice


def test_import_needs_no_torch_or_vllm() -> None:
    code = (
        "import sys, kvortex, kvortex.config, kvortex.backend; "
        "print(sorted(m for m in ('torch', 'vllm', 'yaml') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_info_json_reports_every_hot_path() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "kvortex.cli", "info", "--json", "--no-cuda"],
        capture_output=True,
        text=True,
        check=True,
    )
    report = json.loads(out.stdout)
    assert report["version"] == kvortex.__version__
    assert set(report["hot_paths"]) == set(backend.HOT_PATHS)
    for name, choice in report["hot_paths"].items():
        assert choice["active"] == backend.resolve(name)
        assert choice["reason"]
    assert report["config"]["chunk_tokens"] == 256


def test_info_text_and_config_errors() -> None:
    import os

    out = subprocess.run(
        [sys.executable, "-m", "kvortex.cli", "info", "--no-cuda"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "hot paths:" in out.stdout and "hashing" in out.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "kvortex.cli", "info", "--no-cuda"],
        capture_output=True,
        text=True,
        env={**os.environ, "KVORTEX_CHUNK_TOKEN": "1"},
    )
    assert bad.returncode == 2
    assert "KVORTEX_CHUNK_TOKEN" in bad.stderr
