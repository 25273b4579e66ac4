"""What this installation of KVortex can do here, and why: the data behind ``kvortex info``."""

from __future__ import annotations

import importlib.util
import os
import platform
from pathlib import Path
from typing import Any

from kvortex import _loader, backend
from kvortex.config import PROCESS_SWITCHES, KVortexConfig

__all__ = ["collect"]

_SECRETS = ("KVORTEX_REMOTE_PASSWORD",)


def collect(config: KVortexConfig | None = None, *, probe_cuda: bool = True) -> dict[str, Any]:
    """A JSON-ready report: version, hot paths, machine, CUDA, the process switches set, the
    tiers and the effective config (no secret: a password is shown as ``***``)."""
    from kvortex import __version__

    cfg = config if config is not None else KVortexConfig.from_env()
    native = _loader.native()
    return {
        "version": __version__,
        "native_core": {
            "loaded": native.ok,
            "reason": native.reason,
            "build": _loader.build_info(),
        },
        "hot_paths": {
            c.hot_path: {"active": c.active, "requested": c.requested, "reason": c.reason}
            for c in backend.describe(cfg.backend)
        },
        "cuda_extension": _cuda_extension(),
        "machine": _machine(),
        "cuda": _cuda() if probe_cuda else {"probed": False},
        "process_switches": {
            k: "***" if k in _SECRETS else v for k, v in os.environ.items() if k in PROCESS_SWITCHES
        },
        "disk_tier": _disk_tier(cfg),
        "remote_tier": _remote_tier(cfg),
        "config": cfg.redacted(),
    }


def _disk_tier(cfg: KVortexConfig) -> dict[str, Any]:
    """The disk tier as configured: where, which filesystem, O_DIRECT or not, how full."""
    if cfg.disk_path is None:
        return {"enabled": False}
    from kvortex.tiers.disk import probe

    return {"enabled": True, **probe(cfg.disk_path, cfg.disk_bytes)}


def _remote_tier(cfg: KVortexConfig) -> dict[str, Any]:
    """The shared tier as configured: reachable or not (a connection attempt of at most
    ``remote_timeout_ms``, at least 1 s), server version, standalone or cluster shape."""
    if cfg.remote_url is None:
        return {"enabled": False}
    from kvortex.tiers.redis import probe

    return {"enabled": True, **probe(cfg.remote_url, timeout_ms=max(cfg.remote_timeout_ms, 1000))}


def _cuda_extension() -> dict[str, Any]:
    """Whether the CUDA copy engine (``kvortex._cuda``) loaded, and what it sees."""
    loaded = _loader.cuda()
    if loaded.module is None:
        return {"loaded": False, "reason": loaded.reason}
    module = loaded.module
    return {
        "loaded": True,
        "reason": "",
        "devices": int(module.device_count()),
        "runtime_version": int(module.runtime_version()),
        "driver_version": int(module.driver_version()),
    }


def _machine() -> dict[str, Any]:
    nodes_dir = Path("/sys/devices/system/node")
    nodes = (
        sorted(int(p.name[4:]) for p in nodes_dir.glob("node[0-9]*") if p.name[4:].isdigit())
        if nodes_dir.is_dir()
        else []
    )
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "numa_nodes": nodes,
        "transparent_hugepages": _read("/sys/kernel/mm/transparent_hugepage/enabled"),
    }


def _cuda() -> dict[str, Any]:
    report: dict[str, Any] = {"probed": True}
    if importlib.util.find_spec("torch") is None:
        report.update(usable=False, reason="torch is not installed")
        return report
    try:
        import torch
    except Exception as exc:  # a broken torch install must not break `kvortex info`
        report.update(usable=False, reason=f"import torch failed: {exc}")
        return report

    report["torch"] = str(torch.__version__)
    if not torch.cuda.is_available():
        report.update(usable=False, reason="torch sees no CUDA device (no GPU or no driver)")
        return report
    report.update(
        usable=True,
        reason="",
        devices=[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
    )
    return report


def _cpu_model() -> str:
    text = _read("/proc/cpuinfo")
    for line in text.splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _read(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return ""
