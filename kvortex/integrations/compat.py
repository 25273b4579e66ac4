"""Which vLLM versions the connector is tested against, and what it says about the others.

The connector feature-detects vLLM's API (no version tables decide behaviour); this module only
tells the operator, once at start-up, whether the running vLLM is one that CI tests.
"""

from __future__ import annotations

import logging
import re

__all__ = ["TESTED_VLLM", "vllm_version_note"]

# Run by scripts/test-vllm.sh in CI, each against the real package.
TESTED_VLLM = ("0.15.1", "0.33.0")


def _release(version: str) -> tuple[int, ...] | None:
    match = re.match(r"^\s*v?(\d+)\.(\d+)(?:\.(\d+))?", version)
    if match is None:
        return None
    return tuple(int(part or 0) for part in match.groups())


def vllm_version_note(version: str) -> tuple[int, str]:
    """``(logging level, message)`` for running under vLLM ``version``.

    INFO inside the tested range (the oldest tested release line up to the newest one's
    minor line), WARNING outside it or for a version string that cannot be read.
    """
    tested = ", ".join(TESTED_VLLM)
    release = _release(version)
    oldest = _release(TESTED_VLLM[0])
    newest = _release(TESTED_VLLM[-1])
    assert oldest is not None and newest is not None
    if release is None:
        return logging.WARNING, (
            f"kvortex: cannot read the vLLM version {version!r}; KVortex is tested with vLLM "
            f"{tested}"
        )
    if oldest[:2] <= release[:2] <= newest[:2]:
        return logging.INFO, f"kvortex: vLLM {version} (tested: {tested})"
    return logging.WARNING, (
        f"kvortex: vLLM {version} is outside the tested range ({tested}); the connector may "
        "fail or misbehave. Pin a tested vLLM version, or report what you see with "
        "`kvortex info` output and this version."
    )
