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
  (:func:`vlsearch.ann.faiss_index.search_parameters`), so concurrent calls with different settings are independent.
* **Opening is cheap in memory**: only the ``id`` column of each shard is read, into an
  id -> (shard, row) map (8 bytes per image, 12 if ids are not sorted). Hits get their metadata
  by reading the one Parquet row group that holds them (no embedding column) and picking the
  row; decoded row groups stay in a bounded LRU cache (``metadata_cache_mb``).
* **The query model is the collection's**: loaded lazily with ``load_model(name, pretrained)``
  from the manifest, or passed in (and checked) as ``encoder``.
* **One collection version**: a Searcher reads the version it opened (its live shards and
  tombstones), whatever syncs commit meanwhile. Deleted rows are never returned, in ANN or exact
  mode, and a list is never short while enough live rows exist: queries whose IVF probe met too
  few live rows are redone probing more lists, exactly as the last resort.
* **Scores are cosine similarities** (query vectors are L2-normalised; an L2 index's squared
  distances are converted with ``1 - d/2``).
"""

from __future__ import annotations

import logging
import os
import threading
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import numpy as np

from vlsearch.store.layout import IMAGES_DIR
from vlsearch.store.collection import Collection
from vlsearch.core.errors import CollectionError, DecodeError, IndexNotBuiltError, InvalidQueryError
from vlsearch.query.exact import DEFAULT_CHUNK_SIZE, exact_search
from vlsearch.ann.faiss_index import find_ivf, is_l2, search_parameters, stored_nprobe
from vlsearch.ann.refine import DEFAULT_K_FACTOR, DiskRefine
from vlsearch.rerank.model import check_rerank_k
from vlsearch.query.results import Hit, Hits, Results, format_hits, hits_to_json_lines, make_hit
from vlsearch.store.rows import MetadataReader, RowLocator, TextCache
from vlsearch.query.subset import SubsetCache, SubsetPolicy, restricted_knn

from vlsearch.data.images import ImageInput

if TYPE_CHECKING:  # pragma: no cover
    from vlsearch.models.factory import Encoder

__all__ = ["Searcher", "Hit", "Hits", "Results", "format_hits", "hits_to_json_lines"]

log = logging.getLogger(__name__)

_MISSING = object()


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
        filter_cache_mb: float = 256,
        subset_policy: SubsetPolicy = SubsetPolicy(),
        precision: str = "auto",
        reranker: Any = None,
        rerank_features: str = "auto",
        exact_cache_mb: float = 256,
    ):
        self.collection = collection
        self.index = index
        self.device = device
        self.precision = precision  #: of the query model (see vlsearch.models.precision)
        self.exact_chunk_size = int(exact_chunk_size)
        if encoder is not None:
            collection.check_model(encoder.info, what="query model")
        self._encoder = encoder
        self._encoder_lock = threading.Lock()
        self.text_cache = TextCache(text_cache_size)
        self._params: dict[tuple[Any, Any], Any] = {}
        paths = collection.shard_paths(IMAGES_DIR)
        self.row_locator = RowLocator(paths, collection)
        self.metadata_reader = MetadataReader(paths, cache_bytes=int(metadata_cache_mb * (1 << 20)))
        self.subset_policy = subset_policy
        #: the re-ranker (a Reranker or a path; None: the one shipped for the collection's model),
        #: loaded on the first ``rerank=K`` query; ``rerank_features``: auto, stored or recompute
        self._reranker, self.rerank_features_mode = reranker, rerank_features
        self._rerank_features: Any = None
        self._reranker_checked = False
        self._subsets = SubsetCache(int(filter_cache_mb * (1 << 20)))
        #: exact search reads this version's vectors once into memory when they fit (else streams them)
        self._exact_cache_bytes = int(exact_cache_mb * (1 << 20))
        self._exact_db: tuple[np.ndarray, np.ndarray] | None = None
        self._exact_lock = threading.Lock()
        self._filter_engine: Any = None
        self._filter_lock = threading.Lock()
        entry = collection.manifest.index or {}
        self.nprobe_default: int | None = entry.get("nprobe_default") or (
            stored_nprobe(index) if index is not None else None)
        #: refine factor tuned at build time (None: the index file's own, or no refine stage)
        self.k_factor_default: float | None = entry.get("k_factor_default")
        #: exact re-scoring from the memory-mapped fp16 vectors file (``Refine(disk)`` indexes)
        self.disk_refine = DiskRefine.from_entry(collection.path, entry) if index is not None else None
        self._l2 = index is not None and is_l2(index)
        if index is not None and index.ntotal - int(entry.get("dead_entries", 0)) != len(self.row_locator):
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
        ``metadata_cache_mb``, ``exact_chunk_size``, ``filter_cache_mb`` (filter results and the
        vectors gathered for selective filters), ``exact_cache_mb`` (exact search holds the image
        vectors in memory, read once, when they take at most this much; else it streams the shards
        at every query), ``subset_policy``, ``precision`` (of the query model)."""
        collection = Collection.open(path)
        index = collection.load_index(mmap=mmap) if collection.manifest.index is not None else None
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
                    from vlsearch.models.factory import load_model

                    m = self.collection.manifest.model
                    enc = load_model(m.name, m.pretrained, device=self.device, precision=self.precision)
                    self.collection.check_model(enc.info, what="query model")
                    self._encoder = enc
        return self._encoder

    # ---- public search calls ---------------------------------------------------------------
    def search_text(self, text: str | Sequence[str], k: int = 10, nprobe: int | None = None,
                    exact: bool = False, k_factor: float | None = None, where: str | None = None,
                    rerank: int = 0) -> Hits | Results:
        """Search by caption text: a string gives ``list[Hit]``, a list of strings ``list[list[Hit]]``.
        ``where``: a metadata filter (SQL condition, see :mod:`vlsearch.query.filters`).
        ``rerank=K`` (K >= k; 0 = off): re-score the first stage's top K with the cross-attention
        re-ranker (:mod:`vlsearch.rerank.model`) and return its best k; ``Hit.score`` is then the
        re-rank score and ``Hit.first_stage_score`` the cosine."""
        single = isinstance(text, str)
        texts = _check_texts([text] if single else text)
        depth = check_rerank_k(rerank, _check_k(k))
        if not depth:
            return self._search(self.embed_texts(texts), single, k, nprobe, exact, k_factor, where)
        from vlsearch.rerank.model import text_tokens

        states, mask, vectors = text_tokens(self.encoder, texts, with_embeddings=True)  # one text-tower pass
        scores, ids = self.knn(vectors, k=depth, nprobe=nprobe, exact=exact, k_factor=k_factor, where=where)
        results = self.hits(*self.rerank(texts, scores, ids, k, tokens=(states, mask)))
        return results[0] if single else results

    # ---- re-ranking ------------------------------------------------------------------------
    @property
    def reranker(self) -> Any:
        """The collection model's :class:`~vlsearch.rerank.model.Reranker` (loaded and checked on first use)."""
        from vlsearch.rerank.model import Reranker, load_reranker

        if not self._reranker_checked:
            with self._encoder_lock:
                if not self._reranker_checked:
                    given = self._reranker
                    if not isinstance(given, Reranker):
                        given = load_reranker(self.collection.model, given)
                    given.check_model(self.collection.model)
                    self._reranker, self._reranker_checked = given, True
        return self._reranker

    @property
    def rerank_features(self) -> Any:
        """Where candidates' re-rank features come from (:class:`~vlsearch.rerank.features.CandidateFeatures`)."""
        if self._rerank_features is None:
            from vlsearch.rerank.features import CandidateFeatures

            reranker = self.reranker
            with self._filter_lock:
                if self._rerank_features is None:
                    self._rerank_features = CandidateFeatures(
                        self.collection, reranker, lambda: self.encoder, self.row_locator.paths,
                        self.row_locator.locate, self.metadata_reader.rows, self.rerank_features_mode)
        return self._rerank_features

    def rerank(self, texts: Sequence[str], scores: np.ndarray, ids: np.ndarray, k: int,
               tokens: tuple[Any, Any] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Re-score each query's candidates ``(scores, ids)`` (Q, K) with the re-ranker; returns the
        best ``k`` as ``(final scores, ids, first-stage scores)`` (Q, k), id -1 in empty slots.
        ``tokens``: the texts' ``text_tokens`` (states, mask) when already computed."""
        from vlsearch.rerank.model import text_tokens

        reranker, features = self.reranker, self.rerank_features
        states, mask = tokens if tokens is not None else text_tokens(self.encoder, list(texts))
        out = (np.full((len(ids), k), -np.inf, np.float32), np.full((len(ids), k), -1, np.int64),
               np.full((len(ids), k), -np.inf, np.float32))
        for q in range(len(ids)):
            valid = ids[q] >= 0
            if not valid.any():
                continue
            kv, hub = features.candidates(ids[q][valid])
            final = reranker.combine(scores[q][valid], reranker.itm_logits(states[q], mask[q], kv), hub)
            best = np.argsort(-final, kind="stable")[:k]
            n = len(best)
            out[0][q, :n], out[1][q, :n], out[2][q, :n] = final[best], ids[q][valid][best], scores[q][valid][best]
        return out

    def search_image(self, image: ImageInput | Sequence[ImageInput], k: int = 10, nprobe: int | None = None,
                     exact: bool = False, k_factor: float | None = None, where: str | None = None) -> Hits | Results:
        """Search by example image (path, PIL image or encoded bytes, or a list of them)."""
        single = not isinstance(image, (list, tuple))
        images = [image] if single else list(image)
        if not images:
            raise InvalidQueryError("no query image given (empty list)")
        return self._search(self.embed_images(images), single, k, nprobe, exact, k_factor, where)

    def search_vector(self, vector: np.ndarray, k: int = 10, nprobe: int | None = None,
                      exact: bool = False, k_factor: float | None = None, where: str | None = None) -> Hits | Results:
        """Search by embedding: ``(d,)`` gives ``list[Hit]``, ``(Q, d)`` gives ``list[list[Hit]]``."""
        arr = np.asarray(vector)
        return self._search(arr, arr.ndim == 1, k, nprobe, exact, k_factor, where)

    def knn(self, queries: np.ndarray, k: int = 10, nprobe: int | None = None, exact: bool = False,
            k_factor: float | None = None, where: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Raw top-k: ``(scores (Q,k) float32 cosine, ids (Q,k) int64)``, id -1 in empty slots.
        With ``where``, the top-k of the images passing the filter (k hits whenever k pass)."""
        q = self._check_vectors(queries)
        k = _check_k(k)
        if where is not None:
            return self._filtered_knn(q, k, where, nprobe, exact, k_factor)
        if exact:
            return self._exact(q, k)
        scores, ids = self._ann(q, k, nprobe, k_factor)
        return self._fill_short(q, k, nprobe, k_factor, scores, ids)

    def _fill_short(self, q: np.ndarray, k: int, nprobe: int | None, k_factor: float | None, scores: np.ndarray,
                    ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Redo the queries whose IVF probe met fewer than k live rows (while more exist) with 4x
        the lists each round, and exactly if every list was probed and they are still short."""
        def short() -> np.ndarray:
            return np.flatnonzero((ids < 0).any(axis=1) & (len(self.row_locator) > (ids >= 0).sum(axis=1)))

        nlist = int((self.collection.manifest.index or {}).get("nlist") or 0)
        probe = nprobe or self.nprobe_default or nlist
        rows = short()
        while len(rows) and probe < nlist:
            probe = min(nlist, 4 * probe)
            scores[rows], ids[rows] = self._ann(q[rows], k, probe, k_factor)
            rows = short()
        if len(rows):
            scores[rows], ids[rows] = self._exact(q[rows], k)
        return scores, ids

    def _exact(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k over this version's images: from memory when they fit ``exact_cache_mb``
        (read on the first exact query), else streamed from the shards."""
        if self._exact_db is None and len(self.row_locator) * self.dim * 4 <= self._exact_cache_bytes:
            with self._exact_lock:
                if self._exact_db is None:
                    self._exact_db = self.collection.read_embeddings()
        if self._exact_db is None:
            return exact_search(q, self.collection, k, chunk_size=self.exact_chunk_size)
        ids, vectors = self._exact_db
        return exact_search(q, vectors, k, ids=ids, chunk_size=self.exact_chunk_size)

    # ---- metadata filters ------------------------------------------------------------------
    @property
    def filter_engine(self) -> Any:
        """The :class:`~vlsearch.query.filters.FilterEngine` over this searcher's shards (non-embedding
        columns), built on the first filtered query and kept for this collection version."""
        if self._filter_engine is None:
            with self._filter_lock:
                if self._filter_engine is None:
                    from vlsearch.query.filters import FilterEngine

                    self._filter_engine = FilterEngine.from_shards(self.row_locator.paths, self.collection)
        return self._filter_engine

    def filter_ids(self, where: str) -> np.ndarray:
        """Sorted ids of the images passing ``where`` (cached per filter); InvalidQueryError if bad."""
        return self._subset(where).ids

    def _subset(self, where: str) -> Any:
        compiled = self.filter_engine.compile(where)
        return self._subsets.get_or_build(compiled.sql, lambda: self._live(self.filter_engine.matching_ids(compiled)))

    def _live(self, ids: np.ndarray) -> np.ndarray:
        """The ids this searcher's row map holds (rows it cannot return are never allowed)."""
        found = self.row_locator.locate(ids)[2]
        return ids if found.all() else ids[found]

    def _filtered_knn(self, q: np.ndarray, k: int, where: str, nprobe: int | None, exact: bool,
                      k_factor: float | None) -> tuple[np.ndarray, np.ndarray]:
        self._check_ann_options(nprobe, k_factor)
        subset = self._subset(where)
        ivf = None if self.index is None else find_ivf(self.index)
        if k_factor is None:  # a filtered shortlist needs more re-ranking than the index default
            stored = (self.collection.manifest.index or {}).get("refine_k_factor") or 0
            k_factor = max(float(stored), self.subset_policy.min_k_factor)
        ann = None if self.index is None else (lambda qq, kk, probe, sel: self._ann(qq, kk, probe, k_factor, sel))
        return restricted_knn(
            q, k, subset, self.row_locator, self.dim, ann=ann,
            ntotal=len(self.row_locator), nprobe=nprobe if nprobe is not None else self.nprobe_default,
            nlist=None if ivf is None else int(ivf.nlist), exact=exact, policy=self.subset_policy,
            chunk_size=self.exact_chunk_size)

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

    def embed_images(self, images: Sequence[ImageInput]) -> np.ndarray:
        """Encode query images; an unreadable one raises InvalidQueryError naming it and why."""
        from vlsearch.data.images import open_image

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
                k_factor: float | None, where: str | None = None) -> Hits | Results:
        scores, ids = self.knn(vectors, k=k, nprobe=nprobe, exact=exact, k_factor=k_factor, where=where)
        results = self.hits(scores, ids)
        return results[0] if single else results

    def hits(self, scores: np.ndarray, ids: np.ndarray, first_stage: np.ndarray | None = None) -> Results:
        """Turn ``knn`` arrays into Hits with paths, captions and metadata from the shards
        (``first_stage``: the first-stage scores of re-ranked hits)."""
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
                first = None if first_stage is None else float(first_stage[q, j])
                hits.append(make_hit(rec, int(ids[q, j]), float(scores[q, j]), len(hits) + 1, first))
            results.append(hits)
        return results

    def _check_ann_options(self, nprobe: int | None, k_factor: float | None) -> None:
        if nprobe is not None and (isinstance(nprobe, bool) or not isinstance(nprobe, (int, np.integer)) or nprobe <= 0):
            raise InvalidQueryError(f"nprobe must be a positive integer, got {nprobe!r}")
        if k_factor is not None and not (isinstance(k_factor, (int, float)) and k_factor >= 1):
            raise InvalidQueryError(f"k_factor must be a number >= 1, got {k_factor!r}")

    def _ann(self, q: np.ndarray, k: int, nprobe: int | None, k_factor: float | None,
             sel: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """ANN top-k; ``sel`` (a FAISS IDSelector) restricts it to the ids it accepts."""
        if self.index is None:
            raise IndexNotBuiltError(
                f"collection {self.collection.path} has no ANN index: run `vlsearch build-index "
                f"{self.collection.path}` or search with exact=True (--exact)")
        self._check_ann_options(nprobe, k_factor)
        key = (nprobe if nprobe is not None else self.nprobe_default,
               k_factor if k_factor is not None else self.k_factor_default)
        live = self._live_selector()
        if sel is not None:  # a selector belongs to one filter: not cached
            import faiss

            both = sel if live is None else faiss.IDSelectorAnd(sel, live)
            params = search_parameters(self.index, *key, sel=both)
            if live is not None:
                params.vlsearch_refs = [sel, live, both]  # FAISS holds raw pointers
        else:
            params = self._params.get(key, _MISSING)
            if params is _MISSING:  # built once per setting; FAISS only reads them, so sharing is safe
                params = search_parameters(self.index, *key, sel=live)
                if len(self._params) < 1024:
                    self._params[key] = params
        if self.disk_refine is not None:
            scores, ids = self.disk_refine.search(self.index, q, k, key[1] or DEFAULT_K_FACTOR, params)
        else:
            scores, ids = self.index.search(q, k, params=params)
        if self._l2:
            scores = np.where(ids >= 0, 1.0 - scores / 2.0, scores).astype(np.float32)
        return scores, ids

    def _live_selector(self) -> Any | None:
        """``IDSelector`` (on image ids) of the index entries still live in this version, or None
        when every entry is (removed ids normally leave the index; see ``vlsearch.store.update``).
        A filter's selector is ANDed with it (``faiss.IDSelectorAnd``)."""
        from vlsearch.ann.live import live_selector

        return live_selector(self.index, self.collection.manifest.index)

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
