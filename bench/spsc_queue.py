"""SPSC queue throughput: the native ring vs the Python fallback vs queue.Queue, in one run.

Cases:
- ``2 threads``: a producer thread put()s N integers, a consumer thread get()s them; items per
  second from both threads' start to the consumer's last get. Blocking calls, so every time the
  queue runs full or empty the GIL changes hands.
- ``1 thread``: try_put + try_get pairs in one thread (put_nowait/get_nowait for queue.Queue):
  the bare per-call cost, no hand-off; list.append + list.pop shows the interpreter's floor
  for two C method calls.

Run: ``PYTHONPATH=. python bench/spsc_queue.py`` (``--quick``: a smoke run; ``--json``: machine
output).
"""

from __future__ import annotations

import queue as std_queue
import sys
import threading
from collections.abc import Callable
from typing import Any

from _harness import Row, measure, parser, report

from kvortex import backend as backends
from kvortex.queue import SPSCQueue

Factory = Callable[[int], Any]


def _implementations() -> dict[str, Factory]:
    impls: dict[str, Factory] = {}
    if backends.native_reason("queue") == "":
        impls["native"] = lambda cap: SPSCQueue(cap, backend="native")
    else:
        print(f"# native queue unavailable: {backends.native_reason('queue')}", file=sys.stderr)
    impls["python"] = lambda cap: SPSCQueue(cap, backend="python")
    impls["queue.Queue"] = lambda cap: std_queue.Queue(cap)
    return impls


def two_threads(make: Factory, capacity: int, n: int) -> Callable[[], None]:
    """One timed run: a fresh queue, a producer and a consumer thread moving n integers."""

    def run() -> None:
        q = make(capacity)
        put, get = q.put, q.get  # bound once: measure the queue, not attribute lookups

        def producer() -> None:
            for i in range(n):
                put(i)

        def consumer() -> None:
            for _ in range(n):
                get()

        threads = [threading.Thread(target=consumer), threading.Thread(target=producer)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        left = q.qsize() if isinstance(q, std_queue.Queue) else len(q)
        if left:
            raise RuntimeError(f"{left} items left behind")

    return run


def one_thread(make: Factory, n: int) -> Callable[[], None]:
    q = make(64)
    if isinstance(q, std_queue.Queue):
        put, get = q.put_nowait, q.get_nowait
    elif isinstance(q, list):
        put, get = q.append, q.pop
    else:
        put, get = q.try_put, q.try_get

    def run() -> None:
        for i in range(n):
            put(i)
            get()

    return run


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--items", type=int, default=None, help="items per two-thread run")
    args = p.parse_args()
    n = args.items or (20_000 if args.quick else 100_000)
    repeat = args.repeat or (3 if args.quick else 7)
    impls = _implementations()

    rows: list[Row] = []
    ratios: dict[str, float] = {}

    def compare(label: str, rates: dict[str, float]) -> None:
        if "native" in rates:
            for base in ("python", "queue.Queue"):
                ratios[f"native/{base}, {label}"] = rates["native"] / rates[base]

    # Capacity 1 hands the GIL over on every item: fewer items keep the run short.
    for capacity, items in ((1, max(1, n // 10)), (64, n), (1024, n)):
        label = f"2 threads, capacity {capacity}"
        rates = {}
        for name, make in impls.items():
            stats = measure(two_threads(make, capacity, items), repeat=repeat, warmup=1)
            rates[name] = items / stats.median
            metrics = {"items/s": rates[name], "ns/item": 1e9 / rates[name]}
            rows.append(Row(f"{label}, {items} items", name, stats, metrics))
        compare(label, rates)

    pairs = 4 * n
    label = "1 thread, try_put+try_get"
    rates = {}
    # list.append + list.pop: two C method calls per iteration, the interpreter's floor.
    floor: dict[str, Factory] = {"list (call floor)": lambda cap: []}
    for name, make in {**impls, **floor}.items():
        stats = measure(one_thread(make, pairs), repeat=repeat, warmup=1)
        rates[name] = 2 * pairs / stats.median
        metrics = {"ops/s": rates[name], "ns/op": 1e9 / rates[name]}
        rows.append(Row(f"{label} x{pairs}", name, stats, metrics))
    compare(label, rates)
    report("SPSC queue", rows, ratios, args.json)


if __name__ == "__main__":
    main()
