"""The on-disk collection format — the one reader/writer used by indexer, searcher, benchmarks, tests.

::

    my-collection/
      manifest.json               the current version: model, dim, metric, counts, source, index,
                                  version, live shard numbers, tombstone file, times
      versions/v000003.json       the manifest of each recent version (readers can pin one)
      images/part-00000.parquet   id, path, width, height, captions, <metadata...>,
                                  file_size, file_mtime_ns, content_hash, record_hash, embedding
      captions/part-00000.parquet image_id, caption, embedding
      failures/part-00000.parquet path, kind, message
      tombstones/v000003.parquet  shard, id: rows of live shards deleted by later versions
      index.faiss                 (built by indexing.build; described in manifest["index"];
                                  a sync writes index-v000003.faiss and points the manifest at it)
      .lock                       pid of the process writing a new version (sync, compact, build)

Embeddings are stored as ``fixed_size_list<float16>[dim]``: half the disk and I/O of float32,
and the rounding (relative error ~5e-4 on unit vectors) is far below the score gaps that decide
a ranking. Readers hand out float32.

Shard ``k`` holds the source records ``[k*shard_size, (k+1)*shard_size)`` (failures included),
so resuming after a crash means skipping ``complete_shards * shard_size`` records. A shard is
committed when its ``images/`` file exists; its captions and failures files are written first.

**Versions** (format 2). A finished collection changes only by whole versions (``vlsearch.store.update``):
new rows go into *new* shards, deleted rows are listed in a new tombstone file, and the version
commits when ``manifest.json`` is renamed into place (after ``versions/vNNNNNN.json``). A manifest
lists its live shards, so a reader that opened version N keeps reading exactly version N while
N+1 is written, and a crash before the rename leaves version N untouched. Files that neither the
current nor the previous version references are garbage, removed by the next writer. Format 1
collections (no ``shards`` list: every committed shard on disk is live) are read as they are.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vlsearch.ann.faiss_index import load_index
from vlsearch.core.errors import CollectionError, CollectionMismatchError
from vlsearch.core.modelinfo import ModelInfo
from vlsearch.store.arrays import embeddings_to_numpy, write_table
from vlsearch.store.layout import (
    CAPTIONS_DIR, FAILURES_DIR, FORMAT_VERSION, IMAGES_DIR, INDEX_FILE, LOCK_FILE, MANIFEST, SHARD_FILE_RE,
    TOMBSTONES_DIR, VERSIONS_DIR, now_iso, shard_name, shard_number, version_name,
)
from vlsearch.store.lock import CollectionLock
from vlsearch.store.manifest import Manifest, read_manifest, write_manifest
from vlsearch.store.update import Update, compact


class Collection:
    """A collection directory: manifest, shards and (optionally) an index. Cheap to open."""

    def __init__(self, path: str | os.PathLike, manifest: Manifest):
        self.path = Path(path)
        self.manifest = manifest
        self._dead: dict[int, np.ndarray] | None = None

    # ---- opening / creating -------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike, version: int | None = None) -> "Collection":
        """Open an existing collection (its current version, or an earlier ``version`` still kept
        under ``versions/``); raises CollectionNotFoundError / CollectionError."""
        return cls(Path(path), read_manifest(Path(path), version))

    def reopen(self) -> "Collection":
        """The collection's newest version, opened afresh (this object keeps the version it has)."""
        return type(self).open(self.path)

    def with_manifest(self, manifest: Manifest) -> "Collection":
        """A view of the same directory under another manifest (a version being staged)."""
        return type(self)(self.path, manifest)

    @classmethod
    def create(cls, path: str | os.PathLike, manifest: Manifest) -> "Collection":
        """Create the directory and write a first manifest (refuses to overwrite one)."""
        path = Path(path)
        if (path / MANIFEST).exists():
            raise CollectionError(f"a collection already exists at {path}")
        path.mkdir(parents=True, exist_ok=True)
        coll = cls(path, manifest)
        coll.save_manifest()
        return coll

    # ---- manifest ------------------------------------------------------------------------
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
        files no longer referenced by this or the previous version."""
        shards = self.manifest.shards if self.manifest.shards is not None else tuple(self.shard_numbers())
        changes = {"shards": shards, **changes}
        new = replace(self.manifest, updated_at=now_iso(), format_version=FORMAT_VERSION,
                      version=self.manifest.version + 1, **changes)
        write_manifest(self.path, new, version_file=True)
        self.manifest, self._dead = new, None
        self.collect_garbage()
        return new

    def update(self) -> Update:
        """``with coll.update() as u: u.add(...); u.remove(...)`` — one new version (vlsearch.store.update)."""
        return Update(self)

    def compact(self) -> dict[str, int]:
        """Rewrite shards holding dead rows and drop dead index entries (:func:`vlsearch.store.update.compact`)."""
        return compact(self)

    def load_index(self, mmap: bool = False) -> Any:
        """This version's FAISS index, checked against the collection's model and dimension
        (IndexNotBuiltError when it has none; see :func:`vlsearch.ann.faiss_index.load_index`)."""
        return load_index(self.index_path, self.manifest.index, self.model, mmap=mmap)

    def add(self, images: pa.Table, captions: pa.Table | None = None) -> int:
        """Add rows (id, path, embedding, ...) and their captions as a new version; the index
        follows. Returns the new version."""
        with self.update() as u:
            u.add(images, captions)
        return self.manifest.version

    def remove(self, ids: Sequence[int] | np.ndarray) -> int:
        """Delete the rows of these image ids as a new version; the index follows. Returns the version."""
        with self.update() as u:
            u.remove(ids)
        return self.manifest.version

    def lock(self) -> CollectionLock:
        """Exclusive writer lock (``.lock`` holding the pid): raises CollectionLockedError when
        another live process holds it; a lock left by a dead process is taken over."""
        return CollectionLock(self.path / LOCK_FILE)

    def check_model(self, model: ModelInfo, *, what: str = "model") -> None:
        """Refuse a model whose embedding space differs from the collection's."""
        mine = self.manifest.model
        if (model.name, model.pretrained, model.dim) != (mine.name, mine.pretrained, mine.dim):
            raise CollectionMismatchError(
                f"{what} {model.name} (pretrained={model.pretrained}, dim={model.dim}) does not match "
                f"collection {self.path}, built with {mine.name} (pretrained={mine.pretrained}, dim={mine.dim}); "
                "embeddings from different models are not comparable"
            )

    # ---- shards --------------------------------------------------------------------------
    @property
    def index_path(self) -> Path:
        """The index file of this version (``index.faiss`` unless a sync wrote a newer one)."""
        return self.path / ((self.manifest.index or {}).get("file") or INDEX_FILE)

    def has_index(self) -> bool:
        return self.manifest.index is not None and self.index_path.is_file()

    def shard_paths(self, kind: str = IMAGES_DIR) -> list[Path]:
        """Live shard files of ``kind`` (images, captions or failures) of this version, in order."""
        folder = self.path / kind
        if self.manifest.shards is not None:
            paths = [folder / shard_name(n) for n in self.manifest.shards]
            return paths if kind == IMAGES_DIR else [p for p in paths if p.is_file()]
        if not folder.is_dir():
            return []
        return sorted(p for p in folder.iterdir() if SHARD_FILE_RE.match(p.name))

    def shard_numbers(self, kind: str = IMAGES_DIR) -> list[int]:
        return [shard_number(p) for p in self.shard_paths(kind)]

    def next_shard_number(self) -> int:
        """A shard number no file on disk uses (new rows never overwrite a committed shard)."""
        taken = [shard_number(p) for kind in (IMAGES_DIR, CAPTIONS_DIR, FAILURES_DIR)
                 if (self.path / kind).is_dir() for p in (self.path / kind).iterdir() if SHARD_FILE_RE.match(p.name)]
        return max(taken, default=-1) + 1

    def dead_rows(self) -> dict[int, np.ndarray]:
        """Deleted rows of this version: shard number -> sorted ids of its dead rows."""
        if self._dead is None:
            self._dead = {}
            if self.manifest.tombstones:
                table = pq.read_table(self.path / TOMBSTONES_DIR / self.manifest.tombstones)
                shards = table.column("shard").to_numpy()
                ids = table.column("id").to_numpy().astype(np.int64)
                for n in np.unique(shards):
                    self._dead[int(n)] = np.sort(ids[shards == n])
        return self._dead

    def live_mask(self, path: Path, ids: np.ndarray) -> np.ndarray | None:
        """Boolean mask of the live rows among ``ids`` of shard file ``path`` (None: all live)."""
        dead = self.dead_rows().get(shard_number(path))
        return None if dead is None else ~np.isin(ids, dead)

    def write_shard(
        self,
        number: int,
        images: pa.Table,
        captions: pa.Table | None = None,
        failures: pa.Table | None = None,
    ) -> None:
        """Write shard ``number`` atomically; the images file is written last and commits it."""
        if captions is not None:
            write_table(self.path / CAPTIONS_DIR / shard_name(number), captions)
        if failures is not None:
            write_table(self.path / FAILURES_DIR / shard_name(number), failures)
        write_table(self.path / IMAGES_DIR / shard_name(number), images)

    def referenced_files(self) -> set[Path]:
        """Files the current and the previous version need (shards, tombstones, index, manifests)."""
        keep = {self.path / MANIFEST}
        for version in (self.manifest.version, self.manifest.version - 1):
            try:
                m = self.manifest if version == self.manifest.version else read_manifest(self.path, version)
            except CollectionError:
                continue
            keep.add(self.path / VERSIONS_DIR / version_name(version, ".json"))
            for n in m.shards or ():
                keep.update(self.path / kind / shard_name(n) for kind in (IMAGES_DIR, CAPTIONS_DIR, FAILURES_DIR))
            if m.tombstones:
                keep.add(self.path / TOMBSTONES_DIR / m.tombstones)
            entry = m.index or {}
            keep.add(self.path / (entry.get("file") or INDEX_FILE))
            keep.update(self.path / entry[f] for f in ("refine_file", "refine_ids_file", "ivfdata") if entry.get(f))
        return keep

    def collect_garbage(self) -> list[Path]:
        """Delete what no kept version references: shards and indexes of a crashed or superseded
        write, old version manifests, temp files. Only call it while holding :meth:`lock`."""
        if self.manifest.shards is None:
            return self.remove_uncommitted()
        keep = self.referenced_files()
        removed = []
        candidates = [p for kind in (IMAGES_DIR, CAPTIONS_DIR, FAILURES_DIR, TOMBSTONES_DIR, VERSIONS_DIR)
                      if (self.path / kind).is_dir() for p in (self.path / kind).iterdir()]
        candidates += [p for p in self.path.iterdir()
                       if p.suffix in (".faiss", ".ivfdata") or p.name.endswith(".tmp") or p.name.startswith("vectors-")]
        for p in candidates:
            if p.is_file() and p not in keep:
                p.unlink()
                removed.append(p)
        return removed

    def remove_uncommitted(self) -> list[Path]:
        """Delete caption/failure shards and temp files left by a crash before their images shard."""
        committed = set(self.shard_numbers(IMAGES_DIR))
        removed = []
        for kind in (CAPTIONS_DIR, FAILURES_DIR, IMAGES_DIR):
            folder = self.path / kind
            if not folder.is_dir():
                continue
            for p in folder.iterdir():
                m = SHARD_FILE_RE.match(p.name)
                orphan = m is not None and int(m.group(1)) not in committed
                if orphan or p.name.endswith(".tmp"):
                    p.unlink()
                    removed.append(p)
        return removed

    # ---- reading -------------------------------------------------------------------------
    def read_table(self, kind: str = IMAGES_DIR, columns: Sequence[str] | None = None) -> pa.Table:
        """Read all shards of ``kind`` (only ``columns``); fine for metadata, not for 1M embeddings."""
        paths = self.shard_paths(kind)
        if not paths:
            return pa.table({}) if columns is None else pa.table({c: [] for c in columns})
        return pa.concat_tables([self.read_shard(p, kind, columns) for p in paths], promote_options="permissive")

    def read_shard(self, path: Path, kind: str = IMAGES_DIR, columns: Sequence[str] | None = None) -> pa.Table:
        """The live rows of one shard file (``columns`` only)."""
        id_column = "id" if kind == IMAGES_DIR else "image_id"
        if kind == FAILURES_DIR or shard_number(path) not in self.dead_rows():
            return pq.read_table(path, columns=list(columns) if columns else None)
        wanted = list(columns) if columns else None
        table = pq.read_table(path, columns=None if wanted is None else list(dict.fromkeys([*wanted, id_column])))
        mask = self.live_mask(path, table.column(id_column).to_numpy().astype(np.int64))
        table = table.filter(pa.array(mask))
        return table if wanted is None else table.select(wanted)

    def failures(self) -> pa.Table:
        return self.read_table(FAILURES_DIR)

    def iter_embeddings(
        self, kind: str = IMAGES_DIR, batch_size: int = 65_536, id_column: str | None = None,
        paths: Sequence[Path] | None = None,
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Stream ``(ids int64, vectors float32 (B, dim))`` over all shards with bounded memory.

        ``id_column`` defaults to ``id`` for images and ``image_id`` for captions; ``paths``: only
        these shard files (e.g. one worker's group), in the order given.
        """
        id_column = id_column or ("id" if kind == IMAGES_DIR else "image_id")
        for path in self.shard_paths(kind) if paths is None else paths:
            pf = pq.ParquetFile(path)
            for batch in pf.iter_batches(batch_size=batch_size, columns=[id_column, "embedding"]):
                ids = batch.column(0).to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
                vectors = embeddings_to_numpy(batch.column(1))
                mask = self.live_mask(path, ids)
                yield (ids, vectors) if mask is None else (ids[mask], vectors[mask])

    def read_embeddings(self, kind: str = IMAGES_DIR, id_column: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """All ``(ids, vectors)`` of ``kind`` in memory at once (small collections, benchmarks)."""
        parts = list(self.iter_embeddings(kind, id_column=id_column))
        if not parts:
            return np.zeros(0, np.int64), np.zeros((0, self.dim), np.float32)
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def count(self, kind: str = IMAGES_DIR) -> int:
        """Live row count: Parquet footers, less the dead rows (reads only their shards' ids)."""
        total = 0
        id_column = "id" if kind == IMAGES_DIR else "image_id"
        for p in self.shard_paths(kind):
            if kind != FAILURES_DIR and shard_number(p) in self.dead_rows():
                ids = pq.read_table(p, columns=[id_column]).column(0).to_numpy().astype(np.int64)
                total += int(self.live_mask(p, ids).sum())
            else:
                total += pq.ParquetFile(p).metadata.num_rows
        return total

    def __repr__(self) -> str:
        m = self.manifest
        return f"Collection({str(self.path)!r}, model={m.model.name}, dim={m.model.dim}, images={m.counts.get('images')})"
