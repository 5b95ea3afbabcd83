"""The k-NN plan of a batch of query vectors: ANN, exact or filtered, and never a short list.

* **ANN** (:class:`AnnSearch`) passes ``nprobe`` and the refine factor in a FAISS
  ``SearchParameters`` tree built per setting (:func:`vlsearch.ann.faiss_index.search_parameters`),
  so concurrent calls with different settings never touch the shared index. Dead index entries
  of this collection version are excluded by the live-rows selector.
* **Exact** (:class:`ExactSearch`) scores this version's vectors, held in memory when they fit
  ``exact_cache_mb`` (read on the first exact query), else streamed from the shards.
* **Filtered** (:class:`FilterSubsets`): ``where`` -> the allowed ids (cached per checked filter),
  searched by :func:`vlsearch.query.subset.restricted_knn` (exact over the subset, or ANN with an
  ``IDSelector``).
* **Fill-short**: queries whose IVF probe met fewer than k live rows (while more exist) are redone
  probing more lists, and exactly as the last resort.

Scores are cosine similarities (an L2 index's squared distances are converted with ``1 - d/2``).
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import numpy as np

from vlsearch.ann.faiss_index import find_ivf, is_l2, keep_referenced, search_parameters, stored_nprobe
from vlsearch.ann.live import live_selector
from vlsearch.ann.refine import DEFAULT_K_FACTOR, DiskRefine, IndexRows
from vlsearch.core.cache import ByteLRU
from vlsearch.core.lazy import Lazy
from vlsearch.core.errors import IndexNotBuiltError, InvalidQueryError
from vlsearch.query.exact import exact_search
from vlsearch.query.filters import FilterEngine
from vlsearch.query.options import SearcherOptions, budget
from vlsearch.query.subset import Subset, restricted_knn
from vlsearch.store.gather import StoredVectors, open_rows
from vlsearch.store.collection import Collection
from vlsearch.store.rows import RowLocator

#: A ``SearchParameters`` tree is a few small C++ structs whose size Python cannot see: each
#: cached one counts as this many bytes, so the 256 KiB budget keeps 1,024 settings.
PARAMS_BYTES = 256
PARAMS_CACHE_BYTES = 1024 * PARAMS_BYTES

Knn = tuple[np.ndarray, np.ndarray]

log = logging.getLogger(__name__)


def check_k(k: Any) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= 0:
        raise InvalidQueryError(f"k must be a positive integer, got {k!r}")
    return int(k)


def check_ann_options(nprobe: Any, k_factor: Any) -> None:
    if nprobe is not None and (isinstance(nprobe, bool) or not isinstance(nprobe, (int, np.integer)) or nprobe <= 0):
        raise InvalidQueryError(f"nprobe must be a positive integer, got {nprobe!r}")
    if k_factor is not None and not (isinstance(k_factor, (int, float)) and k_factor >= 1):
        raise InvalidQueryError(f"k_factor must be a number >= 1, got {k_factor!r}")


def check_vectors(vectors: Any, collection: Collection) -> np.ndarray:
    """Query vectors as a contiguous ``(Q, d)`` float32 array of unit rows, else InvalidQueryError."""
    arr = np.asarray(vectors)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[0] == 0:
        raise InvalidQueryError(f"query vectors must have shape (d,) or (Q, d) with Q >= 1, got {np.shape(vectors)}")
    if arr.shape[1] != collection.dim:
        raise InvalidQueryError(
            f"query vector has dimension {arr.shape[1]}, but collection {collection.path} holds "
            f"{collection.dim}-d embeddings ({collection.model.name})")
    if not np.issubdtype(arr.dtype, np.number):
        raise InvalidQueryError(f"query vectors must be numeric, got dtype {arr.dtype}")
    arr = np.array(arr, dtype=np.float32)
    norms = np.linalg.norm(arr, axis=1, keepdims=True)
    if not np.isfinite(norms).all() or (norms == 0).any():
        raise InvalidQueryError("query vectors must be finite and non-zero")
    return np.ascontiguousarray(arr / norms)


class AnnSearch:
    """ANN top-k over the collection's index (None: IndexNotBuiltError on search), with
    per-call ``SearchParameters`` cached per ``(nprobe, k_factor)``."""

    def __init__(self, collection: Collection, index: Any | None, options: SearcherOptions):
        check_ann_options(options.nprobe_default, options.k_factor_default)
        entry = collection.manifest.index or {}
        self.index, self.path = index, collection.path
        self.nprobe_default: int | None = options.nprobe_default or entry.get("nprobe_default") or (
            stored_nprobe(index) if index is not None else None)
        #: refine factor tuned at build time (None: the index file's own, or no refine stage)
        self.k_factor_default: float | None = options.k_factor_default or entry.get("k_factor_default")
        #: exact re-scoring from the memory-mapped fp16 vectors file (``Refine(disk)`` indexes)
        self.disk_refine = DiskRefine.from_entry(collection.path, entry) if index is not None else None
        self._l2 = index is not None and is_l2(index)
        #: dead entries of this version are never returned; a filter's selector is ANDed with it
        self._live = live_selector(index, entry) if index is not None else None
        self._params = ByteLRU(PARAMS_CACHE_BYTES, sizeof=lambda _: PARAMS_BYTES)

    def search(self, q: np.ndarray, k: int, nprobe: int | None, k_factor: float | None, sel: Any = None) -> Knn:
        """ANN top-k; ``sel`` (a FAISS IDSelector) restricts it to the ids it accepts."""
        if self.index is None:
            raise IndexNotBuiltError(
                f"collection {self.path} has no ANN index: run `vlsearch build-index "
                f"{self.path}` or search with exact=True (--exact)")
        check_ann_options(nprobe, k_factor)
        key = (nprobe if nprobe is not None else self.nprobe_default,
               k_factor if k_factor is not None else self.k_factor_default)
        params = self._parameters(key, sel)
        if self.disk_refine is not None:
            scores, ids = self.disk_refine.search(self.index, q, k, key[1] or DEFAULT_K_FACTOR, params)
        else:
            scores, ids = self.index.search(q, k, params=params)
        if self._l2:
            scores = np.where(ids >= 0, 1.0 - scores / 2.0, scores).astype(np.float32)
        return scores, ids

    def _parameters(self, key: tuple[Any, Any], sel: Any) -> Any:
        if sel is not None:  # a selector belongs to one filter: not cached
            import faiss

            both = sel if self._live is None else faiss.IDSelectorAnd(sel, self._live)
            params = search_parameters(self.index, *key, sel=both)
            if self._live is not None:
                keep_referenced(params, sel, self._live, both)  # FAISS holds raw pointers
            return params
        cached = self._params.get(key)  # built once per setting; FAISS only reads them, so sharing is safe
        if cached is None:
            cached = self._params.put(key, (search_parameters(self.index, *key, sel=self._live),))
        return cached[0]


class ExactSearch:
    """Exact top-k over this version's images: from memory when they fit ``cache_bytes`` (read
    on the first exact query), else streamed from the shards."""

    def __init__(self, collection: Collection, rows: int, cache_bytes: int, chunk_size: int):
        self.collection, self.chunk_size = collection, int(chunk_size)
        fits = rows * collection.dim * 4 <= cache_bytes
        self._db = Lazy(collection.read_embeddings) if fits else None

    @property
    def warm(self) -> bool:
        """Whether the vectors are held in memory (they are read on the first exact query)."""
        return self._db is not None and self._db.made

    def warm_up(self) -> None:
        """Read the vectors into memory now, when they fit (else nothing to do)."""
        if self._db is not None:
            self._db.get()

    def search(self, q: np.ndarray, k: int) -> Knn:
        if self._db is None:
            return exact_search(q, self.collection, k, chunk_size=self.chunk_size)
        ids, vectors = self._db.get()
        return exact_search(q, vectors, k, ids=ids, chunk_size=self.chunk_size)


class FilterSubsets:
    """``where`` -> the :class:`Subset` of ids passing it, among the rows the row map holds
    (rows it cannot return are never allowed). The :class:`FilterEngine` over the shards'
    non-embedding columns is built on the first filtered query (or given: one engine per
    collection version can be shared); subsets are kept by checked SQL in a ByteLRU."""

    def __init__(self, rows: RowLocator, collection: Collection, cache_bytes: int):
        self.rows, self.collection = rows, collection
        self._subsets = ByteLRU(cache_bytes)
        # no reference back to self: a version's objects must not form cycles (its lease is let
        # go by reference counting when a Searcher moves on)
        self._engine: Lazy[FilterEngine] = Lazy(functools.partial(FilterEngine.from_shards, self.rows.paths,
                                                                  collection))

    @property
    def engine(self) -> FilterEngine:
        return self._engine.get()

    @property
    def built(self) -> bool:
        """Whether the filter engine is built (on the first filtered query, or given)."""
        return self._engine.made

    @engine.setter
    def engine(self, engine: FilterEngine) -> None:
        self._engine.set(engine)

    def subset(self, where: str) -> Subset:
        compiled = self.engine.compile(where)
        subset = self._subsets.get(compiled.sql)
        if subset is None:
            subset = Subset(self._live(self.engine.matching_ids(compiled)))
        # (re-)stored at each use: its selector and gathered vectors grow it after it is built
        return self._subsets.put(compiled.sql, subset)

    def _live(self, ids: np.ndarray) -> np.ndarray:
        found = self.rows.locate(ids)[2]
        return ids if found.all() else ids[found]


class KnnPlan:
    """Raw top-k of query vectors: ANN, exact or filtered, never short while enough rows exist."""

    def __init__(self, collection: Collection, index: Any | None, rows: RowLocator, options: SearcherOptions):
        self.collection, self.index, self.rows, self.options = collection, index, rows, options
        self.ann = AnnSearch(collection, index, options)
        self.exact = ExactSearch(collection, len(rows), budget(options.exact_cache_mb), options.exact_chunk_size)
        self.filters = FilterSubsets(rows, collection, budget(options.filter_cache_mb))
        entry = collection.manifest.index or {}
        #: stored vectors by id (filtered exact search, dedup, item terms): the index's rows file, or an
        #: uncompressed index's own vectors (an adopted autofaiss HNSW32), else the shards
        self.stored = StoredVectors(rows, collection.dim, self.ann.disk_refine or open_rows(collection.path, entry)
                                    or IndexRows.of(index))
        if index is not None and index.ntotal - int(entry.get("dead_entries", 0)) != len(rows):
            log.warning("index of %s holds %d vectors but the shards %d images: rebuild it to search them all",
                        collection.path, index.ntotal, len(rows))

    def knn(self, queries: np.ndarray, k: int = 10, nprobe: int | None = None, exact: bool = False,
            k_factor: float | None = None, where: str | None = None) -> Knn:
        """``(scores (Q,k) float32 cosine, ids (Q,k) int64)``, id -1 in empty slots."""
        q, k = check_vectors(queries, self.collection), check_k(k)
        if where is not None:
            return self._filtered(q, k, where, nprobe, exact, k_factor)
        if exact:
            return self.exact.search(q, k)
        scores, ids = self.ann.search(q, k, nprobe, k_factor)
        return self._fill_short(q, k, nprobe, k_factor, scores, ids)

    def _fill_short(self, q: np.ndarray, k: int, nprobe: int | None, k_factor: float | None, scores: np.ndarray,
                    ids: np.ndarray) -> Knn:
        """Redo the queries whose IVF probe met fewer than k live rows (while more exist) with 4x
        the lists each round, and exactly if every list was probed and they are still short."""
        def short() -> np.ndarray:
            return np.flatnonzero((ids < 0).any(axis=1) & (len(self.rows) > (ids >= 0).sum(axis=1)))

        nlist = int((self.collection.manifest.index or {}).get("nlist") or 0)
        probe = nprobe or self.ann.nprobe_default or nlist
        rows = short()
        while len(rows) and probe < nlist:
            probe = min(nlist, 4 * probe)
            scores[rows], ids[rows] = self.ann.search(q[rows], k, probe, k_factor)
            rows = short()
        if len(rows):
            scores[rows], ids[rows] = self.exact.search(q[rows], k)
        return scores, ids

    def _filtered(self, q: np.ndarray, k: int, where: str, nprobe: int | None, exact: bool,
                  k_factor: float | None) -> Knn:
        check_ann_options(nprobe, k_factor)
        subset, policy = self.filters.subset(where), self.options.subset_policy
        ivf = None if self.index is None else find_ivf(self.index)
        if k_factor is None:  # a filtered shortlist needs more re-ranking than the index default
            stored = (self.collection.manifest.index or {}).get("refine_k_factor") or 0
            k_factor = max(float(stored), policy.min_k_factor)
        ann = None if self.index is None else (lambda qq, kk, probe, sel: self.ann.search(qq, kk, probe, k_factor, sel))
        return restricted_knn(
            q, k, subset, self.stored, ann=ann,
            ntotal=len(self.rows), nprobe=nprobe if nprobe is not None else self.ann.nprobe_default,
            nlist=None if ivf is None else int(ivf.nlist), exact=exact, policy=policy,
            chunk_size=self.options.exact_chunk_size)
