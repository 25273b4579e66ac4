"""How tiers below host memory live with faults: warnings at a bounded rate, and a circuit
breaker that stops contacting a server that keeps failing.

A tier never raises a runtime fault into its caller: it counts it, serves a miss and says so
in the log, at most once a minute per kind of fault (:class:`RateLimitedLog`). A remote tier
also keeps one :class:`CircuitBreaker` per server, so that a dead or stalled server costs a
lookup nothing instead of a timeout each time::

    CLOSED ──threshold consecutive failures──► OPEN ──backoff elapsed, next call──► HALF-OPEN
      ▲                                          ▲                                     │
      │                                          └── the probe failed: backoff doubles ┤
      └──────────────────────────── the probe (or any call) succeeded ◄────────────────┘

While OPEN every call is refused at once (the caller serves a miss). HALF-OPEN lets exactly
one call through as a probe; if that probe never reports, another is let through after one
more backoff period. The backoff starts at ``backoff_s``, doubles with every failed probe up
to ``max_backoff_s`` and returns to ``backoff_s`` on success.

Thread safety: both classes may be used from any thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = ["CircuitBreaker", "RateLimitedLog"]

log = logging.getLogger("kvortex")


class RateLimitedLog:
    """One warning per kind of fault per ``every_s`` seconds, with the count since the last."""

    def __init__(self, every_s: float = 60.0) -> None:
        self.every_s = every_s
        self._last: dict[str, float] = {}
        self._count: dict[str, int] = {}
        self._lock = threading.Lock()

    def warn(self, kind: str, message: str, level: int = logging.WARNING) -> None:
        now = time.monotonic()
        with self._lock:
            self._count[kind] = self._count.get(kind, 0) + 1
            last = self._last.get(kind)
            if last is not None and now - last < self.every_s:
                return
            self._last[kind] = now
            count, self._count[kind] = self._count[kind], 0
        log.log(level, "%s%s", message, f" ({count} since the last report)" if count > 1 else "")


CLOSED, OPEN, HALF_OPEN = "closed", "open", "half-open"


class CircuitBreaker:
    """Consecutive failures of one server open the breaker for a backoff period.

    Args:
        name: what the log lines call the server (a redacted URL, a cluster node).
        threshold: consecutive failures that open the breaker.
        backoff_s: first backoff period; doubled by each failed probe.
        max_backoff_s: the cap of the backoff period.
        clock: seconds, monotonic (tests pass a fake one).
    """

    def __init__(
        self,
        name: str,
        *,
        threshold: int = 3,
        backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        logger: RateLimitedLog | None = None,
    ) -> None:
        self.name = name
        self.threshold = threshold
        self.first_backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.backoff_s = backoff_s
        self._clock = clock
        self._log = logger if logger is not None else RateLimitedLog()
        self._lock = threading.Lock()
        self._state = CLOSED
        self._failures = 0  # consecutive
        self._until = 0.0  # OPEN: refuse until then; HALF_OPEN: the probe's deadline
        self.opened = 0  # times it opened

    @property
    def state(self) -> str:
        with self._lock:
            return self._state

    def is_open(self) -> bool:
        """Whether calls are being refused now (a query: it starts no probe)."""
        with self._lock:
            return self._state != CLOSED and self._clock() < self._until

    def allow(self) -> bool:
        """Whether a call may go to the server now. In OPEN after the backoff, the first caller
        gets True and becomes the probe (HALF-OPEN); the others keep getting False."""
        with self._lock:
            if self._state == CLOSED:
                return True
            now = self._clock()
            if now < self._until:
                return False
            self._state = HALF_OPEN
            self._until = now + self.backoff_s  # another probe if this one never reports
            return True

    def record(self, ok: bool, reason: str = "") -> None:
        """The outcome of one call that :meth:`allow` let through."""
        if ok:
            with self._lock:
                recovered = self._state != CLOSED
                self._state, self._failures, self.backoff_s = CLOSED, 0, self.first_backoff_s
            if recovered:
                self._log.warn(
                    f"breaker {self.name} closed",
                    f"kvortex: shared tier {self.name}: reachable again",
                    logging.INFO,
                )
            return
        with self._lock:
            self._failures += 1
            if self._state == HALF_OPEN:
                self.backoff_s = min(self.backoff_s * 2, self.max_backoff_s)
            elif self._state == OPEN or self._failures < self.threshold:
                return  # a call that started before the breaker opened, or not enough yet
            self._state = OPEN
            self._until = self._clock() + self.backoff_s
            self.opened += 1
            backoff, failures = self.backoff_s, self._failures
        self._log.warn(
            f"breaker {self.name} open",
            f"kvortex: shared tier {self.name}: {failures} consecutive failures"
            f"{f' ({reason})' if reason else ''}; served as misses without contacting it "
            f"for {backoff:g} s",
        )

    def describe(self) -> dict[str, Any]:
        with self._lock:
            return {
                "state": self._state,
                "consecutive_failures": self._failures,
                "backoff_s": self.backoff_s,
                "opened": self.opened,
            }
