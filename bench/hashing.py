"""Chunk hashing: the native core against the hashlib fallback, side by side.

For prompts of 4K, 32K and 128K token ids, given as a Python list (what vLLM hands over) and as
a numpy uint32 array, measures ``kvortex.hashing.hash_chunks`` with each backend: median and
p99 latency, GB/s of token bytes (4 bytes per id), and the native/python speed-up. Targets
(docs/architecture.md, Targets): native >= 1 GB/s on one core; a 128K-token prompt hashed in < 1 ms
from numpy. The ``target`` ratios are measured/target (>= 1 for throughput, <= 1 for latency
means met).

    python bench/hashing.py [--quick] [--json] [--repeat N] [--chunk-tokens 256]
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from _harness import Row, measure, parser, report

from kvortex import backend
from kvortex.hashing import hash_chunks


def implementations() -> dict[str, Callable[[object, int], list[bytes]]]:
    """The registry: the hashlib fallback (baseline) and, when it loaded, the native core."""
    impls: dict[str, Callable[[object, int], list[bytes]]] = {
        "python": lambda tokens, chunk: hash_chunks(tokens, chunk, backend="python"),  # type: ignore[arg-type]
    }
    if not backend.native_reason("hashing"):
        impls["native"] = lambda tokens, chunk: hash_chunks(tokens, chunk, backend="native")  # type: ignore[arg-type]
    return impls


def prompt(n: int) -> np.ndarray:
    """Reproducible ids below a Llama-3-sized vocabulary."""
    return ((np.arange(n, dtype=np.uint64) * 2654435761) % 128_256).astype(np.uint32)


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--chunk-tokens", type=int, default=256)
    args = p.parse_args()
    chunk = args.chunk_tokens
    sizes = [4096, 16384] if args.quick else [4096, 32768, 131072]
    impls = implementations()
    if "native" not in impls:
        print(f"# native hashing unavailable: {backend.native_reason('hashing')}")

    rows: list[Row] = []
    medians: dict[tuple[str, str], float] = {}
    for n in sizes:
        ids = prompt(n)
        sources = {"numpy": ids, "list": ids.tolist()}
        # Fewer repetitions for long prompts keep the full run well under a minute.
        repeat = args.repeat or (5 if args.quick else max(20, 400 * 4096 // n))
        for source, tokens in sources.items():
            case = f"{n // 1024}K {source}"
            expected = None
            for name, fn in impls.items():
                keys = fn(tokens, chunk)
                assert expected is None or keys == expected, f"{name} disagrees on {case}"
                expected = keys
                stats = measure(lambda fn=fn, tokens=tokens: fn(tokens, chunk), repeat=repeat)
                metrics = {"GB/s": 4 * n / stats.median / 1e9, "keys": float(len(keys))}
                rows.append(Row(case, name, stats, metrics))
                medians[(case, name)] = stats.median

    ratios: dict[str, float] = {}
    if "native" in impls:
        for n in sizes:
            for source in ("numpy", "list"):
                case = f"{n // 1024}K {source}"
                ratios[f"native/python {case}"] = (
                    medians[(case, "python")] / medians[(case, "native")]
                )
        largest = f"{sizes[-1] // 1024}K numpy"
        gbps = 4 * sizes[-1] / medians[(largest, "native")] / 1e9
        ratios[f"target native GB/s {largest} / 1 GB/s"] = gbps / 1.0
        ratios[f"target latency {largest} / 1 ms"] = medians[(largest, "native")] / 1e-3
    report(f"chunk hashing, chunk_tokens={chunk}", rows, ratios, args.json)


if __name__ == "__main__":
    main()
