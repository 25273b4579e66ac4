"""Choosing between the compiled and the pure-Python implementation of each hot path.

Every hot path (``hashing``, ``queue``, ``pool``, ``disk``) has two implementations with one
contract.
``backend="auto"`` picks the native one when it loaded, else the fallback, and says why;
``"native"`` raises :class:`BackendUnavailable` with the recorded reason instead of falling back
silently; ``"python"`` forces the fallback. ``KVORTEX_BACKEND`` sets the process default.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

from kvortex import _loader
from kvortex.errors import BackendUnavailable, InvalidArgumentError

__all__ = [
    "BACKENDS",
    "HOT_PATHS",
    "BackendChoice",
    "default_backend",
    "describe",
    "native_reason",
    "resolve",
]

HOT_PATHS = ("hashing", "queue", "pool", "disk")
BACKENDS = ("auto", "native", "python")
Implementation = Literal["native", "python"]


@dataclass(frozen=True)
class BackendChoice:
    """Which implementation a hot path uses and why."""

    hot_path: str
    active: Implementation
    requested: str
    reason: str


def default_backend() -> str:
    """The process default: ``KVORTEX_BACKEND`` when set, else ``"auto"``."""
    value = os.environ.get("KVORTEX_BACKEND", "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise InvalidArgumentError(
            f"KVORTEX_BACKEND={value!r} is not a backend; expected one of {', '.join(BACKENDS)}"
        )
    return value


def native_reason(hot_path: str) -> str:
    """``""`` when the native implementation of ``hot_path`` is usable, else why it is not."""
    if hot_path not in HOT_PATHS:
        raise InvalidArgumentError(
            f"unknown hot path {hot_path!r}; expected one of {', '.join(HOT_PATHS)}"
        )
    loaded = _loader.native()
    if loaded.module is None:
        return loaded.reason
    reasons: dict[str, str] = getattr(loaded.module, "HOT_PATHS", {})
    if hot_path not in reasons:
        return f"kvortex._native has no {hot_path} implementation"
    return reasons[hot_path]


def resolve(hot_path: str, requested: str | None = None) -> Implementation:
    """Return ``"native"`` or ``"python"`` for ``hot_path`` given a requested backend.

    ``requested=None`` means the process default (:func:`default_backend`).
    """
    choice = _choose(hot_path, default_backend() if requested is None else requested)
    return choice.active


def describe(requested: str | None = None) -> list[BackendChoice]:
    """The choice for every hot path, with reasons (what ``kvortex info`` prints)."""
    wanted = default_backend() if requested is None else requested
    return [_choose(path, wanted) for path in HOT_PATHS]


def _choose(hot_path: str, requested: str) -> BackendChoice:
    if not isinstance(requested, str) or requested not in BACKENDS:
        raise InvalidArgumentError(
            f"backend={requested!r} is not a backend; expected one of {', '.join(BACKENDS)}"
        )
    reason = native_reason(hot_path)
    if requested == "python":
        return BackendChoice(hot_path, "python", requested, "requested explicitly")
    if not reason:
        return BackendChoice(hot_path, "native", requested, "compiled core loaded")
    if requested == "native":
        raise BackendUnavailable(
            f"the native {hot_path} implementation is unavailable: {reason}", reason
        )
    return BackendChoice(hot_path, "python", requested, f"native unavailable: {reason}")
