"""The collection's writer lock (``.lock``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from vlsearch.core.errors import CollectionLockedError


class CollectionLock:
    """``with coll.lock():`` — an exclusive, pid-stamped lock file created with ``O_EXCL``.

    Re-entrant within a process (a sync that rebuilds the index takes it once). A lock whose pid
    is no longer alive (a ``kill -9``) is stale and taken over.
    """

    _held: dict[Path, int] = {}

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self) -> "CollectionLock":
        if self._held.get(self.path):
            self._held[self.path] += 1
            return self
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                pid = _lock_owner(self.path)
                if pid is not None and pid != os.getpid() and _alive(pid):
                    raise CollectionLockedError(
                        f"collection {self.path.parent} is locked by pid {pid} (another sync, compact or "
                        f"build-index is writing it); wait for it to finish, or delete {self.path} if that "
                        "process is gone") from None
                self.path.unlink(missing_ok=True)  # stale: its owner died
                continue
            with os.fdopen(fd, "w") as fh:
                fh.write(f"{os.getpid()}\n")
            self._held[self.path] = 1
            return self
        raise CollectionLockedError(f"collection {self.path.parent}: could not take the lock {self.path}")

    def __exit__(self, *exc: Any) -> None:
        self._held[self.path] -= 1
        if self._held[self.path] == 0:
            del self._held[self.path]
            self.path.unlink(missing_ok=True)



def _lock_owner(path: Path) -> int | None:
    try:
        return int(path.read_text().strip() or "0") or None
    except (OSError, ValueError):
        return None



def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

