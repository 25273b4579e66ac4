"""Every benchmark program runs end to end at tiny sizes (``--quick --json``).

This checks that the programs work, not how fast anything is: performance is measured by
running them at full size (see docs/PERF.md), never by timed unit tests.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import require_redis

BENCH = Path(__file__).parents[1] / "bench"
CPU_BENCHMARKS = [
    "hashing.py",
    "spsc_queue.py",
    "pool.py",
    "directory.py",
    "engine.py",
    "connector.py",
    "disk_io.py",
    "disk.py",
]


@pytest.mark.parametrize(
    "program", [*CPU_BENCHMARKS, pytest.param("remote.py", marks=pytest.mark.redis)]
)
def test_benchmark_runs_quick(program: str) -> None:
    if program == "remote.py":  # it starts its own redis-server processes
        require_redis()
    proc = subprocess.run(
        [sys.executable, str(BENCH / program), "--quick", "--json"]
        + (["--device", "cpu"] if program in ("engine.py", "connector.py") else []),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["rows"], "a benchmark must report at least one measured row"
    assert result["ratios"], "a benchmark must report baseline ratios"
    for row in result["rows"]:
        assert row["stats"]["median"] > 0
