"""What the cache did lately: counters over an interval and the INFO log line that shows them.

Both the standalone engine and the vLLM connector's scheduler side count their lookups, hit
tokens and bytes moved here, and log one line per ``log_interval_s`` (config) when anything
happened::

    kvortex: 10.0 s: 12 lookups, 6144 hit tokens of 8192 prompt tokens (75.0 %),
    loaded 3.00 GiB, stored 1.00 GiB, 0 evictions   (one line in the log)

Not thread safe: the owner counts under its own lock.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, fields

__all__ = ["Activity", "ActivityLog"]

log = logging.getLogger("kvortex")

_GIB = float(2**30)


@dataclass
class Activity:
    """Counters of one interval."""

    lookups: int = 0
    prompt_tokens: int = 0
    hit_tokens: int = 0
    loaded_bytes: int = 0
    stored_bytes: int = 0
    evictions: int = 0

    @property
    def empty(self) -> bool:
        return not any(getattr(self, f.name) for f in fields(self))


class ActivityLog:
    """Counts activity and logs it every ``interval_s`` seconds (0: never logs).

    Args:
        interval_s: seconds between log lines; 0 turns the line off (counting goes on).
        clock: the time source (tests pass a fake one).
    """

    def __init__(self, interval_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval_s = float(interval_s)
        self._clock = clock
        self._since = clock()
        self.current = Activity()

    def lookup(self, prompt_tokens: int, hit_tokens: int = 0) -> None:
        self.current.lookups += 1
        self.current.prompt_tokens += prompt_tokens
        self.current.hit_tokens += hit_tokens

    def hit(self, tokens: int) -> None:
        """Tokens served from the cache for a lookup counted earlier."""
        self.current.hit_tokens += tokens

    def moved(self, *, loaded: int = 0, stored: int = 0) -> None:
        self.current.loaded_bytes += loaded
        self.current.stored_bytes += stored

    def evicted(self, count: int) -> None:
        self.current.evictions += count

    def tick(self) -> str | None:
        """Log and reset the interval's counters if it is over; the line logged, if any."""
        if self.interval_s <= 0:
            return None
        now = self._clock()
        elapsed = now - self._since
        if elapsed < self.interval_s:
            return None
        interval, self.current = self.current, Activity()
        self._since = now
        if interval.empty:
            return None
        line = format_line(elapsed, interval)
        log.info("%s", line)
        return line


def format_line(elapsed_s: float, a: Activity) -> str:
    """The log line for ``a`` over ``elapsed_s`` seconds."""
    share = 100.0 * a.hit_tokens / a.prompt_tokens if a.prompt_tokens else 0.0
    return (
        f"kvortex: {elapsed_s:.1f} s: {a.lookups} lookups, {a.hit_tokens} hit tokens of "
        f"{a.prompt_tokens} prompt tokens ({share:.1f} %), loaded {a.loaded_bytes / _GIB:.2f} "
        f"GiB, stored {a.stored_bytes / _GIB:.2f} GiB, {a.evictions} evictions"
    )
