"""``ByteLRU``: the one least-recently-used cache of vlsearch, bounded by the bytes its values hold.

A ``cachetools.LRUCache`` whose ``getsizeof`` measures each value (numpy arrays, Arrow tables,
bytes) behind one lock, with hit and miss counters for metrics. Every cache (row groups, query
texts, subset vectors, filter results, thumbnails) is one of these, so each has a byte budget.

    cache = ByteLRU(64 << 20)
    value = cache.get(key)
    if value is None:
        value = cache.put(key, compute())
"""

from __future__ import annotations

import sys
import threading
from typing import Any, Callable, Hashable, TypeVar

import cachetools

V = TypeVar("V")


def nbytes(value: Any) -> int:
    """Bytes a cached value holds: ``nbytes`` of numpy arrays and Arrow tables, ``len`` of bytes,
    the sum over tuples and lists, else ``sys.getsizeof``."""
    size = getattr(value, "nbytes", None)
    if isinstance(size, int):
        return size
    if isinstance(value, (bytes, bytearray, memoryview, str)):
        return len(value)
    if isinstance(value, (tuple, list)):
        return sum(nbytes(v) for v in value) + sys.getsizeof(value)
    return sys.getsizeof(value)


class ByteLRU:
    """A thread-safe LRU map holding at most ``max_bytes`` of values (0: holds nothing).

    A value larger than the whole budget is not stored. ``sizeof`` measures a value (default
    :func:`nbytes`)."""

    def __init__(self, max_bytes: int, sizeof: Callable[[Any], int] = nbytes):
        self.max_bytes = max(int(max_bytes), 0)
        self._cache: cachetools.LRUCache = cachetools.LRUCache(maxsize=self.max_bytes, getsizeof=sizeof)
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, key: Hashable) -> Any | None:
        """The value stored under ``key`` (now the most recently used), or None."""
        with self._lock:
            value = self._cache.get(key)
            if value is None:
                self.misses += 1
            else:
                self.hits += 1
            return value

    def put(self, key: Hashable, value: V) -> V:
        """Store ``value`` (evicting the least recently used as needed); returns it."""
        with self._lock:
            try:
                self._cache[key] = value
            except ValueError:  # larger than the whole budget: not cached
                self._cache.pop(key, None)
        return value

    def clear(self) -> None:
        with self._lock:
            self._cache.clear()

    @property
    def nbytes(self) -> int:
        """Bytes held now."""
        return int(self._cache.currsize)

    def __len__(self) -> int:
        return len(self._cache)

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._cache
