"""Version leases: a reader holds a shared ``flock`` on ``leases/vNNNNNN.lease`` while it reads
version N, and garbage collection keeps every version someone holds (:mod:`vlsearch.store.gc`).

The kernel drops a process's locks when it exits, however it exits (``kill -9`` included), so a
dead reader leaks nothing: the next writer's GC finds the lease free and reclaims the version.

Protocol (no lock between readers and the writer's commit is needed):

* a reader reads ``manifest.json`` (version N), takes a shared lock on N's lease file, and then
  checks that N is still kept (``versions/vN.json`` exists, or N is still current); if a GC removed
  N in between, it lets go and starts again from the newer ``manifest.json``;
* GC (under the writer lock) takes an *exclusive*, non-blocking lock on each older version's lease
  file; where it gets one, no reader holds that version: ``versions/vN.json`` goes first, then the
  files no kept version needs, then the lease file, and only then the exclusive lock.
"""

from __future__ import annotations

import errno
import fcntl
import os
import threading
import weakref
from pathlib import Path

from vlsearch.core.errors import CollectionError, CollectionNotFoundError
from vlsearch.store.layout import LEASES_DIR, version_name
from vlsearch.store.manifest import Manifest, manifest_path, read_manifest

#: Attempts at leasing the current version while writers keep committing newer ones.
LEASE_ATTEMPTS = 20


def lease_path(directory: Path, version: int) -> Path:
    return Path(directory) / LEASES_DIR / version_name(version, ".lease")


class VersionLease:
    """A shared lock on one version of a collection; :meth:`release` (or garbage collection of
    this object, or the process's exit) lets it go. ``fd`` is None where the collection is
    read-only to this process: then no writer can remove anything either."""

    def __init__(self, directory: Path, version: int, fd: int | None):
        self.directory, self.version = Path(directory), version
        self._fd = fd
        self._mutex = threading.Lock()
        self._finalizer = weakref.finalize(self, _close, fd) if fd is not None else None

    @property
    def held(self) -> bool:
        return self._finalizer is not None and self._finalizer.alive

    def release(self) -> None:
        """Let the version go (idempotent)."""
        with self._mutex:
            if self._finalizer is not None:
                self._finalizer()

    def __enter__(self) -> "VersionLease":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"VersionLease({str(self.directory)!r}, version={self.version}, held={self.held})"


def _close(fd: int) -> None:
    os.close(fd)  # closing the last descriptor of the open file drops its flock


def lease_version(directory: str | os.PathLike, version: int | None = None) -> tuple[Manifest, VersionLease]:
    """Read the current manifest (or that of ``version``) and lease that version, so that no
    writer's GC removes its files until the lease is released. Raises CollectionNotFoundError
    when ``version`` is no longer kept."""
    directory = Path(directory)
    for _ in range(LEASE_ATTEMPTS):
        manifest = read_manifest(directory, version)
        lease = VersionLease(directory, manifest.version, _lock_shared(directory, manifest.version))
        if _still_kept(directory, manifest.version):
            return manifest, lease
        lease.release()
        if version is not None:
            raise CollectionNotFoundError(f"collection {directory} no longer keeps version {version}")
    raise CollectionError(f"collection {directory}: could not lease a version in {LEASE_ATTEMPTS} attempts "
                          "(it is being rewritten continuously)")


def _lock_shared(directory: Path, version: int) -> int | None:
    path = lease_path(directory, version)
    try:
        path.parent.mkdir(exist_ok=True)
        fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return None  # a read-only collection: nobody can garbage-collect it
        raise
    fcntl.flock(fd, fcntl.LOCK_SH)  # waits only while a GC is deleting this very version
    return fd


def _still_kept(directory: Path, version: int) -> bool:
    if manifest_path(directory, version).is_file():
        return True
    try:
        return read_manifest(directory).version == version
    except CollectionError:
        return False


class FreeVersion:
    """An exclusive hold on an unleased version's lease file, taken by GC while it deletes that
    version (readers who arrive meanwhile wait, then find the version gone and move on)."""

    def __init__(self, path: Path, version: int, fd: int):
        self.path, self.version, self._fd = path, version, fd

    def drop(self) -> None:
        """Remove the lease file, then let go of it."""
        self.path.unlink(missing_ok=True)
        os.close(self._fd)


def claim_if_free(directory: Path, version: int) -> FreeVersion | None:
    """A :class:`FreeVersion` when no reader holds ``version``, else None (it is leased)."""
    path = lease_path(directory, version)
    path.parent.mkdir(exist_ok=True)
    fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return FreeVersion(path, version, fd)


def leased_versions(directory: str | os.PathLike) -> list[int]:
    """The versions some reader (in any process, this one included) holds now."""
    folder = Path(directory) / LEASES_DIR
    return [int(p.stem[1:]) for p in sorted(folder.glob("v*.lease")) if folder.is_dir() and _held(p)]


def _held(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
