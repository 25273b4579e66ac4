"""Chunk keys and the namespace that keeps incompatible KV apart.

A chunk key is the chained SHA-256 of :func:`kvortex.hash_chunks` (byte format in
``docs/keys.md``) with the namespace's canonical bytes as the hash's ``namespace`` input. Two
namespaces that differ in anything that changes the KV bytes (model, layout fingerprint, dtype,
tensor-parallel size) or in the tenant salt give unrelated keys: a mismatch is a miss, never a
wrong answer.

Tensor parallelism: the scheduler plans once for all ranks with the rank-free namespace, and
every worker keeps its own shard in the same host slot. Tiers shared between ranks or machines
(disk, Redis) store each shard under :meth:`Namespace.for_rank`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from kvortex.errors import InvalidArgumentError
from kvortex.hashing import hash_chunks

__all__ = ["ChunkKey", "Namespace"]

ChunkKey = bytes
_NAMESPACE_VERSION = 1


@dataclass(frozen=True)
class Namespace:
    """Everything that must match for stored KV to be reusable.

    Attributes:
        model: the model's name plus anything else that changes its KV (revision,
            quantisation); the caller decides, e.g. ``"meta-llama/Llama-3-8B@main"``.
        layout: the :attr:`~kvortex.layout.PagedLayout.fingerprint` of the engine's KV cache.
        dtype: the KV dtype (``"torch.bfloat16"``).
        tp_size: tensor-parallel size (a shard of a TP=2 model is not one of a TP=4 model).
        tp_rank: ``None`` for the rank-free scheduler namespace, else the worker's rank.
        tenant_salt: tenants with different salts never share prefixes.
    """

    model: str
    layout: str = ""
    dtype: str = ""
    tp_size: int = 1
    tp_rank: int | None = None
    tenant_salt: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise InvalidArgumentError(f"model must be a non-empty string, got {self.model!r}")
        if isinstance(self.tp_size, bool) or not isinstance(self.tp_size, int) or self.tp_size < 1:
            raise InvalidArgumentError(f"tp_size must be a positive int, got {self.tp_size!r}")
        if self.tp_rank is not None and not 0 <= self.tp_rank < self.tp_size:
            raise InvalidArgumentError(f"tp_rank {self.tp_rank} is not in [0, {self.tp_size})")

    def for_rank(self, rank: int) -> Namespace:
        """This namespace for one tensor-parallel worker's shard."""
        return Namespace(self.model, self.layout, self.dtype, self.tp_size, rank, self.tenant_salt)

    def encode(self) -> bytes:
        """Canonical bytes: versioned, sorted-key JSON (the ``namespace`` input of the hash)."""
        fields: dict[str, Any] = {"v": _NAMESPACE_VERSION, **asdict(self)}
        return json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()

    def chunk_keys(
        self, tokens: Sequence[int] | Any, chunk_tokens: int, *, backend: str | None = None
    ) -> list[ChunkKey]:
        """One key per full chunk of ``tokens`` in this namespace."""
        return hash_chunks(tokens, chunk_tokens, namespace=self.encode(), backend=backend)
