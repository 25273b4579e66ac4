"""A bounded single-producer / single-consumer FIFO of Python objects.

It carries work between two threads (the engine's step thread and the mover thread): one thread
puts, one thread gets. :class:`SPSCQueue` picks an implementation when constructed:

- ``native``: a lock-free ring in C++ (``kvortex._native.SPSCQueue``). The fast path takes no
  lock; a blocked call releases the GIL, spins briefly, then sleeps on an eventcount, and wakes
  every 50 ms to run signal handlers so Ctrl-C works.
- ``python``: :class:`PythonSPSCQueue`, a ``collections.deque`` guarded by a
  ``threading.Lock`` with two conditions.

Both have the same contract, and the constructor returns the implementation object itself, so a
call like ``q.put(x)`` goes straight to it with no wrapper in between. ``isinstance(q,
SPSCQueue)`` holds for either.

Contract, for both:

- ``put(obj, timeout=None)`` blocks while full; ``get(timeout=None)`` blocks while empty.
  ``timeout`` is ``None`` (wait forever), ``0`` (do not wait) or seconds (int or float); on
  expiry the call raises :class:`~kvortex.errors.QueueTimeout`.
- ``close()`` (idempotent) wakes every blocked caller. After it, ``put``/``try_put`` raise
  :class:`~kvortex.errors.QueueClosed`; ``get``/``try_get`` still return the items already
  queued and raise ``QueueClosed`` only once the queue is closed *and* empty.
- Bad arguments raise :class:`~kvortex.errors.InvalidTypeError` (a ``TypeError``) or
  :class:`~kvortex.errors.InvalidArgumentError` (a ``ValueError``) with the same class and
  message from both implementations.

The one-producer/one-consumer rule is the contract; with the GIL both implementations
nevertheless stay memory-safe if it is broken (every ring operation holds the GIL).
"""

from __future__ import annotations

import abc
import math
import threading
import time
from collections import deque
from typing import Any, Generic, NoReturn, TypeVar, cast

from kvortex import _loader
from kvortex.backend import resolve
from kvortex.errors import InvalidArgumentError, InvalidTypeError, QueueClosed, QueueTimeout

__all__ = ["MAX_CAPACITY", "PythonSPSCQueue", "SPSCQueue"]

T = TypeVar("T")

#: The largest capacity accepted (2**30 items), by both implementations.
MAX_CAPACITY = 1 << 30

# A timeout of this many seconds or more means "wait forever" (threading refuses waits beyond
# threading.TIMEOUT_MAX). csrc/bindings/queue.cc uses the same threshold.
_FOREVER_S = 1e9


