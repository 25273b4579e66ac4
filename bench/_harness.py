"""Shared plumbing for the benchmark programs in bench/: timing, statistics, reporting.

Each benchmark measures a baseline and KVortex side by side in one run and reports ratios.
``--quick`` shrinks every size so CI can smoke-test the program in seconds; ``--json`` prints
machine-readable results instead of the table.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Stats:
    """Seconds per call over repeated runs."""

    median: float
    p99: float
    runs: int

    @classmethod
    def of(cls, samples: Sequence[float]) -> Stats:
        ordered = sorted(samples)
        p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
        return cls(statistics.median(ordered), p99, len(ordered))


def measure(fn: Callable[[], object], *, repeat: int, warmup: int = 2) -> Stats:
    """Call ``fn`` ``warmup`` times untimed, then ``repeat`` times timed; seconds per call."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return Stats.of(samples)


@dataclass
class Row:
    """One measured case: a name, its stats, and derived throughput figures."""

    case: str
    impl: str
    stats: Stats
    metrics: dict[str, float] = field(default_factory=dict)


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--json", action="store_true", help="print results as JSON")
    p.add_argument("--quick", action="store_true", help="tiny sizes, for CI smoke tests")
    p.add_argument("--repeat", type=int, default=None, help="timed repetitions per case")
    return p


def machine() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": _cpu_model(),
    }


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def report(title: str, rows: Sequence[Row], ratios: dict[str, float], as_json: bool) -> None:
    """Print the rows and the ratios, as a table or as JSON on stdout."""
    if as_json:
        out = {
            "benchmark": title,
            "machine": machine(),
            "rows": [asdict(r) for r in rows],
            "ratios": ratios,
        }
        json.dump(out, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return
    print(f"# {title}  ({machine()['processor']}, Python {machine()['python']})")
    metric_names: list[str] = []
    for r in rows:
        metric_names += [k for k in r.metrics if k not in metric_names]
    header = ["case", "impl", "median", "p99", *metric_names]
    table = [header]
    for r in rows:
        table.append(
            [r.case, r.impl, _fmt_time(r.stats.median), _fmt_time(r.stats.p99)]
            + [_fmt_num(r.metrics[m]) if m in r.metrics else "" for m in metric_names]
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))
    for name, value in ratios.items():
        print(f"ratio {name}: {value:.2f}x")


def _fmt_time(seconds: float) -> str:
    if seconds < 1e-6:
        return f"{seconds * 1e9:.0f} ns"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} us"
    if seconds < 1:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


def _fmt_num(value: float) -> str:
    return f"{value:,.3g}" if abs(value) < 1000 else f"{value:,.0f}"
