"""The collection's file layout: directory and file names, shard and version naming, the columns
every image shard has. Pure names, no I/O (see :mod:`vlsearch.store.collection` for the format)."""

from __future__ import annotations

import datetime as _dt
import re
from pathlib import Path

FORMAT_VERSION = 2
#: Format versions this vlsearch reads (1: before versions, tombstones and file columns).
READABLE_FORMATS = (1, 2)
MANIFEST = "manifest.json"
INDEX_FILE = "index.faiss"
IMAGES_DIR, CAPTIONS_DIR, FAILURES_DIR = "images", "captions", "failures"
VERSIONS_DIR, TOMBSTONES_DIR, LOCK_FILE = "versions", "tombstones", ".lock"
#: reader leases on versions (vlsearch.store.lease)
LEASES_DIR = "leases"
EMBEDDING_DTYPE = "float16"
#: Columns every image shard has; any other column (except ``embedding``) is user metadata.
IMAGE_COLUMNS = ("id", "path", "width", "height", "captions")
#: Per-row facts about the source file that let a sync detect changes (format 2; null if unknown):
#: size and mtime (cheap check), blake2b-128 of the image bytes (confirms a change, finds renames)
#: and blake2b of the record's path, captions and metadata.
FILE_COLUMNS = ("file_size", "file_mtime_ns", "content_hash", "record_hash")
SHARD_FILE_RE = re.compile(r"^part-(\d{5,})\.parquet$")


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def shard_name(number: int) -> str:
    return f"part-{number:05d}.parquet"


def version_name(version: int, suffix: str) -> str:
    return f"v{version:06d}{suffix}"


def shard_number(path: Path) -> int:
    return int(SHARD_FILE_RE.match(path.name).group(1))

