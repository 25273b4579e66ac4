"""The one place that imports KVortex's compiled modules and records why an import failed.

Nothing else imports ``kvortex._native`` directly: callers ask :func:`native` and get either
the module or ``None`` plus the reason, which ``kvortex info`` prints.
"""

from __future__ import annotations

import functools
import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

__all__ = ["LoadResult", "build_info", "cuda", "native"]


@dataclass(frozen=True)
class LoadResult:
    """Outcome of importing one compiled module: the module, or ``None`` and why."""

    module: ModuleType | None
    reason: str

    @property
    def ok(self) -> bool:
        return self.module is not None


@functools.cache
def build_info() -> dict[str, Any]:
    """What the build recorded (``kvortex/_build_info.json``), or ``{}`` when absent."""
    path = Path(__file__).with_name("_build_info.json")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _load(module: str, built_key: str, reason_key: str) -> LoadResult:
    info = build_info()
    if info.get(built_key) is False:
        return LoadResult(None, f"not built: {info.get(reason_key) or 'unknown reason'}")
    try:
        return LoadResult(importlib.import_module(module), "")
    except ImportError as exc:
        return LoadResult(None, f"import failed: {exc}")


@functools.cache
def native() -> LoadResult:
    """Import ``kvortex._native`` (the C++ core) once; never raises."""
    return _load("kvortex._native", "native", "reason")


@functools.cache
def cuda() -> LoadResult:
    """Import ``kvortex._cuda`` (the CUDA copy engine) once; never raises.

    The module links the CUDA runtime only (never torch's C++ library), so it imports on a
    machine without a GPU; whether a device is usable is a separate question answered by
    ``kvortex._cuda.device_count()``.
    """
    return _load("kvortex._cuda", "cuda", "cuda_reason")
