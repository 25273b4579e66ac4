"""KVortex: a KV-cache offload and reuse engine for LLM serving.

Importing this package needs no GPU, no compiler and no vLLM.
"""

from __future__ import annotations

from kvortex.errors import (
    BackendUnavailable,
    ConfigError,
    InvalidArgumentError,
    InvalidTypeError,
    KVortexError,
    PoolClosed,
    QueueClosed,
    QueueTimeout,
    SlotError,
)

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailable",
    "ConfigError",
    "InvalidArgumentError",
    "InvalidTypeError",
    "KVortexError",
    "PoolClosed",
    "QueueClosed",
    "QueueTimeout",
    "SlotError",
    "__version__",
]
