"""``Follower``: a daemon thread that calls a Searcher's ``refresh()`` every ``interval`` seconds,
so that it moves to each new collection version a writer commits (``Searcher.open(path, follow=True)``).

The thread holds only a weak reference to the Searcher: a Searcher dropped without ``close()``
is still collected, and its thread ends at the next tick. Refresh errors never stop it; they go
to the ``on_error`` callback (and the Searcher keeps the last one); nothing is printed.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any, Callable

#: Seconds between two checks of ``manifest.json`` when ``follow=True``.
DEFAULT_INTERVAL = 1.0

OnError = Callable[[Exception], Any]


def follow_interval(follow: bool | float) -> float | None:
    """The polling interval ``follow`` asks for (None: do not follow); ValueError unless positive."""
    if follow is False or follow is None:
        return None
    interval = DEFAULT_INTERVAL if follow is True else float(follow)
    if not interval > 0:
        raise ValueError(f"follow must be True, False or a positive number of seconds, not {follow!r}")
    return interval


class Follower:
    """Calls ``target.refresh()`` every ``interval`` seconds in a daemon thread until :meth:`stop`
    (or until ``target`` is garbage collected). An exception of a refresh is passed to ``on_error``."""

    def __init__(self, target: Any, interval: float, on_error: OnError | None = None, name: str = "vlsearch-follow"):
        self.interval = interval
        self._stop = threading.Event()
        weakref.finalize(target, self._stop.set)
        self._thread = threading.Thread(target=_run, args=(weakref.ref(target), interval, self._stop, on_error),
                                        name=name, daemon=True)
        self._thread.start()

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout: float | None = None) -> None:
        """Stop following and wait (at most ``timeout`` s) for a refresh in progress to end."""
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)


def _run(ref: "weakref.ref[Any]", interval: float, stop: threading.Event, on_error: OnError | None) -> None:
    while not stop.wait(interval):
        target = ref()
        if target is None:
            return
        try:
            target.refresh()
        except Exception as exc:  # the version being read keeps serving; the next tick tries again
            if on_error is not None:
                try:
                    on_error(exc)
                except Exception:  # a failing callback must not stop the following
                    pass
        finally:
            del target
