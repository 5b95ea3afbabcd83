"""The query engine: text, image and vector search over a collection.

::

    from vlsearch import Searcher
    s = Searcher.open("my-collection")           # manifest + id map + index; model on first use
    hits = s.search_text("a dog running on the beach", k=10)
    batch = s.search_image(["q1.jpg", "q2.jpg"], k=5)   # list[list[Hit]]
    hits = s.search_vector(vec, k=10, nprobe=64, k_factor=4)
    hits = s.search_text("...", exact=True)       # brute force over the shards (no index needed)

Design points:

* **Per-call parameters never touch the shared index.** ``nprobe`` and the refine factor go
  through a FAISS ``SearchParameters`` tree built for the index's structure
  (:func:`search_parameters`), so concurrent calls with different settings are independent.
* **Opening is cheap in memory**: only the ``id`` column of each shard is read, into an
  id -> (shard, row) map (8 bytes per image, 12 if ids are not sorted). Hits get their metadata
  by reading the one Parquet row group that holds them (no embedding column) and picking the
  row; decoded row groups stay in a bounded LRU cache (``metadata_cache_mb``).
* **The query model is the collection's**: loaded lazily with ``load_model(name, pretrained)``
  from the manifest, or passed in (and checked) as ``encoder``.
* **Scores are cosine similarities** (query vectors are L2-normalised; an L2 index's squared
  distances are converted with ``1 - d/2``).
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence, Union

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .collection import IMAGES_DIR, Collection
from .errors import (
    CollectionError,
    CollectionMismatchError,
    DecodeError,
    IndexNotBuiltError,
    InvalidQueryError,
)
from .exact import DEFAULT_CHUNK_SIZE, exact_search

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    from PIL import Image

    from .models import Encoder

log = logging.getLogger(__name__)

ImageQuery = Union["Image.Image", str, os.PathLike, bytes, bytearray, memoryview]
#: Columns of an image shard that are not copied into ``Hit.metadata``.
_NOT_METADATA = ("id", "path", "captions", "embedding")
_MISSING = object()


# ---- results -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Hit:
    """One search result. ``rank`` starts at 1; ``score`` is the cosine similarity to the query;
    ``caption`` is the image's first caption (None if it has none); ``metadata`` holds width,
    height and any extra columns of the image shard."""

    id: int
    score: float
    rank: int
    path: str
    caption: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict, hash=False, compare=True)

    def to_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "id": self.id, "score": self.score, "path": self.path,
                "caption": self.caption, "metadata": dict(self.metadata)}


_RESERVED = ("query", "rank", "id", "score", "path", "caption")


def _rows(batch: Sequence[Sequence[Hit]], with_query: bool) -> list[dict[str, Any]]:
    rows = []
    for q, hits in enumerate(batch):
        for h in hits:
            row: dict[str, Any] = {"query": q} if with_query else {}
            row.update(rank=h.rank, id=h.id, score=h.score, path=h.path, caption=h.caption)
            for key, value in h.metadata.items():
                row[f"metadata.{key}" if key in _RESERVED else key] = value
            rows.append(row)
    return rows


def _to_arrow(batch: Sequence[Sequence[Hit]], with_query: bool) -> pa.Table:
    types = {"query": pa.int64(), "rank": pa.int32(), "id": pa.int64(), "score": pa.float32(),
             "path": pa.string(), "caption": pa.string()}
    rows = _rows(batch, with_query)
    names = list(types) if with_query else list(types)[1:]
    for row in rows:  # metadata columns: union over all rows, in first-seen order
        names += [n for n in row if n not in names]
    return pa.table({n: pa.array([r.get(n) for r in rows], type=types.get(n)) for n in names})


class Hits(list):
    """The ranked hits of one query (a ``list[Hit]``), convertible to a table."""

    def to_arrow(self) -> pa.Table:
        """One row per hit: rank, id, score, path, caption, then one column per metadata key."""
        return _to_arrow([self], with_query=False)

    def to_pandas(self) -> "pd.DataFrame":
        return self.to_arrow().to_pandas()


class Results(list):
    """Hits of a batch of queries (a ``list[list[Hit]]``), convertible to one long table."""

    def to_arrow(self) -> pa.Table:
        """One row per hit, with a ``query`` column (the query's position in the batch)."""
        return _to_arrow(self, with_query=True)

    def to_pandas(self) -> "pd.DataFrame":
        return self.to_arrow().to_pandas()


def format_hits(hits: Sequence[Hit], caption_width: int = 70) -> str:
    """A plain-text table (rank, score, path, caption) of one query's hits."""
    if not hits:
        return "no results"

    def cut(text: str | None) -> str:
        text = (text or "").replace("\n", " ")
        return text if len(text) <= caption_width else text[: caption_width - 1] + "…"

    rows = [("rank", "score", "path", "caption")]
    rows += [(str(h.rank), f"{h.score:.4f}", h.path or "", cut(h.caption)) for h in hits]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join(f"{r[0]:>{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]}".rstrip() for r in rows)


def hits_to_json_lines(hits: Sequence[Hit]) -> str:
    """One JSON object per hit (rank, id, score, path, caption, metadata), newline-separated."""
    import json

    return "\n".join(json.dumps(h.to_dict(), default=str, ensure_ascii=False) for h in hits)


# ---- index loading and per-call search parameters ------------------------------------------

def load_index(collection: Collection, mmap: bool = False) -> Any:
    """Read the collection's FAISS index after checking that ``manifest["index"]`` matches it.

    ``mmap=True`` memory-maps the index file (read-only) instead of reading it into RAM.
    Raises IndexNotBuiltError when there is none, CollectionMismatchError when it was built
    for another model or dimension.
    """
    import faiss

    entry = collection.manifest.index
    if entry is None:
        raise IndexNotBuiltError(
            f"collection {collection.path} has no ANN index: run `vlsearch build-index {collection.path}` "
            "or search with exact=True (--exact)"
        )
    path = collection.path / entry.get("file", collection.index_path.name)
    if not path.is_file():
        raise IndexNotBuiltError(
            f"manifest of {collection.path} records an index but {path} is missing: rebuild it with "
            f"`vlsearch build-index {collection.path}` or search with exact=True (--exact)"
        )
    model = entry.get("model")
    mine = collection.manifest.model
    if model is not None and (model.get("name"), model.get("pretrained"), int(model.get("dim", -1))) != (
        mine.name, mine.pretrained, mine.dim
    ):
        raise CollectionMismatchError(
            f"index {path} was built for model {model.get('name')} (pretrained={model.get('pretrained')}, "
            f"dim={model.get('dim')}) but the collection holds {mine.name} (pretrained={mine.pretrained}, "
            f"dim={mine.dim}) embeddings: rebuild the index"
        )
    flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap else 0
    try:
        index = faiss.read_index(str(path), flags)
    except RuntimeError as exc:
        raise CollectionError(f"cannot read index {path}: {exc}") from exc
    if index.d != mine.dim:
        raise CollectionMismatchError(f"index {path} has dimension {index.d}, the collection {mine.dim}: rebuild it")
    return index


def search_parameters(index: Any, nprobe: int | None = None, k_factor: float | None = None) -> Any:
    """A FAISS ``SearchParameters`` tree that sets ``nprobe`` / ``k_factor`` for this call only.

    Walks the index structure (IDMap -> PreTransform -> Refine -> IVF); ``None`` values keep the
    index's own setting, but it is still passed explicitly so the call never depends on (or
    changes) mutable index state. Returns None for indexes with no tunable parameter (Flat).
    """
    import faiss

    idx = faiss.downcast_index(index)
    if isinstance(idx, faiss.IndexIDMap):  # IDMap forwards params to the wrapped index
        return search_parameters(idx.index, nprobe, k_factor)
    if isinstance(idx, faiss.IndexPreTransform):
        inner = search_parameters(idx.index, nprobe, k_factor)
        return None if inner is None else faiss.SearchParametersPreTransform(index_params=inner)
    if isinstance(idx, faiss.IndexRefine):
        base = search_parameters(idx.base_index, nprobe, k_factor)
        factor = float(idx.k_factor if k_factor is None else k_factor)
        return faiss.IndexRefineSearchParameters(k_factor=factor, base_index_params=base)
    if isinstance(idx, faiss.IndexIVF):
        return faiss.SearchParametersIVF(nprobe=int(idx.nprobe if nprobe is None else nprobe))
    return None


def _ivf_nprobe(index: Any) -> int | None:
    """The nprobe stored in the index file (its innermost IVF), or None when it has no IVF."""
    import faiss

    idx = faiss.downcast_index(index)
    for attr in ("index", "base_index"):
        if not isinstance(idx, faiss.IndexIVF) and hasattr(idx, attr):
            return _ivf_nprobe(getattr(idx, attr))
    return int(idx.nprobe) if isinstance(idx, faiss.IndexIVF) else None


# ---- id -> row map and metadata ------------------------------------------------------------

class RowLocator:
    """Maps image ids to ``(shard, row)`` from the ``id`` column of each shard only."""

    def __init__(self, shard_paths: Sequence[Path]):
        self.paths = list(shard_paths)
        parts = [pq.read_table(p, columns=["id"]).column("id").to_numpy().astype(np.int64, copy=False)
                 for p in self.paths]
        ids = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        self.offsets = np.cumsum([0] + [len(p) for p in parts]).astype(np.int64)
        if len(ids) and not np.all(ids[1:] > ids[:-1]):
            order = np.argsort(ids, kind="stable")
            self._order: np.ndarray | None = order.astype(np.int32 if len(ids) < 2**31 else np.int64)
            ids = ids[order]
            dup = np.flatnonzero(ids[1:] == ids[:-1])
            if len(dup):
                raise CollectionError(f"image id {ids[dup[0]]} appears more than once in the shards")
        else:
            self._order = None
        self._sorted = ids

    def __len__(self) -> int:
        return len(self._sorted)

    @property
    def nbytes(self) -> int:
        return self._sorted.nbytes + (0 if self._order is None else self._order.nbytes)

    def locate(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(shard index, row in shard, found)`` for each id (arrays of the same length)."""
        ids = np.asarray(ids, dtype=np.int64)
        pos = np.searchsorted(self._sorted, ids)
        pos = np.minimum(pos, max(len(self._sorted) - 1, 0))
        found = (self._sorted[pos] == ids) if len(self._sorted) else np.zeros(len(ids), bool)
        glob = pos if self._order is None else self._order[pos].astype(np.int64)
        shard = np.searchsorted(self.offsets, glob, side="right") - 1
        return shard, glob - self.offsets[shard], found


class MetadataReader:
    """Reads the non-embedding columns of given rows, one Parquet row group at a time.

    Decoded row groups are kept in an LRU cache bounded by ``cache_bytes`` (0 disables it).
    Thread-safe: each shard's Parquet reader is used under its own lock.
    """

    def __init__(self, shard_paths: Sequence[Path], cache_bytes: int = 256 << 20):
        self.paths = list(shard_paths)
        self.cache_bytes = int(cache_bytes)
        self._files: dict[int, tuple[pq.ParquetFile, np.ndarray, list[str], threading.Lock]] = {}
        self._files_lock = threading.Lock()
        self._cache: OrderedDict[tuple[int, int], pa.Table] = OrderedDict()
        self._cache_lock = threading.Lock()
        self._cached = 0

    def _file(self, shard: int) -> tuple[pq.ParquetFile, np.ndarray, list[str], threading.Lock]:
        with self._files_lock:
            entry = self._files.get(shard)
            if entry is None:
                pf = pq.ParquetFile(self.paths[shard])
                md = pf.metadata
                starts = np.cumsum([0] + [md.row_group(i).num_rows for i in range(md.num_row_groups)])
                columns = [n for n in pf.schema_arrow.names if n != "embedding"]
                entry = self._files[shard] = (pf, starts, columns, threading.Lock())
            return entry

    def _row_group(self, shard: int, group: int) -> pa.Table:
        key = (shard, group)
        with self._cache_lock:
            table = self._cache.get(key)
            if table is not None:
                self._cache.move_to_end(key)
                return table
        pf, _, columns, lock = self._file(shard)
        with lock:
            table = pf.read_row_group(group, columns=columns).combine_chunks()
        if self.cache_bytes > 0:
            with self._cache_lock:
                if key not in self._cache:
                    self._cache[key] = table
                    self._cached += table.nbytes
                    while self._cached > self.cache_bytes and len(self._cache) > 1:
                        _, old = self._cache.popitem(last=False)
                        self._cached -= old.nbytes
        return table

    def rows(self, shards: np.ndarray, rows: np.ndarray) -> list[dict[str, Any]]:
        """The records (dicts of column values) at ``(shards[i], rows[i])``, in order.

        Single-row access into the (cached) row group: per row it is ~50x cheaper than an
        Arrow ``take`` + ``to_pylist``, whose per-call dispatch dominates at k <= 100.
        """
        out = []
        tables: dict[tuple[int, int], pa.Table] = {}
        for shard, row in zip(shards.tolist(), rows.tolist()):
            _, starts, _, _ = self._file(shard)
            g = int(np.searchsorted(starts, row, side="right") - 1)
            table = tables.get((shard, g))
            if table is None:
                table = tables[(shard, g)] = self._row_group(shard, g)
            r = row - int(starts[g])
            out.append({name: col[r].as_py() for name, col in zip(table.column_names, table.columns)})
        return out


class _LRU:
    """A small thread-safe LRU map (text -> embedding) with hit/miss counters."""

    def __init__(self, size: int):
        self.size = int(size)
        self._data: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, key: str) -> np.ndarray | None:
        with self._lock:
            value = self._data.get(key)
            if value is None:
                self.misses += 1
            else:
                self.hits += 1
                self._data.move_to_end(key)
            return value

    def put(self, key: str, value: np.ndarray) -> None:
        if self.size <= 0:
            return
        value = np.array(value, dtype=np.float32)
        value.flags.writeable = False
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.size:
                self._data.popitem(last=False)


# ---- the searcher ----------------------------------------------------------------------------

class Searcher:
    """Search one collection by text, image or embedding. Thread-safe; open with :meth:`open`."""

    def __init__(
        self,
        collection: Collection,
        index: Any | None,
        encoder: "Encoder | None" = None,
        device: str = "auto",
        text_cache_size: int = 1024,
        metadata_cache_mb: float = 256,
        exact_chunk_size: int = DEFAULT_CHUNK_SIZE,
        precision: str = "auto",
    ):
        self.collection = collection
        self.index = index
        self.device = device
        self.precision = precision  #: of the query model (see vlsearch.precision)
        self.exact_chunk_size = int(exact_chunk_size)
        if encoder is not None:
            collection.check_model(encoder.info, what="query model")
        self._encoder = encoder
        self._encoder_lock = threading.Lock()
        self.text_cache = _LRU(text_cache_size)
        self._params: dict[tuple[Any, Any], Any] = {}
        paths = collection.shard_paths(IMAGES_DIR)
        self.row_locator = RowLocator(paths)
        self.metadata_reader = MetadataReader(paths, cache_bytes=int(metadata_cache_mb * (1 << 20)))
        entry = collection.manifest.index or {}
        self.nprobe_default: int | None = entry.get("nprobe_default") or (
            _ivf_nprobe(index) if index is not None else None)
        self._l2 = index is not None and _is_l2(index)
        if index is not None and index.ntotal != len(self.row_locator):
            log.warning("index of %s holds %d vectors but the shards %d images: rebuild it to search them all",
                        collection.path, index.ntotal, len(self.row_locator))

    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        mmap: bool = False,
        device: str = "auto",
        encoder: "Encoder | None" = None,
        **options: Any,
    ) -> "Searcher":
        """Open a collection for search: manifest, id map and (if built) index; the model loads on
        first text/image query. ``mmap=True`` memory-maps the index. ``encoder`` must be the
        collection's model (else CollectionMismatchError). ``options``: ``text_cache_size``,
        ``metadata_cache_mb``, ``exact_chunk_size``, ``precision`` (of the query model)."""
        collection = Collection.open(path)
        index = load_index(collection, mmap=mmap) if collection.manifest.index is not None else None
        return cls(collection, index, encoder=encoder, device=device, **options)

    @property
    def dim(self) -> int:
        return self.collection.dim

    @property
    def has_index(self) -> bool:
        return self.index is not None

    @property
    def encoder(self) -> "Encoder":
        """The collection's model, loaded on first use (thread-safe)."""
        if self._encoder is None:
            with self._encoder_lock:
                if self._encoder is None:
                    from .models import load_model

                    m = self.collection.manifest.model
                    enc = load_model(m.name, m.pretrained, device=self.device, precision=self.precision)
                    self.collection.check_model(enc.info, what="query model")
                    self._encoder = enc
        return self._encoder

    # ---- public search calls ---------------------------------------------------------------
    def search_text(self, text: str | Sequence[str], k: int = 10, nprobe: int | None = None,
                    exact: bool = False, k_factor: float | None = None) -> Hits | Results:
        """Search by caption text: a string gives ``list[Hit]``, a list of strings ``list[list[Hit]]``."""
        single = isinstance(text, str)
        texts = _check_texts([text] if single else text)
        return self._search(self.embed_texts(texts), single, k, nprobe, exact, k_factor)

    def search_image(self, image: ImageQuery | Sequence[ImageQuery], k: int = 10, nprobe: int | None = None,
                     exact: bool = False, k_factor: float | None = None) -> Hits | Results:
        """Search by example image (path, PIL image or encoded bytes, or a list of them)."""
        single = not isinstance(image, (list, tuple))
        images = [image] if single else list(image)
        if not images:
            raise InvalidQueryError("no query image given (empty list)")
        return self._search(self.embed_images(images), single, k, nprobe, exact, k_factor)

    def search_vector(self, vector: np.ndarray, k: int = 10, nprobe: int | None = None,
                      exact: bool = False, k_factor: float | None = None) -> Hits | Results:
        """Search by embedding: ``(d,)`` gives ``list[Hit]``, ``(Q, d)`` gives ``list[list[Hit]]``."""
        arr = np.asarray(vector)
        return self._search(arr, arr.ndim == 1, k, nprobe, exact, k_factor)

    def knn(self, queries: np.ndarray, k: int = 10, nprobe: int | None = None, exact: bool = False,
            k_factor: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Raw top-k: ``(scores (Q,k) float32 cosine, ids (Q,k) int64)``, id -1 in empty slots."""
        q = self._check_vectors(queries)
        k = _check_k(k)
        if exact:
            return exact_search(q, self.collection, k, chunk_size=self.exact_chunk_size)
        return self._ann(q, k, nprobe, k_factor)

    # ---- embedding queries -----------------------------------------------------------------
    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Text embeddings through the LRU cache; only cache misses are encoded (in one batch)."""
        out = np.empty((len(texts), self.dim), np.float32)
        missing: dict[str, list[int]] = {}
        for i, t in enumerate(texts):
            vec = self.text_cache.get(t)
            if vec is None:
                missing.setdefault(t, []).append(i)
            else:
                out[i] = vec
        if missing:
            todo = list(missing)
            vecs = self.encoder.encode_texts(todo)
            for t, vec in zip(todo, vecs):
                self.text_cache.put(t, vec)
                out[missing[t]] = vec
        return out

    def embed_images(self, images: Sequence[ImageQuery]) -> np.ndarray:
        """Encode query images; an unreadable one raises InvalidQueryError naming it and why."""
        from .images import open_image

        pics = []
        for i, img in enumerate(images):
            if not isinstance(img, (str, os.PathLike, bytes, bytearray, memoryview)) and not _is_pil(img):
                raise InvalidQueryError(
                    f"query image {i} is a {type(img).__name__}: give a file path, a PIL image or encoded bytes")
            try:
                pics.append(open_image(img))
            except DecodeError as exc:
                raise InvalidQueryError(f"cannot read query image {_describe(img)}: {exc}") from exc
        return self.encoder.encode_images(pics)

    # ---- internals -------------------------------------------------------------------------
    def _search(self, vectors: np.ndarray, single: bool, k: int, nprobe: int | None, exact: bool,
                k_factor: float | None) -> Hits | Results:
        scores, ids = self.knn(vectors, k=k, nprobe=nprobe, exact=exact, k_factor=k_factor)
        results = self.hits(scores, ids)
        return results[0] if single else results

    def hits(self, scores: np.ndarray, ids: np.ndarray) -> Results:
        """Turn ``knn`` arrays into Hits with paths, captions and metadata from the shards."""
        valid = ids >= 0
        flat_ids = ids[valid]
        shard, row, found = self.row_locator.locate(flat_ids)
        if not found.all():
            raise CollectionError(
                f"the index returned id {int(flat_ids[~found][0])} that no shard of {self.collection.path} holds: "
                "the index is stale, rebuild it")
        records = iter(self.metadata_reader.rows(shard, row))
        results = Results()
        for q in range(ids.shape[0]):
            hits = Hits()
            for j in np.flatnonzero(valid[q]):
                rec = next(records)
                hits.append(_make_hit(rec, int(ids[q, j]), float(scores[q, j]), len(hits) + 1))
            results.append(hits)
        return results

    def _ann(self, q: np.ndarray, k: int, nprobe: int | None, k_factor: float | None) -> tuple[np.ndarray, np.ndarray]:
        if self.index is None:
            raise IndexNotBuiltError(
                f"collection {self.collection.path} has no ANN index: run `vlsearch build-index "
                f"{self.collection.path}` or search with exact=True (--exact)")
        if nprobe is not None and (isinstance(nprobe, bool) or not isinstance(nprobe, (int, np.integer)) or nprobe <= 0):
            raise InvalidQueryError(f"nprobe must be a positive integer, got {nprobe!r}")
        if k_factor is not None and not (isinstance(k_factor, (int, float)) and k_factor >= 1):
            raise InvalidQueryError(f"k_factor must be a number >= 1, got {k_factor!r}")
        key = (nprobe if nprobe is not None else self.nprobe_default, k_factor)
        params = self._params.get(key, _MISSING)
        if params is _MISSING:  # built once per setting; FAISS only reads them, so sharing is safe
            params = search_parameters(self.index, *key)
            if len(self._params) < 1024:
                self._params[key] = params
        scores, ids = self.index.search(q, k, params=params)
        if self._l2:
            scores = np.where(ids >= 0, 1.0 - scores / 2.0, scores).astype(np.float32)
        return scores, ids

    def _check_vectors(self, vectors: np.ndarray) -> np.ndarray:
        arr = np.asarray(vectors)
        if arr.ndim == 1:
            arr = arr[None, :]
        if arr.ndim != 2 or arr.shape[0] == 0:
            raise InvalidQueryError(f"query vectors must have shape (d,) or (Q, d) with Q >= 1, got {np.shape(vectors)}")
        if arr.shape[1] != self.dim:
            raise InvalidQueryError(
                f"query vector has dimension {arr.shape[1]}, but collection {self.collection.path} holds "
                f"{self.dim}-d embeddings ({self.collection.model.name})")
        if not np.issubdtype(arr.dtype, np.number):
            raise InvalidQueryError(f"query vectors must be numeric, got dtype {arr.dtype}")
        arr = np.array(arr, dtype=np.float32)
        norms = np.linalg.norm(arr, axis=1, keepdims=True)
        if not np.isfinite(norms).all() or (norms == 0).any():
            raise InvalidQueryError("query vectors must be finite and non-zero")
        return np.ascontiguousarray(arr / norms)

    def __repr__(self) -> str:
        factory = (self.collection.manifest.index or {}).get("factory")
        return f"Searcher({str(self.collection.path)!r}, images={len(self.row_locator)}, index={factory})"


def _make_hit(record: dict[str, Any], hit_id: int, score: float, rank: int) -> Hit:
    captions = record.get("captions") or []
    meta = {key: value for key, value in record.items() if key not in _NOT_METADATA}
    return Hit(id=hit_id, score=score, rank=rank, path=record.get("path"), caption=captions[0] if captions else None,
               metadata=meta)


def _check_k(k: int) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= 0:
        raise InvalidQueryError(f"k must be a positive integer, got {k!r}")
    return int(k)


def _check_texts(texts: Iterable[Any]) -> list[str]:
    if not isinstance(texts, (list, tuple)):
        raise InvalidQueryError(f"query text must be a string or a list of strings, got {type(texts).__name__}")
    if not texts:
        raise InvalidQueryError("no query text given (empty list)")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise InvalidQueryError(f"query text {i} is a {type(t).__name__}, not a string")
        if not t.strip():
            raise InvalidQueryError(f"query text {i} is empty")
    return list(texts)


def _is_pil(obj: Any) -> bool:
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover
        return False
    return isinstance(obj, Image.Image)


def _describe(img: Any) -> str:
    if isinstance(img, (bytes, bytearray, memoryview)):
        return f"({len(img)} bytes)"
    return str(img) if isinstance(img, (str, os.PathLike)) else type(img).__name__


def _is_l2(index: Any) -> bool:
    import faiss

    return index.metric_type == faiss.METRIC_L2
