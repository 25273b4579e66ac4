"""Shared fixtures: every hot-path test runs over each implementation of that hot path.

A backend whose native build is missing is skipped (a missing capability) unless
``KVORTEX_REQUIRE_NATIVE=1``, which CI sets: there a missing native core fails the run.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from kvortex import backend

REQUIRE_NATIVE = os.environ.get("KVORTEX_REQUIRE_NATIVE") == "1"


def _params(*hot_paths: str) -> list[object]:
    """``"python"`` and ``"native"``; native skipped unless every one of ``hot_paths`` has it."""
    missing = [(path, backend.native_reason(path)) for path in hot_paths]
    missing = [(path, reason) for path, reason in missing if reason]
    native: object = "native"
    if missing and not REQUIRE_NATIVE:
        why = "; ".join(f"native {path}: {reason}" for path, reason in missing)
        native = pytest.param("native", marks=pytest.mark.skip(reason=why))
    return ["python", native]


@pytest.fixture(params=_params("hashing"))
def hash_backend(request: pytest.FixtureRequest) -> str:
    """``"python"`` and ``"native"``: the hashing implementations."""
    return str(request.param)


@pytest.fixture(params=_params("queue"))
def queue_backend(request: pytest.FixtureRequest) -> str:
    """``"python"`` and ``"native"``: the SPSC queue implementations."""
    return str(request.param)


@pytest.fixture(params=_params("pool"))
def pool_backend(request: pytest.FixtureRequest) -> str:
    """``"python"`` and ``"native"``: the host slab pool implementations."""
    return str(request.param)


@pytest.fixture(params=_params("disk"))
def disk_backend(request: pytest.FixtureRequest) -> str:
    """``"python"`` and ``"native"``: the batch disk I/O and CRC-32 implementations."""
    return str(request.param)


@pytest.fixture(params=_params(*backend.HOT_PATHS))
def engine_backend(request: pytest.FixtureRequest) -> str:
    """``"python"`` and ``"native"``: the ``backend`` config of an engine or connector (its
    hashing, queue, pool and disk tier all follow it)."""
    return str(request.param)


def require_redis() -> None:
    """Skip when redis-server or the redis package is missing here; fail instead under
    ``KVORTEX_REQUIRE_REDIS=1`` (CI), where the shared tier must be tested."""
    from redis_launcher import missing

    reason = missing()
    if reason:
        if os.environ.get("KVORTEX_REQUIRE_REDIS") == "1":
            pytest.fail(f"KVORTEX_REQUIRE_REDIS=1 but {reason}")
        pytest.skip(reason)


def run_isolated(code: str, timeout: float = 60.0) -> str:
    """Run ``code`` in a fresh interpreter with a timeout and return its stdout.

    Thread and stress tests go through this so that a deadlock fails the test instead of
    hanging the suite. A non-zero exit or a timeout fails with the child's output.
    """
    try:
        proc = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(code)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=os.environ.copy(),
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"subprocess did not finish within {timeout}s (deadlock?): {exc.stdout!r}")
    if proc.returncode != 0:
        pytest.fail(f"subprocess failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout
