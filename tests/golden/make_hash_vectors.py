"""Write tests/golden/hash_vectors.json: chunk keys computed straight from docs/keys.md.

This is a second, deliberately naive implementation of the key format (struct + hashlib, no
kvortex import), so the golden file pins both KVortex backends to the specification rather
than to either of them. Regenerate only when the format version changes:

    python tests/golden/make_hash_vectors.py
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

TAG = b"KVortex/chunk-hash/v1\x00"


def reference_keys(tokens: list[int], chunk_tokens: int, namespace: bytes) -> list[str]:
    prev = hashlib.sha256(TAG + struct.pack("<I", len(namespace)) + namespace).digest()
    keys = []
    for start in range(0, len(tokens) - chunk_tokens + 1, chunk_tokens):
        chunk = tokens[start : start + chunk_tokens]
        prev = hashlib.sha256(prev + struct.pack(f"<{len(chunk)}I", *chunk)).digest()
        keys.append(prev.hex())
    return keys


def pseudo_tokens(n: int, seed: int, limit: int = 128_256) -> list[int]:
    """Reproducible ids below ``limit`` (a 64-bit LCG; no dependence on random's algorithm)."""
    out, state = [], seed
    for _ in range(n):
        state = (state * 6364136223846793005 + 1442695040888963407) % 2**64
        out.append((state >> 33) % limit)
    return out


CASES: list[tuple[str, list[int], int, bytes]] = [
    ("empty", [], 256, b""),
    ("one token", [42], 256, b""),
    ("chunk - 1", pseudo_tokens(255, 1), 256, b""),
    ("one chunk", pseudo_tokens(256, 2), 256, b""),
    ("chunk + 1", pseudo_tokens(257, 3), 256, b""),
    ("three chunks", pseudo_tokens(768, 4), 256, b""),
    ("three chunks and a partial one", pseudo_tokens(3 * 16 + 5, 5), 16, b""),
    ("ids near 2**32", [2**32 - 1, 2**32 - 2, 0, 2**31, 2**31 - 1, 2**16, 255, 256] * 4, 16, b""),
    ("namespace", pseudo_tokens(40, 6), 16, b"llama-3-8b|bf16|tp0/1|tenant-7"),
    ("namespace with NUL bytes", pseudo_tokens(32, 7), 16, b"\x00\x01\x00"),
    ("chunk_tokens 1", [0, 1, 2, 3, 2**32 - 1], 1, b""),
    ("chunk_tokens 1 with namespace", [7, 7, 7], 1, b"ns"),
]


def main() -> None:
    cases = [
        {
            "name": name,
            "chunk_tokens": chunk_tokens,
            "namespace_hex": namespace.hex(),
            "tokens": tokens,
            "keys": reference_keys(tokens, chunk_tokens, namespace),
        }
        for name, tokens, chunk_tokens, namespace in CASES
    ]
    # One case per line keeps the file diffable without one line per token id.
    body = ",\n  ".join(json.dumps(case) for case in cases)
    text = (
        '{\n "format": "KVortex chunk-hash v1 (docs/keys.md)",\n'
        ' "generator": "tests/golden/make_hash_vectors.py",\n'
        f' "cases": [\n  {body}\n ]\n}}\n'
    )
    json.loads(text)  # well-formed
    Path(__file__).with_name("hash_vectors.json").write_text(text)


if __name__ == "__main__":
    main()
