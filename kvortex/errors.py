"""The one exception hierarchy of KVortex.

Every error KVortex raises derives from :class:`KVortexError` and, where one fits, from the
matching builtin as well, so ``except ValueError`` keeps working for callers who do not know
KVortex. The compiled core raises exactly these classes (mapped in
``csrc/bindings/errors.cc``); the pure-Python fallbacks raise them directly.
"""

from __future__ import annotations

__all__ = [
    "BackendUnavailable",
    "ConfigError",
    "EngineClosedError",
    "InvalidArgumentError",
    "InvalidTypeError",
    "KVortexError",
    "LayoutError",
    "NotRegisteredError",
    "PoolClosed",
    "QueueClosed",
    "QueueTimeout",
    "SlotError",
    "TransferError",
    "TransferTimeout",
]


class KVortexError(Exception):
    """Root of every KVortex error."""


class InvalidArgumentError(KVortexError, ValueError):
    """An argument has the right type but a value that is not allowed."""


class InvalidTypeError(KVortexError, TypeError):
    """An argument has a type (or dtype, or number of dimensions) that is not accepted."""


class ConfigError(InvalidArgumentError):
    """A configuration key is unknown, or its value has the wrong type or range."""


class BackendUnavailable(KVortexError, RuntimeError):
    """An implementation was requested explicitly but could not be loaded.

    ``reason`` carries what the loader recorded when it tried.
    """

    def __init__(self, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason


class QueueTimeout(KVortexError, TimeoutError):
    """A blocking queue operation did not complete within its timeout."""


class QueueClosed(KVortexError, RuntimeError):
    """The queue was closed: no more puts, and gets fail once it is drained."""


class SlotError(InvalidArgumentError):
    """A host-pool slot id is out of range, not allocated, or freed twice."""


class PoolClosed(KVortexError, RuntimeError):
    """The host pool was closed; it hands out no more slots or views."""


class LayoutError(InvalidArgumentError):
    """The engine's KV tensors do not form a supported paged layout, or a plan was made for
    another layout (the message says what was found)."""


class TransferError(KVortexError, RuntimeError):
    """A copy between the engine's KV cache and host memory failed (e.g. a CUDA error)."""


class NotRegisteredError(KVortexError, RuntimeError):
    """The engine has no KV cache yet: call ``register_kv_caches`` first."""


class EngineClosedError(KVortexError, RuntimeError):
    """The engine (or connector side) was closed; ``close()`` is final, nothing restarts."""


class TransferTimeout(KVortexError, TimeoutError):
    """A transfer handle's ``wait(timeout)`` ran out before the copy finished; the copy goes
    on and the handle can be waited on again."""