class SPSCQueue(abc.ABC, Generic[T]):
    """A bounded FIFO for one producer thread and one consumer thread.

    ``SPSCQueue(capacity, *, backend=None)`` returns the chosen implementation (an instance of
    ``kvortex._native.SPSCQueue`` or of :class:`PythonSPSCQueue`; both are registered as
    ``SPSCQueue``), so method calls carry no wrapper overhead.

    Args:
        capacity: the most items held at once, an ``int`` in ``[1, 2**30]``; exactly this many,
            whatever the implementation rounds up to internally.
        backend: ``None`` (the process default, ``KVORTEX_BACKEND``), ``"auto"``, ``"native"``
            or ``"python"``. ``"native"`` raises :class:`~kvortex.errors.BackendUnavailable`
            when the compiled core is missing.

    Raises:
        InvalidTypeError: ``capacity`` is not an ``int`` (``bool`` included).
        InvalidArgumentError: ``capacity`` is below 1 or above 2**30, or ``backend`` is unknown.
    """

    __slots__ = ()

    def __new__(cls, capacity: int, *, backend: str | None = None) -> SPSCQueue[T]:
        if resolve("queue", backend) == "native":
            module = _loader.native().module
            assert module is not None  # resolve() said native is usable
            return cast("SPSCQueue[T]", module.SPSCQueue(capacity))
        return cast("SPSCQueue[T]", PythonSPSCQueue(capacity))

    # The interface, for readers and type checkers. SPSCQueue(...) never returns an instance of
    # this class itself (always an implementation's), so these bodies never run. They are not
    # abc.abstractmethods: type checkers would then refuse the SPSCQueue(...) call.

    @property
    def capacity(self) -> int:
        """The most items the queue holds at once (exactly what the constructor was given)."""
        raise NotImplementedError

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        raise NotImplementedError

    def __len__(self) -> int:
        """Items queued now (exact from either thread between the other's operations)."""
        raise NotImplementedError

    def put(self, obj: T, timeout: float | None = None) -> None:
        """Append ``obj``, blocking while the queue is full.

        Args:
            obj: any object; the same object comes out of :meth:`get`.
            timeout: ``None`` waits forever, ``0`` does not wait, else seconds (int or float).

        Raises:
            QueueTimeout: still full when the timeout expired.
            QueueClosed: the queue was closed before or during the call.
            InvalidTypeError, InvalidArgumentError: ``timeout`` is not None or a number >= 0.
        """
        raise NotImplementedError

    def get(self, timeout: float | None = None) -> T:
        """Remove and return the oldest item, blocking while the queue is empty.

        Raises:
            QueueTimeout: still empty when the timeout expired.
            QueueClosed: the queue is closed and empty (items queued before :meth:`close` are
                still returned).
            InvalidTypeError, InvalidArgumentError: ``timeout`` is not None or a number >= 0.
        """
        raise NotImplementedError

    def try_put(self, obj: T) -> bool:
        """Append ``obj`` if there is room: ``True``, else ``False``. Never blocks.

        Raises:
            QueueClosed: the queue was closed.
        """
        raise NotImplementedError

    def try_get(self) -> tuple[bool, T | None]:
        """``(True, item)`` for the oldest item, or ``(False, None)`` when empty. Never blocks.

        Raises:
            QueueClosed: the queue is closed and empty.
        """
        raise NotImplementedError

    def close(self) -> None:
        """Close the queue and wake every blocked caller. Idempotent."""
        raise NotImplementedError


def _check_capacity(capacity: object) -> int:
    # The same checks and messages as queue_new in csrc/bindings/queue.cc.
    if not isinstance(capacity, int) or isinstance(capacity, bool):
        raise InvalidTypeError(
            f"capacity must be an int, got {capacity!r} of type {type(capacity).__name__}"
        )
    if not 1 <= capacity <= MAX_CAPACITY:
        raise InvalidArgumentError(
            f"capacity must be between 1 and {MAX_CAPACITY}, got {capacity!r}"
        )
    return capacity


