"""Host slab pool: slot operations per second and pool creation time, native vs Python.

Cases, each run on every available implementation (the Python fallback is the baseline):

- ``alloc+free``: one ``alloc()`` then one ``free()`` of that slot (the steady state of a cache
  whose pool is neither empty nor full); reported per pair.
- ``burst``: ``alloc()`` every slot of a 1024-slot pool, then ``free()`` them all; per op.
- ``view``: ``view(slot)`` of an allocated slot (a zero-copy memoryview); per call.
- ``address``: ``address(slot)``; per call.
- ``create NGiB``: ``HostSlabPool(32 MiB, N GiB / 32 MiB)`` then ``close()``; per pool.

Run: ``PYTHONPATH=. python bench/pool.py [--quick] [--json] [--repeat N]``.
"""

from __future__ import annotations

from collections.abc import Callable

from _harness import Row, Stats, measure, parser, report

from kvortex import backend
from kvortex.memory import HostSlabPool

MiB = 1 << 20
GiB = 1 << 30


def implementations() -> list[str]:
    impls = ["python"]
    if not backend.native_reason("pool"):
        impls.append("native")
    return impls


def per_op(stats: Stats, ops: int) -> Stats:
    return Stats(stats.median / ops, stats.p99 / ops, stats.runs)


def slot_ops(impl: str, batch: int, repeat: int) -> list[Row]:
    rows = []
    with HostSlabPool(4096, 1024, backend=impl) as pool:
        alloc, free, view, address = pool.alloc, pool.free, pool.view, pool.address
        held = [alloc() for _ in range(512)]  # half full: alloc and free both have work
        slot = held[0]
        assert slot is not None
        loop = range(batch)

        def pairs() -> None:
            for _ in loop:
                free(alloc())  # type: ignore[arg-type]

        def views() -> None:
            for _ in loop:
                view(slot)

        def addresses() -> None:
            for _ in loop:
                address(slot)

        cases: list[tuple[str, Callable[[], None], int]] = [
            ("alloc+free", pairs, batch),
            ("view", views, batch),
            ("address", addresses, batch),
        ]
        for name, fn, ops in cases:
            stats = per_op(measure(fn, repeat=repeat), ops)
            rows.append(Row(name, impl, stats, {"Mops/s": 1e-6 / stats.median}))
        for s in held:
            free(s)  # type: ignore[arg-type]

        def burst() -> None:
            got = [alloc() for _ in range(1024)]
            for s in got:
                free(s)  # type: ignore[arg-type]

        stats = per_op(measure(burst, repeat=repeat), 2048)
        rows.append(Row("burst", impl, stats, {"Mops/s": 1e-6 / stats.median}))
    return rows


def creation(impl: str, gib: int, repeat: int) -> Row:
    def create_close() -> None:
        HostSlabPool(32 * MiB, gib * GiB // (32 * MiB), backend=impl).close()

    return Row(f"create {gib}GiB", impl, measure(create_close, repeat=repeat), {"GiB": gib})


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    repeat = args.repeat or (5 if args.quick else 30)
    batch = 2_000 if args.quick else 20_000
    impls = implementations()
    rows: list[Row] = []
    for impl in impls:
        rows += slot_ops(impl, batch, repeat)
        for gib in (1, 4, 16):
            rows.append(creation(impl, gib, repeat))
    ratios: dict[str, float] = {}
    if "native" in impls:
        by = {(r.case, r.impl): r.stats.median for r in rows}
        for case in ("alloc+free", "burst", "view", "address", "create 16GiB"):
            ratios[f"{case} native vs python"] = by[(case, "python")] / by[(case, "native")]
    report("host slab pool", rows, ratios, args.json)


if __name__ == "__main__":
    main()
