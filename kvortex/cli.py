"""The ``kvortex`` command line."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from kvortex.config import KVortexConfig
from kvortex.errors import KVortexError

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kvortex", description="KVortex KV-cache engine")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="show active backends, why, and the effective config")
    info.add_argument("--json", action="store_true", help="print as JSON")
    info.add_argument("--config", metavar="YAML", help="read configuration from this YAML file")
    info.add_argument("--no-cuda", action="store_true", help="do not import torch to probe CUDA")
    args = parser.parse_args(argv)

    try:
        if args.command == "info":
            return _info(args)
    except KVortexError as exc:
        print(f"kvortex: error: {exc}", file=sys.stderr)
        return 2
    parser.error(f"unknown command {args.command!r}")
    return 2


def _info(args: argparse.Namespace) -> int:
    from kvortex.info import collect

    # `is not None`: an empty --config "" is an error to report, not "no file".
    if args.config is not None:
        config = KVortexConfig.from_yaml(args.config)
    else:
        config = KVortexConfig.from_env()
    report = collect(config, probe_cuda=not args.no_cuda)
    if args.json:
        json.dump(report, sys.stdout, indent=2, sort_keys=False)
        sys.stdout.write("\n")
    else:
        _print_info(report)
    return 0


def _print_info(report: dict[str, Any]) -> None:
    native = report["native_core"]
    print(f"kvortex {report['version']}")
    state = "loaded" if native["loaded"] else f"not loaded ({native['reason']})"
    print(f"native core: {state}")
    print("hot paths:")
    for name, choice in report["hot_paths"].items():
        print(f"  {name:<8} {choice['active']:<7} {choice['reason']}")
    m = report["machine"]
    print(f"machine: {m['cpu_model']}, {m['cpu_count']} CPUs, NUMA nodes {m['numa_nodes']}")
    print(f"  transparent hugepages: {m['transparent_hugepages'] or 'unknown'}")
    ext = report["cuda_extension"]
    if ext["loaded"]:
        print(
            f"cuda copy engine: loaded, {ext['devices']} device(s), runtime "
            f"{ext['runtime_version']}, driver {ext['driver_version'] or 'none'}"
        )
    else:
        print(f"cuda copy engine: not loaded ({ext['reason']})")
    cuda = report["cuda"]
    if not cuda["probed"]:
        print("cuda: not probed (--no-cuda)")
    elif cuda["usable"]:
        print(f"cuda: usable, torch {cuda['torch']}, devices {cuda['devices']}")
    else:
        print(f"cuda: unusable ({cuda['reason']})")
    switches = report["process_switches"]
    if switches:
        print("process switches: " + ", ".join(f"{k}={v}" for k, v in switches.items()))
    disk = report["disk_tier"]
    if not disk["enabled"]:
        print("disk tier: off (no disk_path)")
    else:
        direct = {True: "O_DIRECT", False: "buffered (no O_DIRECT here)", None: "?"}
        print(
            f"disk tier: {disk['path']} ({disk['filesystem']}, "
            f"{direct[disk.get('direct_io')]}), {_gib(disk['used'])} of "
            f"{_gib(disk['capacity'])} used in {disk['segments']} segments"
            + ("" if disk["exists"] else "; directory not created yet")
            + (f"; {disk['problem']}" if "problem" in disk else "")
        )
    remote = report["remote_tier"]
    if not remote["enabled"]:
        print("shared tier: off (no remote_url)")
    elif remote["reachable"]:
        print(
            f"shared tier: {remote['url']} reachable ({remote['mode']}, {remote['server']}, "
            f"{remote['masters']} master(s), {remote['replicas']} replica(s), ping "
            f"{remote['ping_ms']:.2f} ms)"
        )
    else:
        print(f"shared tier: {remote['url']} NOT reachable ({remote['problem']})")
    print("config:")
    for key, value in report["config"].items():
        note = ""
        if key == "backend" and value is None:  # inherit: say what it resolved to
            default = next(iter(report["hot_paths"].values()))["requested"]
            note = f"  (inherit: process default {default!r})"
        print(f"  {key} = {value!r}{note}")


def _gib(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB"


if __name__ == "__main__":
    raise SystemExit(main())