def _parse_timeout(timeout: object) -> float | None:
    """``None`` for "forever", else seconds >= 0 (same rules as parse_timeout in queue.cc)."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise InvalidTypeError(
            "timeout must be None or a number of seconds (int or float), "
            f"got {timeout!r} of type {type(timeout).__name__}"
        )
    # No float() before the range checks: an int beyond float range (10**400) compares fine.
    if timeout < 0 or (isinstance(timeout, float) and math.isnan(timeout)):
        raise InvalidArgumentError(f"timeout must be None or >= 0 seconds, got {timeout!r}")
    if timeout >= _FOREVER_S:
        return None
    return float(timeout)


class PythonSPSCQueue(Generic[T]):
    """The pure-Python implementation of :class:`SPSCQueue` (same contract).

    A deque under one lock with two conditions. Waiters are counted so that the common put or
    get, with nobody waiting, skips ``Condition.notify`` (which is not free).
    """

    __slots__ = (
        "__weakref__",
        "_capacity",
        "_closed",
        "_getters",
        "_items",
        "_lock",
        "_not_empty",
        "_not_full",
        "_putters",
    )

    def __init__(self, capacity: int) -> None:
        self._capacity = _check_capacity(capacity)
        self._items: deque[T] = deque()
        self._lock = threading.Lock()
        self._not_empty = threading.Condition(self._lock)
        self._not_full = threading.Condition(self._lock)
        self._closed = False
        self._getters = 0  # threads blocked in get(), under _lock
        self._putters = 0  # threads blocked in put(), under _lock

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def closed(self) -> bool:
        return self._closed

    def __len__(self) -> int:
        return len(self._items)

    def __reduce__(self) -> NoReturn:
        # A queue is a channel between two live threads; a copy would be a disconnected one.
        raise TypeError("an SPSCQueue cannot be pickled or copied")

    def __repr__(self) -> str:
        state = " closed" if self._closed else ""
        return f"<PythonSPSCQueue capacity={self._capacity} len={len(self._items)}{state}>"

    def put(self, obj: T, timeout: float | None = None) -> None:
        """Append ``obj``, blocking while full; see :meth:`SPSCQueue.put`."""
        seconds = _parse_timeout(timeout)
        with self._lock:
            if self._closed:
                raise QueueClosed("put() on a closed queue")
            if len(self._items) >= self._capacity:
                self._wait(self._not_full, "put", timeout, seconds)
            self._items.append(obj)
            if self._getters:
                self._not_empty.notify()

    def get(self, timeout: float | None = None) -> T:
        """Remove and return the oldest item, blocking while empty; see :meth:`SPSCQueue.get`."""
        seconds = _parse_timeout(timeout)
        with self._lock:
            if not self._items:
                self._wait(self._not_empty, "get", timeout, seconds)
            item = self._items.popleft()
            if self._putters:
                self._not_full.notify()
            return item

    def try_put(self, obj: T) -> bool:
        """Append ``obj`` if there is room; see :meth:`SPSCQueue.try_put`."""
        with self._lock:
            if self._closed:
                raise QueueClosed("try_put() on a closed queue")
            if len(self._items) >= self._capacity:
                return False
            self._items.append(obj)
            if self._getters:
                self._not_empty.notify()
            return True

    def try_get(self) -> tuple[bool, T | None]:
        """``(True, item)`` or ``(False, None)``; see :meth:`SPSCQueue.try_get`."""
        with self._lock:
            if not self._items:
                if self._closed:
                    raise QueueClosed("try_get() on a closed and empty queue")
                return (False, None)
            item = self._items.popleft()
            if self._putters:
                self._not_full.notify()
            return (True, item)

    def close(self) -> None:
        """Close and wake every blocked caller; see :meth:`SPSCQueue.close`."""
        with self._lock:
            self._closed = True
            self._not_empty.notify_all()
            self._not_full.notify_all()

    def _wait(
        self, cond: threading.Condition, op: str, timeout: object, seconds: float | None
    ) -> None:
        """Block (``_lock`` held) until ``op`` can proceed; raise on close or timeout.

        For ``put`` it returns once there is room (and the queue is open); for ``get`` once an
        item is there (a closed queue with items still delivers them).
        """
        is_put = op == "put"
        deadline = None if seconds is None else time.monotonic() + seconds
        if is_put:
            self._putters += 1
        else:
            self._getters += 1
        try:
            while True:
                if is_put:
                    if self._closed:
                        raise QueueClosed("put() on a closed queue")
                    if len(self._items) < self._capacity:
                        return
                elif self._items:
                    return
                elif self._closed:
                    raise QueueClosed("get() on a closed and empty queue")
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    what = "full" if is_put else "empty"
                    raise QueueTimeout(
                        f"{op}() timed out after {timeout!r} s: the queue stayed {what}"
                    )
                cond.wait(remaining)
        finally:
            if is_put:
                self._putters -= 1
            else:
                self._getters -= 1


SPSCQueue.register(PythonSPSCQueue)


def _register_native() -> None:
    module = _loader.native().module
    native_type: Any = getattr(module, "SPSCQueue", None) if module is not None else None
    if native_type is not None:
        SPSCQueue.register(native_type)


_register_native()
