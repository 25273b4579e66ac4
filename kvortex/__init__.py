"""KVortex: a KV-cache offload and reuse engine for LLM serving.

Importing this package needs no GPU, no compiler, no torch and no vLLM (torch is imported
only when an engine is given KV tensors). The hot paths exported
here each run on the compiled core when it is built, else on a pure-Python fallback
(``kvortex info`` says which and why).
"""

from __future__ import annotations

from kvortex.config import KVortexConfig
from kvortex.engine import KVortexEngine
from kvortex.errors import (
    BackendUnavailable,
    ConfigError,
    EngineClosedError,
    InvalidArgumentError,
    InvalidTypeError,
    KVortexError,
    LayoutError,
    NotRegisteredError,
    PoolClosed,
    QueueClosed,
    QueueTimeout,
    SlotError,
    TransferError,
    TransferTimeout,
)
from kvortex.hashing import hash_chunks
from kvortex.memory import HostSlabPool
from kvortex.queue import SPSCQueue

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailable",
    "ConfigError",
    "EngineClosedError",
    "HostSlabPool",
    "InvalidArgumentError",
    "InvalidTypeError",
    "KVortexConfig",
    "KVortexEngine",
    "KVortexError",
    "LayoutError",
    "NotRegisteredError",
    "PoolClosed",
    "QueueClosed",
    "QueueTimeout",
    "SPSCQueue",
    "SlotError",
    "TransferError",
    "TransferTimeout",
    "__version__",
    "hash_chunks",
]
