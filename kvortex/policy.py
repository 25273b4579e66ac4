"""Eviction policies: which stored chunk to give up when the tier is full.

Every policy implements :class:`EvictionPolicy`: it is told when a key is inserted, hit or
removed, and names a victim on demand, skipping keys the caller may not evict (pinned chunks).
All operations are O(1) amortised.

- ``"lru"``: least recently used.
- ``"s3fifo"``: S3-FIFO (a small probationary FIFO, a main FIFO with a 2-bit use counter, and a
  ghost list of recently evicted keys). One-off keys (a scan) pass through the small FIFO and
  leave without disturbing the main FIFO, so a burst of unique prompts does not flush the hot set.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Protocol

from kvortex.errors import InvalidArgumentError

__all__ = ["POLICIES", "EvictionPolicy", "LRUPolicy", "S3FIFOPolicy", "make_policy"]

Key = Hashable


class EvictionPolicy(Protocol):
    """What the Directory needs from a policy."""

    def insert(self, key: Key) -> None:
        """A new key was stored."""

    def hit(self, key: Key) -> None:
        """A stored key was used (matched or loaded)."""

    def remove(self, key: Key) -> None:
        """A key left the tier for any reason other than :meth:`victim` choosing it."""

    def victim(self, evictable: Callable[[Key], bool]) -> Key | None:
        """Choose, forget and return a key for which ``evictable(key)`` holds; None if none."""

    def __len__(self) -> int: ...


class LRUPolicy:
    """Least recently used, on an ordered dict (oldest first)."""

    def __init__(self, capacity: int) -> None:
        self._order: OrderedDict[Key, None] = OrderedDict()

    def insert(self, key: Key) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def hit(self, key: Key) -> None:
        if key in self._order:
            self._order.move_to_end(key)

    def remove(self, key: Key) -> None:
        self._order.pop(key, None)

    def victim(self, evictable: Callable[[Key], bool]) -> Key | None:
        for key in self._order:
            if evictable(key):
                del self._order[key]
                return key
        return None

    def __len__(self) -> int:
        return len(self._order)


class S3FIFOPolicy:
    """S3-FIFO: small FIFO (10% of capacity), main FIFO, ghost FIFO of evicted keys.

    A new key enters the small FIFO (or the main one if the ghost list remembers it). When the
    small FIFO is over its share, its oldest key moves to main if it was used since insertion,
    else it is evicted (and remembered as a ghost). Main is a FIFO with reinsertion: a key with
    a non-zero use counter is moved to the back with the counter decremented.
    """

    _MAX_FREQ = 3

    def __init__(self, capacity: int, small_fraction: float = 0.1) -> None:
        if capacity < 1:
            raise InvalidArgumentError(f"capacity must be >= 1, got {capacity}")
        self._small_cap = max(1, int(capacity * small_fraction))
        self._ghost_cap = capacity
        self._small: OrderedDict[Key, None] = OrderedDict()
        self._main: OrderedDict[Key, None] = OrderedDict()
        self._ghost: OrderedDict[Key, None] = OrderedDict()
        self._freq: dict[Key, int] = {}

    def insert(self, key: Key) -> None:
        self._freq[key] = 0
        if key in self._ghost:
            del self._ghost[key]
            self._main[key] = None
        else:
            self._small[key] = None

    def hit(self, key: Key) -> None:
        if key in self._freq:
            self._freq[key] = min(self._freq[key] + 1, self._MAX_FREQ)

    def remove(self, key: Key) -> None:
        self._freq.pop(key, None)
        self._small.pop(key, None)
        self._main.pop(key, None)

    def victim(self, evictable: Callable[[Key], bool]) -> Key | None:
        # Each pass over a queue either evicts, promotes, or ages a key; a full lap with
        # nothing evictable means every key is pinned (bounded by the two queue lengths).
        budget = 2 * (len(self._small) + len(self._main)) * (self._MAX_FREQ + 1) + 1
        while budget > 0 and (self._small or self._main):
            budget -= 1
            if self._small and (len(self._small) >= self._small_cap or not self._main):
                key = next(iter(self._small))
                del self._small[key]
                if self._freq[key] > 0:
                    self._freq[key] = 0
                    self._main[key] = None
                elif evictable(key):
                    self._forget(key)
                    return key
                else:
                    self._small[key] = None  # pinned: try again later
                continue
            key = next(iter(self._main))
            del self._main[key]
            if self._freq[key] > 0:
                self._freq[key] -= 1
                self._main[key] = None
            elif evictable(key):
                self._forget(key)
                return key
            else:
                self._main[key] = None
        return None

    def _forget(self, key: Key) -> None:
        del self._freq[key]
        self._ghost[key] = None
        if len(self._ghost) > self._ghost_cap:
            self._ghost.popitem(last=False)

    def __len__(self) -> int:
        return len(self._freq)


POLICIES: dict[str, Callable[[int], EvictionPolicy]] = {"lru": LRUPolicy, "s3fifo": S3FIFOPolicy}


def make_policy(name: str, capacity: int) -> EvictionPolicy:
    """The policy called ``name`` (``"lru"`` or ``"s3fifo"``) for ``capacity`` entries."""
    if name not in POLICIES:
        raise InvalidArgumentError(f"eviction={name!r}; expected one of {', '.join(POLICIES)}")
    return POLICIES[name](capacity)
