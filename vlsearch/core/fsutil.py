"""Atomic file writes (write to a temporary name beside the target, fsync, then rename), and
finding a dataset folder's manifest."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write to; on success it is fsynced and renamed onto ``path``.

    On error the temporary file is removed and ``path`` is left untouched, so a crash never
    leaves a half-written file under the final name.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write ``data`` as pretty JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def fsync_file(path: str | os.PathLike) -> int:
    """fsync a file written in place (e.g. through a shared memory map); returns its size."""
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())
        return os.fstat(fh.fileno()).st_size


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


#: A folder holding one of these (first match wins) is read as that CSV/Parquet manifest by every
#: command (train, embed, index, demo --data).
MANIFEST_NAMES = ("captions.csv", "captions.tsv", "captions.parquet", "manifest.csv", "manifest.tsv", "manifest.parquet")


def find_manifest(folder: str | os.PathLike) -> Path | None:
    """The manifest file a dataset folder holds (see :data:`MANIFEST_NAMES`), or None."""
    folder = Path(folder)
    return next((folder / n for n in MANIFEST_NAMES if (folder / n).is_file()), None)
