"""``Lazy``: a value made on first use, once, even when several threads ask for it together."""

from __future__ import annotations

import threading
from typing import Callable, Generic, TypeVar

T = TypeVar("T")


class Lazy(Generic[T]):
    """``make()`` runs on the first :meth:`get` (double-checked under a lock); later calls return
    its value. ``value``: already made (``make`` is then never called)."""

    def __init__(self, make: Callable[[], T], value: T | None = None):
        self._make, self._value = make, value
        self._lock = threading.Lock()

    def get(self) -> T:
        if self._value is None:
            with self._lock:
                if self._value is None:
                    self._value = self._make()
        return self._value

    def set(self, value: T) -> None:
        """Replace the value (e.g. one shared with another holder)."""
        with self._lock:
            self._value = value

    @property
    def made(self) -> bool:
        return self._value is not None
