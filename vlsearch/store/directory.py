"""The on-disk collection format at one version: ``CollectionDir``, the one reader and low-level writer.

::

    my-collection/
      manifest.json               the current version: model, dim, metric, counts, source, index,
                                  version, live shard numbers, tombstone file, times
      versions/v000003.json       the manifest of each recent version (readers can pin one)
      images/part-00000.parquet   id, path, width, height, captions, <metadata...>,
                                  file_size, file_mtime_ns, content_hash, record_hash, embedding
      captions/part-00000.parquet image_id, caption, embedding
      failures/part-00000.parquet path, kind, message
      keyword/part-00000/         the shard's keyword (BM25) index, a tantivy directory (vlsearch.store.keyword)
      tombstones/v000003.parquet  shard, id: rows of live shards deleted by later versions
      index.faiss                 (built by indexing.build; described in manifest["index"];
                                  a sync writes index-v000003.faiss and points the manifest at it)
      .lock                       the writer lock (flock; names the pid writing a new version: sync, compact, build)
      leases/v000003.lease        shared flocks of the readers of each version (vlsearch.store.lease)

Embeddings are stored as ``fixed_size_list<float16>[dim]``: half the disk and I/O of float32,
and the rounding (relative error ~5e-4 on unit vectors) is far below the score gaps that decide
a ranking. Readers hand out float32.

Shard ``k`` holds the source records ``[k*shard_size, (k+1)*shard_size)`` (failures included),
so resuming after a crash means skipping ``complete_shards * shard_size`` records. A shard is
committed when its ``images/`` file exists; its captions and failures files and its keyword index
are written first.

**Versions** (format 2). A finished collection changes only by whole versions (``vlsearch.store.update``):
new rows go into *new* shards, deleted rows are listed in a new tombstone file, and the version
commits when ``manifest.json`` is renamed into place (after ``versions/vNNNNNN.json``). A manifest
lists its live shards, so a reader that opened version N keeps reading exactly version N while
N+1 is written, and a crash before the rename leaves version N untouched. A reader that must keep
its files holds a *lease* on its version (``CollectionDir.open(path, lease=True)``, as a Searcher
does); files that neither the current version nor a leased one references are garbage, removed by
the next writer (:mod:`vlsearch.store.gc`). Format 1
collections (no ``shards`` list: every committed shard on disk is live) are read as they are.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa

from vlsearch.ann.faiss_index import load_index
from vlsearch.core.errors import CollectionError, CollectionMismatchError
from vlsearch.core.modelinfo import ModelInfo
from vlsearch.store import gc
from vlsearch.store.layout import FAILURES_DIR, IMAGES_DIR, INDEX_FILE, LOCK_FILE, MANIFEST, now_iso
from vlsearch.store.lease import VersionLease, lease_version
from vlsearch.store.lock import CollectionLock
from vlsearch.store.manifest import Manifest, read_manifest, write_manifest
from vlsearch.store.shards import ShardFiles


class CollectionDir:
    """A collection directory at one version: manifest and versions, shard io and dead rows
    (:class:`~vlsearch.store.shards.ShardFiles`), garbage collection (:mod:`vlsearch.store.gc`), the
    index and the writer lock. Cheap to open. :class:`~vlsearch.store.collection.Collection` adds
    changes by whole versions (:mod:`vlsearch.store.update` works on this class)."""

    def __init__(self, path: str | os.PathLike, manifest: Manifest, lease: VersionLease | None = None):
        self.path = Path(path)
        self.manifest = manifest
        #: the reader's lease on this version (None: not leased; see :meth:`open`)
        self.lease = lease

    @property
    def manifest(self) -> Manifest:
        return self._files.manifest

    @manifest.setter
    def manifest(self, manifest: Manifest) -> None:
        self._files = ShardFiles(self.path, manifest)  # another version: its tombstones are read afresh

    # ---- opening / creating -------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike, version: int | None = None, lease: bool = False) -> "CollectionDir":
        """Open an existing collection (its current version, or an earlier ``version`` still kept
        under ``versions/``); raises CollectionNotFoundError / CollectionError. ``lease=True``
        holds a lease on the version (:mod:`vlsearch.store.lease`): no writer removes its files
        until :meth:`release` (or this process exits)."""
        if lease:
            return cls(Path(path), *lease_version(path, version))
        return cls(Path(path), read_manifest(Path(path), version))

    def release(self) -> None:
        """Let go of this version's lease, if held (its files may then be garbage-collected)."""
        if self.lease is not None:
            self.lease.release()

    def reopen(self) -> "CollectionDir":
        """The collection's newest version, opened afresh (this object keeps the version it has)."""
        return type(self).open(self.path)

    def with_manifest(self, manifest: Manifest) -> "CollectionDir":
        """A view of the same directory under another manifest (a version being staged; not leased)."""
        return type(self)(self.path, manifest)

    @classmethod
    def create(cls, path: str | os.PathLike, manifest: Manifest) -> "CollectionDir":
        """Create the directory and write a first manifest (refuses to overwrite one)."""
        path = Path(path)
        if (path / MANIFEST).exists():
            raise CollectionError(f"a collection already exists at {path}")
        path.mkdir(parents=True, exist_ok=True)
        coll = cls(path, manifest)
        coll.save_manifest()
        return coll

    # ---- manifest and versions -----------------------------------------------------------
    @property
    def model(self) -> ModelInfo:
        return self.manifest.model

    @property
    def dim(self) -> int:
        return self.manifest.model.dim

    def save_manifest(self) -> None:
        write_manifest(self.path, self.manifest)

    def update_manifest(self, **changes: Any) -> Manifest:
        """Replace fields of the manifest, stamp ``updated_at`` and write it atomically."""
        self.manifest = replace(self.manifest, updated_at=now_iso(), **changes)
        self.save_manifest()
        return self.manifest

    def commit_version(self, **changes: Any) -> Manifest:
        """Write the next version (``version + 1``, format 2, live shard list made explicit):
        ``versions/vN.json`` first, then ``manifest.json`` (the commit point); then remove the
        files neither this version nor a leased one references."""
        new = self.manifest.next_version(self.shard_numbers(), **changes)
        write_manifest(self.path, new, version_file=True)
        self.manifest = new
        self.collect_garbage()
        return new

    def lock(self, wait: float | None = None) -> CollectionLock:
        """The exclusive writer lock (an flock on ``.lock``), re-entrant in the thread holding it:
        raises CollectionLockedError naming the holder when another thread or process keeps it
        past ``wait`` seconds (None: :func:`vlsearch.store.lock.lock_wait`'s, by default 0). The
        kernel frees it when its holder dies."""
        return CollectionLock(self.path / LOCK_FILE, wait)

    def check_model(self, model: ModelInfo, *, what: str = "model") -> None:
        """Refuse a model whose embedding space differs from the collection's."""
        mine = self.manifest.model
        if (model.name, model.pretrained, model.dim) != (mine.name, mine.pretrained, mine.dim):
            raise CollectionMismatchError(
                f"{what} {model.name} (pretrained={model.pretrained}, dim={model.dim}) does not match "
                f"collection {self.path}, built with {mine.name} (pretrained={mine.pretrained}, dim={mine.dim}); "
                "embeddings from different models are not comparable"
            )

    # ---- index ---------------------------------------------------------------------------
    @property
    def index_path(self) -> Path:
        """The index file of this version (``index.faiss`` unless a sync wrote a newer one)."""
        return self.path / ((self.manifest.index or {}).get("file") or INDEX_FILE)

    def has_index(self) -> bool:
        return self.manifest.index is not None and self.index_path.is_file()

    def load_index(self, mmap: bool = False) -> Any:
        """This version's FAISS index, checked against the collection's model and dimension
        (IndexNotBuiltError when it has none; see :func:`vlsearch.ann.faiss_index.load_index`)."""
        return load_index(self.index_path, self.manifest.index, self.model, mmap=mmap)

    # ---- garbage collection (vlsearch.store.gc; only while holding the lock) --------------
    def referenced_files(self) -> set[Path]:
        return gc.referenced_files(self.path, self.manifest)

    def collect_garbage(self) -> list[Path]:
        return gc.collect_garbage(self.path, self.manifest)

    def remove_uncommitted(self) -> list[Path]:
        return gc.remove_uncommitted(self.path, self.manifest)

    # ---- shard io and dead rows (vlsearch.store.shards.ShardFiles) ------------------------
    def shard_paths(self, kind: str = IMAGES_DIR) -> list[Path]:
        return self._files.shard_paths(kind)

    def shard_numbers(self, kind: str = IMAGES_DIR) -> list[int]:
        return self._files.shard_numbers(kind)

    def next_shard_number(self) -> int:
        return self._files.next_shard_number()

    def dead_rows(self) -> dict[int, np.ndarray]:
        return self._files.dead_rows

    def live_mask(self, path: Path, ids: np.ndarray) -> np.ndarray | None:
        return self._files.live_mask(path, ids)

    def write_shard(self, number: int, images: pa.Table, captions: pa.Table | None = None,
                    failures: pa.Table | None = None) -> None:
        self._files.write_shard(number, images, captions, failures)

    def read_table(self, kind: str = IMAGES_DIR, columns: Sequence[str] | None = None) -> pa.Table:
        return self._files.read_table(kind, columns)

    def read_shard(self, path: Path, kind: str = IMAGES_DIR, columns: Sequence[str] | None = None) -> pa.Table:
        return self._files.read_shard(path, kind, columns)

    def failures(self) -> pa.Table:
        return self.read_table(FAILURES_DIR)

    def iter_embeddings(self, kind: str = IMAGES_DIR, batch_size: int = 65_536, id_column: str | None = None,
                        paths: Sequence[Path] | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        return self._files.iter_embeddings(kind, batch_size, id_column, paths)

    def read_embeddings(self, kind: str = IMAGES_DIR, id_column: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        return self._files.read_embeddings(kind, id_column)

    def count(self, kind: str = IMAGES_DIR) -> int:
        return self._files.count(kind)

    def __repr__(self) -> str:
        m = self.manifest
        return f"Collection({str(self.path)!r}, model={m.model.name}, dim={m.model.dim}, images={m.counts.get('images')})"
