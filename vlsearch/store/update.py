"""Change a finished collection by whole versions: add rows, remove ids, compact — without a rebuild.

::

    with coll.update() as u:          # takes the collection lock; commits version N+1 on exit
        u.add(images_table, captions_table)   # new rows go into a NEW shard
        u.remove([id1, id2])          # their live rows become tombstones
    coll.add(images_table)            # one-call forms of the same
    coll.remove(ids)
    compact(coll)                     # rewrite shards that hold dead rows, drop dead index entries

**The index follows.** On commit the collection's FAISS index is read, the removed ids leave it
(``remove_ids`` where the index type supports it: IVF, Flat in an IDMap), the new vectors are added
with their ids to the *already trained* index, and it is written under a new name
(``index-vNNNNNN.faiss``) that the new manifest points to. Index types that cannot remove
(``Refine`` and ``HNSW`` inside an ``IDMap2``) get their removed entries' ids overwritten with
:data:`DEAD_ID` in the IDMap's id table instead; searches then pass :func:`live_selector`
in their ``SearchParameters`` and :func:`compact` re-adds the live vectors to a fresh copy of the
trained index. Why ``remove_ids`` first: a changed file keeps its id, so its old entry must leave
the index before the new one is added — an id-based tombstone selector cannot tell the two apart.
The measured costs of both are in ``benchmarks/RESULTS.md`` (``bench_sync.py``).

A crash (even ``kill -9``) before the manifest rename leaves version N; the files it wrote are
unreferenced and removed by the next writer (:func:`vlsearch.store.gc.collect_garbage`).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any, Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vlsearch.ann.faiss_index import copy_ondisk_lists, supports_ids, write_index
from vlsearch.ann.live import drop_ids, refill
from vlsearch.ann.refine import VectorRows, new_vectors_stem, refine_fields, vectors_writer
from vlsearch.core.errors import CollectionError, InvalidQueryError
from vlsearch.core.fsutil import fsync_file
from vlsearch.store import tombstones
from vlsearch.store.directory import CollectionDir
from vlsearch.store.keyword.index import build_shard_index, missing_keyword_shards, set_indexed_columns
from vlsearch.store.arrays import embedding_array, embeddings_to_numpy
from vlsearch.store.layout import CAPTIONS_DIR, FAILURES_DIR, IMAGES_DIR, now_iso, shard_name, version_name


log = logging.getLogger(__name__)
#: rows copied per write from the previous version's rows file (64 MiB at 512 dimensions)
ROWS_COPY_BATCH = 65536



class Update:
    """One pending version of a collection (see module docstring). Use as a context manager."""

    def __init__(self, collection: CollectionDir):
        self.collection = collection
        self._lock = collection.lock()
        self._added: list[int] = []
        self._added_ids: list[np.ndarray] = []
        self._added_vectors: list[np.ndarray] = []
        self._removed: set[int] = set()
        self._changes: dict[str, Any] = {}

    def __enter__(self) -> "Update":
        self._lock.__enter__()
        try:
            self.base = self.collection.reopen()  # the newest version, not a stale copy
            if not self.base.manifest.complete:
                raise CollectionError(f"collection {self.base.path} is still being embedded; finish that run first")
            self.base.collect_garbage()
        except BaseException:
            self._lock.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        try:
            if exc_type is None:
                self.commit()
        finally:
            self._lock.__exit__(None, None, None)

    def add(self, images: pa.Table, captions: pa.Table | None = None, failures: pa.Table | None = None) -> None:
        """Write ``images`` (columns id, path, embedding; optionally width, height, captions,
        metadata, file columns) and their ``captions`` (image_id, caption, embedding) as a new shard."""
        images = _normalise_images(images, self.base.dim)
        if captions is None:
            captions = pa.table({"image_id": pa.array([], pa.int64()), "caption": pa.array([], pa.string()),
                                 "embedding": embedding_array(np.zeros((0, self.base.dim), np.float32))})
        number = max([self.base.next_shard_number(), *[n + 1 for n in self._added]])
        self.base.write_shard(number, images, captions, failures)
        self._added.append(number)
        self._added_ids.append(images.column("id").to_numpy().astype(np.int64))
        self._added_vectors.append(embeddings_to_numpy(images.column("embedding")))

    def remove(self, ids: Iterable[int]) -> None:
        """Delete the live rows of these image ids (unknown ids are ignored)."""
        self._removed.update(int(i) for i in ids)

    def record(self, **changes: Any) -> None:
        """Other manifest fields this version sets with its rows (e.g. ``source``: how far an
        import has read its folder), committed together with them."""
        self._changes.update(changes)

    def commit(self) -> CollectionDir:
        """Write the version (nothing when nothing was added or removed); returns the collection."""
        base = self.base
        if not self._added and not self._removed:
            return base
        removed = np.array(sorted(self._removed), np.int64)
        dead, hit = tombstones.remove_rows(base.dead_rows(), base.shard_paths(), removed)
        added_ids = np.concatenate(self._added_ids) if self._added_ids else np.zeros(0, np.int64)
        _check_unique(base, added_ids, hit)
        version = base.manifest.version + 1
        tomb_name = tombstones.write_tombstones(base.path, dead, version)
        shards = tuple(base.manifest.shards if base.manifest.shards is not None else base.shard_numbers())
        staged = base.with_manifest(replace(base.manifest, shards=shards + tuple(self._added), tombstones=tomb_name))
        index = _follow_index(base, staged, hit, added_ids, self._added_vectors, version)
        counts = {"images": staged.count(), "captions": staged.count(CAPTIONS_DIR),
                  "failures": staged.count(FAILURES_DIR), "shards": len(staged.manifest.shards)}
        base.commit_version(shards=staged.manifest.shards, tombstones=tomb_name, index=index, counts=counts,
                            **self._changes)
        self.collection.manifest = base.manifest
        log.info("collection %s: version %d (+%d rows, -%d rows)", base.path, version, len(added_ids), len(hit))
        return base


def _normalise_images(images: pa.Table, dim: int) -> pa.Table:
    """Check the required columns and fill the optional standard ones with nulls/empties."""
    if not isinstance(images, pa.Table):
        images = pa.table(images)
    missing = {"id", "path", "embedding"} - set(images.column_names)
    if missing:
        raise InvalidQueryError(f"rows to add lack column(s) {sorted(missing)}")
    emb = images.column("embedding")
    if not pa.types.is_fixed_size_list(emb.type) or emb.type.list_size != dim:
        vectors = np.asarray(emb.to_pylist(), np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != dim:
            raise InvalidQueryError(f"embeddings to add must be {dim}-d, got shape {vectors.shape}")
        images = images.set_column(images.column_names.index("embedding"), "embedding", embedding_array(vectors))
    n = images.num_rows
    defaults = {"width": pa.nulls(n, pa.int32()), "height": pa.nulls(n, pa.int32()),
                "captions": pa.array([[]] * n, pa.list_(pa.string())),
                "file_size": pa.nulls(n, pa.int64()), "file_mtime_ns": pa.nulls(n, pa.int64()),
                "content_hash": pa.nulls(n, pa.string()), "record_hash": pa.nulls(n, pa.string())}
    for name, values in defaults.items():
        if name not in images.column_names:
            images = images.add_column(images.num_columns - 1, name, values)
    images = images.set_column(images.column_names.index("id"), "id", images.column("id").cast(pa.int64()))
    ids = images.column("id").to_numpy()
    if len(np.unique(ids)) != len(ids) or (ids < 0).any():
        raise InvalidQueryError("ids of rows to add must be unique and non-negative")
    return images


def _check_unique(coll: CollectionDir, added: np.ndarray, removed: np.ndarray) -> None:
    if not len(added):
        return
    ids = coll.read_table(columns=["id"]).column("id").to_numpy()
    clash = np.setdiff1d(np.intersect1d(ids, added), removed)
    if len(clash):
        raise CollectionError(f"image id {int(clash[0])} is already in collection {coll.path}; "
                              "remove it in the same update to replace it")


# ---- the index follows -------------------------------------------------------------------------

def _follow_index(base: CollectionDir, staged: CollectionDir, removed: np.ndarray, added_ids: np.ndarray,
                  added_vectors: list[np.ndarray], version: int) -> dict[str, Any] | None:
    """Apply the removals and additions to the index; write it under a new name; its new entry."""
    entry = base.manifest.index
    if entry is None:
        return None

    index = base.load_index()
    ondisk: dict[str, Any] = {}
    if entry.get("layout") == "ondisk":  # copy on write: version N's lists stay intact for its readers
        ondisk["ivfdata"] = f"index-{version_name(version, '.ivfdata')}"
        copy_ondisk_lists(index, base.path / ondisk["ivfdata"])
    dead_entries = int(entry.get("dead_entries", 0))
    vectors = np.concatenate(added_vectors) if added_vectors else np.zeros((0, base.dim), np.float32)
    if not supports_ids(index):  # ids were 0..N-1, stored by position: re-add into an IDMap2
        index = refill(index, staged.iter_embeddings())
        dead_entries = 0
    else:
        dead_entries += drop_ids(index, removed)
        if len(added_ids):
            index.add_with_ids(np.ascontiguousarray(vectors), added_ids)
    name = f"index-{version_name(version, '.faiss')}"
    write_index(index, base.path / name)
    ntotal = int(index.ntotal)
    if ondisk:
        del index  # unmaps the lists
        ondisk["ivfdata_bytes"] = fsync_file(base.path / ondisk["ivfdata"])
    built = int(entry.get("built_ntotal") or entry.get("ntotal") or ntotal)
    return {**entry, **_vector_rows(base, staged, entry, added_ids, vectors), **ondisk, "file": name, "ntotal": ntotal, "dead_entries": dead_entries,
            "built_ntotal": built, "file_bytes": (base.path / name).stat().st_size, "updated_at": now_iso()}


def _vector_rows(base: CollectionDir, staged: CollectionDir, entry: dict[str, Any],
                 added_ids: np.ndarray | None = None, added: np.ndarray | None = None) -> dict[str, Any]:
    """When the index has a vector rows file, a new one holding the new version's live rows (the
    previous version's file stays for its readers); the entry fields naming it. Else nothing.

    Kept rows are copied from the previous file and ``added`` rows (vectors of ``added_ids``) come
    from the update itself, so no shard is decoded; the shards are read only when the previous file
    lacks a live row (it should not)."""
    old = VectorRows.from_entry(base.path, entry)
    if old is None:
        return {}
    ids = np.sort(staged.read_table(columns=["id"]).column("id").to_numpy().astype(np.int64))
    added_ids = np.zeros(0, np.int64) if added_ids is None else added_ids
    kept = ids[~np.isin(ids, added_ids)]
    rows, valid = old.rows(kept)
    with vectors_writer(base.path, new_vectors_stem(), ids, staged.dim) as add:
        if valid.all():
            for lo in range(0, len(kept), ROWS_COPY_BATCH):
                add(kept[lo:lo + ROWS_COPY_BATCH], old.vectors[rows[lo:lo + ROWS_COPY_BATCH]])
            if len(added_ids):
                add(added_ids, added)
        else:
            for batch_ids, vectors in staged.iter_embeddings():
                add(batch_ids, vectors)
    return {**add.fields, **(refine_fields(add.fields) if entry.get("refine_file") else {})}


# ---- compaction --------------------------------------------------------------------------------

def compact(coll: CollectionDir) -> dict[str, int]:
    """Rewrite the shards that hold dead rows (or fewer than a quarter of ``shard_size`` rows, as
    many small syncs leave) into full shards without dead rows; drop dead entries from the index.

    One new version; other shards are kept as they are. Returns counts of rewritten shards,
    dropped rows and the new version."""
    with coll.lock():
        base = coll.reopen()
        base.collect_garbage()
        dead = base.dead_rows()
        shards = list(base.manifest.shards if base.manifest.shards is not None else base.shard_numbers())
        small = base.manifest.shard_size // 4
        rewrite = [n for n in shards if n in dead or pq.ParquetFile(base.path / IMAGES_DIR / shard_name(n))
                   .metadata.num_rows < small]
        if len(rewrite) == 1 and rewrite[0] not in dead:
            rewrite = []  # one small shard alone: nothing to merge it with
        kept = [n for n in shards if n not in rewrite]
        written = _rewrite(base, rewrite)
        staged = base.with_manifest(replace(base.manifest, shards=tuple(kept + written), tombstones=None))
        index = _compact_index(base, staged)
        counts = dict(base.manifest.counts, shards=len(staged.manifest.shards))
        base.commit_version(shards=staged.manifest.shards, tombstones=None, index=index, counts=counts)
        coll.manifest = base.manifest
        return {"shards_rewritten": len(rewrite), "rows_dropped": sum(len(v) for v in dead.values()),
                "version": base.manifest.version}


def _rewrite(base: CollectionDir, numbers: list[int]) -> list[int]:
    """Copy the live rows of shards ``numbers`` into new shards of up to ``shard_size`` rows."""
    number, written = base.next_shard_number(), []
    pending: dict[str, list[pa.Table]] = {IMAGES_DIR: [], CAPTIONS_DIR: [], FAILURES_DIR: []}

    def flush() -> None:
        nonlocal number
        tables = {k: pa.concat_tables(v, promote_options="permissive") if v else None for k, v in pending.items()}
        base.write_shard(number, tables[IMAGES_DIR], tables[CAPTIONS_DIR], tables[FAILURES_DIR])
        written.append(number)
        number += 1
        for v in pending.values():
            v.clear()

    for n in numbers:
        for kind in pending:
            path = base.path / kind / shard_name(n)
            if path.is_file():
                pending[kind].append(base.read_shard(path, kind))
        if sum(t.num_rows for t in pending[IMAGES_DIR]) >= base.manifest.shard_size:
            flush()
    if pending[IMAGES_DIR]:
        flush()
    return written


def _compact_index(base: CollectionDir, staged: CollectionDir) -> dict[str, Any] | None:
    entry = base.manifest.index
    if entry is None or not entry.get("dead_entries"):
        return entry

    index = refill(base.load_index(), staged.iter_embeddings())
    name = f"index-{version_name(base.manifest.version + 1, '.faiss')}"
    write_index(index, base.path / name)
    return {**entry, **_vector_rows(base, staged, entry), "file": name, "ntotal": int(index.ntotal), "dead_entries": 0,
            "file_bytes": (base.path / name).stat().st_size, "updated_at": now_iso()}


# ---- keyword indexes of shards written before them ----------------------------------------------

#: ``build_keyword_index(columns=...)`` not given: keep the collection's choice
KEEP_COLUMNS = object()


def build_keyword_index(coll: CollectionDir, rebuild: bool = False,
                        columns: Sequence[str] | None | object = KEEP_COLUMNS) -> dict[str, int]:
    """Write the keyword index (:mod:`vlsearch.store.keyword`) of every live shard that has none
    (``rebuild``: of every live shard). ``columns``: the metadata columns to index from now on
    (None: every text column; recorded in ``keyword.json``; every shard is then rebuilt). No new version: a shard's keyword index is derived from the
    immutable shard alone, written into a temporary directory renamed into place, and referenced
    by every version that lists the shard; readers see either no index (and are told to build it)
    or a whole one. Holds the writer lock. Returns counts of shards built and live."""
    with coll.lock():
        base = coll.reopen()
        base.collect_garbage()
        numbers = base.shard_numbers()
        if columns is not KEEP_COLUMNS:
            set_indexed_columns(base.path, columns)
            rebuild = True
        todo = numbers if rebuild else missing_keyword_shards(base.path, numbers)
        for n in todo:
            table = pq.read_table(base.path / IMAGES_DIR / shard_name(n),
                                  columns=[c for c in pq.read_schema(base.path / IMAGES_DIR / shard_name(n)).names
                                           if c != "embedding"])
            build_shard_index(base.path, n, table)
        log.info("collection %s: keyword index built for %d of %d shards", base.path, len(todo), len(numbers))
        return {"shards_built": len(todo), "shards": len(numbers)}


__all__ = ["Update", "compact", "build_keyword_index"]
