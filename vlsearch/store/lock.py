"""The collection's writer lock (``.lock``): one writer at a time, across processes and threads.

The lock is an ``fcntl.flock`` on ``.lock``, taken on a fresh open file description. The kernel
drops it when its holder exits, however it dies, so a ``kill -9``-ed writer leaves no lock to take
over. ``.lock`` itself is never removed: unlinking a flock file lets two processes lock two
different inodes of the same name. While held it reads ``pid N started TIME host H`` so that a
refused writer can name the holder.

``fcntl`` is used directly rather than ``filelock``, whose open truncates the file on every try
(a refused writer would erase the holder's name) and whose re-entrancy is per lock object.
"""

from __future__ import annotations

import contextvars
import fcntl
import os
import re
import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from vlsearch.core.errors import CollectionLockedError
from vlsearch.store.layout import now_iso

#: Seconds ``CollectionLock(wait=None)`` waits for another writer; set by :func:`lock_wait`.
_WAIT: contextvars.ContextVar[float] = contextvars.ContextVar("vlsearch_lock_wait", default=0.0)
_FIRST_PAUSE, _LONGEST_PAUSE = 0.05, 0.25  # seconds between tries while waiting
_NAME_TRIES = 20  # reads of an empty .lock before a refusal names "another process"
_HOLDER_RE = re.compile(r"^pid (\d+) started (\S+)(?: host (\S+))?")


@contextmanager
def lock_wait(seconds: float) -> Iterator[None]:
    """Inside the block, a writer lock taken without its own ``wait`` waits up to ``seconds`` for
    another writer to finish before raising CollectionLockedError (0: fail at once, the default)."""
    if seconds < 0:
        raise ValueError(f"lock wait must be >= 0 seconds, not {seconds}")
    token = _WAIT.set(float(seconds))
    try:
        yield
    finally:
        _WAIT.reset(token)


@dataclass
class _Held:
    owner: int  #: threading.get_ident() of the thread holding the lock
    depth: int
    fd: int


# The locks this process holds, by resolved path. Only the owning thread re-enters; any other thread
# opens its own file description and contends through flock like another process would.
_held: dict[Path, _Held] = {}
_held_guard = threading.Lock()


def _forget_after_fork() -> None:
    """A forked child holds none of its parent's locks. Closing its copies of their descriptors
    leaves the parent's locks as they are, and lets them go when the parent dies."""
    global _held_guard
    for held in _held.values():
        os.close(held.fd)
    _held.clear()
    _held_guard = threading.Lock()


_fork_hook = threading.Lock()  # held for good once the hook is registered (on the first lock taken, not on import)


def _register_fork_hook() -> None:
    if _fork_hook.acquire(blocking=False):
        os.register_at_fork(after_in_child=_forget_after_fork)


class CollectionLock:
    """``with coll.lock():`` — the exclusive writer lock of one collection.

    Re-entrant in the thread holding it (a sync that rebuilds the index takes it twice); another
    thread or process gets CollectionLockedError naming the holder, after waiting up to ``wait``
    seconds (None: the ambient :func:`lock_wait`, by default 0).
    """

    def __init__(self, path: str | os.PathLike, wait: float | None = None):
        self.path = Path(path)
        self.wait = wait
        self._key = self.path.resolve()

    def __enter__(self) -> "CollectionLock":
        me = threading.get_ident()
        with _held_guard:
            held = _held.get(self._key)
            if held is not None and held.owner == me:
                held.depth += 1
                return self
        fd = self._acquire(_WAIT.get() if self.wait is None else self.wait)
        try:
            _stamp(fd)
        except BaseException:
            _release(fd)
            raise
        _register_fork_hook()
        with _held_guard:
            _held[self._key] = _Held(me, 1, fd)
        return self

    def __exit__(self, *exc: Any) -> None:
        with _held_guard:
            held = _held.get(self._key)
            if held is None or held.owner != threading.get_ident():
                raise RuntimeError(f"{self.path} is not locked by this thread")
            held.depth -= 1
            if held.depth:
                return
            del _held[self._key]
        _release(held.fd)

    def _acquire(self, wait: float) -> int:
        """A descriptor of ``.lock`` holding the flock, tried until ``wait`` seconds have passed."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        deadline, pause = time.monotonic() + wait, _FIRST_PAUSE
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    return fd
                except BlockingIOError:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise CollectionLockedError(self._refusal(fd, wait)) from None
                    time.sleep(min(pause, left))
                    pause = min(2 * pause, _LONGEST_PAUSE)
        except BaseException:
            os.close(fd)
            raise

    def _refusal(self, fd: int, waited: float) -> str:
        after = f" after waiting {waited:g} s" if waited else ""
        return (f"collection {self.path.parent} is locked by {_holder(fd)}{after}: another sync, compact or "
                "build-index is writing it; wait for it to finish, or rerun with --wait SECONDS")


def _stamp(fd: int) -> None:
    """Write who holds the lock into ``.lock`` (truncated first: it may name an earlier holder)."""
    text = f"pid {os.getpid()} started {now_iso()} host {socket.gethostname()}\n".encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, text, 0)
    os.fsync(fd)


def _release(fd: int) -> None:
    try:
        os.ftruncate(fd, 0)  # the holder's name goes with the lock
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _holder(fd: int) -> str:
    """``pid N (started T)`` from ``.lock``: read again for a moment while it is empty (the holder
    has just taken the lock), then "another process"."""
    for _ in range(_NAME_TRIES):
        match = _HOLDER_RE.match(_read(fd))
        if match is not None:
            pid, started, host = match.groups()
            where = f" on host {host}" if host and host != socket.gethostname() else ""
            return f"pid {pid}{where} (started {started})"
        time.sleep(_FIRST_PAUSE / 2)
    return "another process"


def _read(fd: int) -> str:
    try:
        return os.pread(fd, 512, 0).decode("utf-8", "replace")
    except OSError:
        return ""
