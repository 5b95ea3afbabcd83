"""Keep a finished collection in step with its source: one new version per sync, no rebuild.

``sync(source, collection)`` compares every source record with the collection's live rows by id
(ids are hashes of the relative path, the manifest's image path, or ``<tar>/<key>``, so a row key
is stable across runs):

* **new**: an id the collection does not hold. If its image bytes hash to a stored row's
  ``content_hash`` (a renamed or duplicate file), that row's vector is reused: no decode, no encode.
* **changed**: the record's path, captions or metadata (``record_hash``) differ, or its size/mtime
  differ *and* its content hash confirms new bytes. Re-embedded (the stored vector is reused when
  only the captions or metadata changed). A file only touched (new mtime, same bytes) is counted
  unchanged; its row is rewritten with the new mtime so the next sync does not hash it again.
* **deleted**: a live id the source no longer has.
* a path listed in ``failures/`` is retried only when the file is newer than that failure record.
* **deferred**: a new, changed or deleted path that ``defer`` names is left exactly as stored this
  time (a file still being written: ``indexing.watch`` syncs it once it has settled).

Rows written by vlsearch before collection format 2 carry no file columns; they count as
unchanged while their path exists (their edits cannot be seen until the collection is rebuilt).

Writing goes through :class:`vlsearch.store.update.Update` (lock, new shards, tombstones, the index
follows, manifest rename last), so ``kill -9`` at any moment leaves the old or the new version
and the next run redoes the sync. The model is loaded only when something must be encoded.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Collection as PathSet
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vlsearch.store.layout import CAPTIONS_DIR, FAILURES_DIR, FILE_COLUMNS
from vlsearch.store.collection import Collection
from vlsearch.store.arrays import embedding_array, embeddings_to_numpy
from vlsearch.core.errors import CollectionError
from vlsearch.models.factory import Encoder, load_model
from vlsearch.core.progress import Progress
from vlsearch.core.allocator import reusing_freed_memory
from vlsearch.core.threads import cpu_threads
from vlsearch.store.update import Update
from vlsearch.ann.live import retrain_advice

from indexing.shards import (
    EmbedConfig,
    ShardStats,
    chunks,
    embed_chunks,
    file_columns,
    image_schema,
    same_model_unloaded,
)
from vlsearch.data.photo import photo_columns
from vlsearch.data.sources import ImageRecord, ImageSource, content_hash, file_stat, open_source, record_hash
from indexing.photos import honour_no_gps, keep_location_out, record_exif, refresh_advice

log = logging.getLogger(__name__)


@dataclass
class SyncReport:
    """What a sync found (and did, unless ``dry_run``): paths per kind, counts, the new version."""

    new: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    unchanged: int = 0
    #: new, changed or deleted paths left as stored because ``defer`` named them
    deferred: list[str] = field(default_factory=list)
    #: new or changed images whose stored vector was reused (same content hash): not encoded
    reused: int = 0
    encoded: int = 0
    failures: int = 0
    #: ``(path, kind, message)`` of each new or changed file that could not be embedded
    failed: list[tuple[str, str, str]] = field(default_factory=list)
    dry_run: bool = False
    version: int | None = None
    seconds: float = 0.0
    advice: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """``+N new, ~N changed, -N deleted, N unchanged``."""
        return f"{self.changes()}, {self.unchanged} unchanged"

    def changes(self) -> str:
        """``+N new, ~N changed, -N deleted``."""
        return f"+{len(self.new)} new, ~{len(self.changed)} changed, -{len(self.deleted)} deleted"

    @property
    def has_changes(self) -> bool:
        return bool(self.new or self.changed or self.deleted)


@dataclass
class _Plan:
    report: SyncReport
    encode: list[ImageRecord] = field(default_factory=list)
    #: (record, stored id whose vector it reuses)
    reuse: list[tuple[ImageRecord, int]] = field(default_factory=list)
    remove: list[int] = field(default_factory=list)


#: Source paths a sync leaves as stored: a set of them, or a predicate.
Defer = PathSet[str] | Callable[[str], bool]


def sync(source: ImageSource | str | os.PathLike, collection: Collection | str | os.PathLike,
         config: EmbedConfig = EmbedConfig(), *, dry_run: bool = False, encoder: Encoder | None = None,
         progress: Progress | None = None, defer: Defer | None = None) -> SyncReport:
    """Bring a finished collection in step with ``source`` as one new version (see module docstring).

    ``dry_run``: find and report the changes, write nothing. ``encoder``: a loaded model to use
    (else ``config``'s model is loaded, only if something must be encoded). ``defer``: source
    paths (as stored: relative to the source) to leave exactly as stored this time, even if they
    are new, changed or gone; asked only about paths that would change. Raises
    CollectionLockedError when another process writes the collection, CollectionMismatchError
    for another model.
    """
    start = time.perf_counter()
    if not isinstance(source, ImageSource):
        source = open_source(source)
    coll = collection if isinstance(collection, Collection) else Collection.open(collection)
    if config.model is None:  # default: the collection's own model
        config = replace(config, model=encoder.name if encoder is not None else coll.model.name,
                         pretrained=config.pretrained if encoder is not None or config.pretrained else coll.model.pretrained)
    if not coll.manifest.complete:
        raise CollectionError(f"collection {coll.path} is not finished; rerun the embedding to resume it first")
    if config.no_gps and not dry_run:
        coll = keep_location_out(coll)
    config = honour_no_gps(coll, config)
    holder = _EncoderHolder(coll, config, encoder)
    deferred = _deferring(defer)
    if dry_run:
        report = _plan(source, Collection.open(coll.path), deferred).report
        report.dry_run, report.seconds = True, round(time.perf_counter() - start, 3)
        return report
    with cpu_threads(config.threads), reusing_freed_memory(), Update(coll) as update:
        plan = _plan(source, update.base, deferred)
        _apply(plan, update, source, holder, config, progress)
    report = plan.report
    coll = Collection.open(coll.path)
    report.version = coll.manifest.version
    report.advice = [a for a in (retrain_advice(coll.manifest.index, coll.count()), refresh_advice(coll)) if a]
    report.seconds = round(time.perf_counter() - start, 3)
    log.info("synced %s: %s (version %d, %.1f s)", coll.path, report.summary(), report.version, report.seconds)
    return report


class _EncoderHolder:
    """Loads the collection's model on first use only; refuses another model up front."""

    def __init__(self, coll: Collection, config: EmbedConfig, encoder: Encoder | None):
        self.coll, self.config, self.encoder = coll, config, encoder
        if encoder is None and not same_model_unloaded(coll, config):
            self.get()  # loads and checks: CollectionMismatchError for another model
        elif encoder is not None:
            coll.check_model(encoder.info)

    def get(self) -> Encoder:
        if self.encoder is None:
            c = self.config
            self.encoder = load_model(c.model, c.pretrained, device=c.device, precision=c.precision)
            self.coll.check_model(self.encoder.info)
        return self.encoder


# ---- finding the changes -------------------------------------------------------------------------

def _stored(coll: Collection) -> tuple[dict[int, tuple], dict[str, int]]:
    """Live rows: id -> (path, size, mtime_ns, content_hash, record_hash); content hash -> an id."""
    rows: dict[int, tuple] = {}
    by_hash: dict[str, int] = {}
    for path in coll.shard_paths():
        names = set(pq.read_schema(path).names)
        table = coll.read_shard(path, columns=["id", "path", *[c for c in FILE_COLUMNS if c in names]])
        cols = {c: table.column(c).to_pylist() if c in names else [None] * table.num_rows
                for c in ("id", "path", *FILE_COLUMNS)}
        for i, row_id in enumerate(cols["id"]):
            rows[row_id] = tuple(cols[c][i] for c in ("path", *FILE_COLUMNS))
            if cols["content_hash"][i] is not None:
                by_hash.setdefault(cols["content_hash"][i], row_id)
    return rows, by_hash


def _failed(coll: Collection) -> dict[str, float]:
    """Paths recorded in the live failures shards -> mtime of the shard that recorded them."""
    out: dict[str, float] = {}
    for path in coll.shard_paths(FAILURES_DIR):
        mtime = path.stat().st_mtime
        for p in pq.read_table(path, columns=["path"]).column(0).to_pylist():
            out[p] = max(out.get(p, 0.0), mtime)
    return out


def _deferring(defer: Defer | None) -> Callable[[str], bool]:
    if defer is None:
        return lambda path: False
    return defer if callable(defer) else frozenset(defer).__contains__


def _plan(source: ImageSource, coll: Collection, defer: Callable[[str], bool]) -> _Plan:
    rows, by_hash = _stored(coll)
    failed = _failed(coll)
    plan = _Plan(SyncReport())
    seen: set[int] = set()
    for rec in source:
        seen.add(rec.id)
        stored = rows.get(rec.id)
        if stored is None:
            if rec.path in failed and (file_stat(rec) or (0, 0))[1] / 1e9 <= failed[rec.path]:
                continue  # failed before and not modified since
            if defer(rec.path):
                plan.report.deferred.append(rec.path)
                continue
            plan.report.new.append(rec.path)
            _reuse_or_encode(plan, rec, content_hash(rec), by_hash)
            continue
        _compare(plan, rec, stored, by_hash, defer)
    gone = [i for i in rows if i not in seen]
    kept = {i for i in gone if defer(rows[i][0])}
    plan.report.deferred += sorted(rows[i][0] for i in kept)
    plan.report.deleted = sorted(rows[i][0] for i in gone if i not in kept)
    plan.remove += [i for i in gone if i not in kept]
    return plan


def _compare(plan: _Plan, rec: ImageRecord, stored: tuple, by_hash: dict[str, int],
             defer: Callable[[str], bool]) -> None:
    _, size, mtime, stored_hash, stored_record = stored
    if size is None:  # a format-1 row: no file facts to compare
        plan.report.unchanged += 1
        return
    same_record = stored_record == record_hash(rec)
    if same_record and file_stat(rec) == (size, mtime):
        plan.report.unchanged += 1
        return
    if defer(rec.path):
        plan.report.deferred.append(rec.path)
        return
    digest = content_hash(rec)
    plan.remove.append(rec.id)
    if same_record and digest == stored_hash:  # touched, not changed: refresh the row's mtime
        plan.report.unchanged += 1
        plan.reuse.append((rec, rec.id))
        return
    plan.report.changed.append(rec.path)
    _reuse_or_encode(plan, rec, digest, {**by_hash, stored_hash: rec.id} if digest == stored_hash else by_hash)


def _reuse_or_encode(plan: _Plan, rec: ImageRecord, digest: str | None, by_hash: dict[str, int]) -> None:
    if digest is not None and digest in by_hash:
        plan.reuse.append((rec, by_hash[digest]))
        plan.report.reused += 1
    else:
        plan.encode.append(rec)


# ---- writing the changes -------------------------------------------------------------------------

def _apply(plan: _Plan, update: Update, source: ImageSource, holder: _EncoderHolder, config: EmbedConfig,
           progress: Progress | None) -> None:
    coll = update.base
    update.remove(plan.remove)
    size = coll.manifest.shard_size
    dim = coll.dim
    schema = image_schema(dim, source.metadata_schema)
    for chunk in chunks(plan.reuse, size):
        update.add(*_reused_tables(coll, chunk, schema, holder, config))
    if plan.encode:
        encoder = holder.get()
        stats = ShardStats(start=time.perf_counter(), skipped=0, total=len(plan.encode), failures=0)
        for images, captions, failures in embed_chunks(chunks(plan.encode, size), encoder, schema, config, stats,
                                                       progress):
            update.add(images, captions, failures)
            plan.report.encoded += images.num_rows
            plan.report.failures += failures.num_rows
            plan.report.failed += [(r["path"], r["kind"], r["message"]) for r in failures.to_pylist()]


def _reused_tables(coll: Collection, chunk: list[tuple[ImageRecord, int]], schema: pa.Schema,
                   holder: _EncoderHolder, config: EmbedConfig) -> tuple[pa.Table, pa.Table]:
    """Rows for records whose image vector is taken from stored row ids (renamed, duplicate,
    caption-only change or touched); their captions' vectors are reused when the text is the same,
    and their photo columns are read from the files' headers (no decode)."""
    wanted = np.array(sorted({old for _, old in chunk}), np.int64)
    stored = _rows_by_id(coll, wanted, ["id", "width", "height", "embedding"], "id")
    stored_caps = _rows_by_id(coll, wanted, ["image_id", "caption", "embedding"], "image_id", CAPTIONS_DIR)
    cap_vec = {(i, c): v for i, c, v in zip(stored_caps["image_id"], stored_caps["caption"], stored_caps["vectors"])}
    where = {i: k for k, i in enumerate(stored["id"])}
    records = [rec for rec, _ in chunk]
    rows = [where[old] for _, old in chunk]
    columns: dict[str, Any] = {
        "id": [r.id for r in records], "path": [r.path for r in records],
        "width": [stored["width"][k] for k in rows], "height": [stored["height"][k] for k in rows],
        "captions": [list(r.captions) for r in records], **file_columns(records),
        **photo_columns([r.path for r in records], [record_exif(r) for r in records], gps=not config.no_gps)}
    arrays = [embedding_array(stored["vectors"][rows]) if f.name == "embedding" else
              pa.array(columns[f.name] if f.name in columns else [r.metadata.get(f.name) for r in records], f.type)
              for f in schema]
    images = pa.Table.from_arrays(arrays, schema=schema)
    texts = [(rec.id, old, c) for rec, old in chunk for c in rec.captions]
    todo = [t for _, old, t in texts if (old, t) not in cap_vec]
    fresh = dict(zip(todo, holder.get().encode_texts(todo))) if todo else {}
    vectors = [cap_vec.get((old, t), fresh.get(t)) for _, old, t in texts]
    captions = pa.table({"image_id": pa.array([i for i, _, _ in texts], pa.int64()),
                         "caption": pa.array([t for _, _, t in texts], pa.string()),
                         "embedding": embedding_array(np.array(vectors, np.float32).reshape(-1, coll.dim))})
    return images, captions


def _rows_by_id(coll: Collection, ids: np.ndarray, columns: list[str], id_column: str,
                kind: str = "images") -> dict[str, Any]:
    """Columns of the live rows whose ``id_column`` is in ``ids`` (embeddings as ``vectors``)."""
    parts = []
    for path in coll.shard_paths(kind):
        table = coll.read_shard(path, kind, columns)
        mask = np.isin(table.column(id_column).to_numpy(), ids)
        if mask.any():
            parts.append(table.filter(pa.array(mask)))
    if not parts:
        return {**{c: [] for c in columns if c != "embedding"}, "vectors": np.zeros((0, coll.dim), np.float32)}
    table = pa.concat_tables(parts)
    out = {c: table.column(c).to_pylist() for c in columns if c != "embedding"}
    out["vectors"] = embeddings_to_numpy(table.column("embedding"))
    return out


__all__ = ["SyncReport", "sync"]
