"""The query engine: text, image and vector search over a collection.

::

    from vlsearch import Searcher
    s = Searcher.open("my-collection")           # manifest + id map + index; model on first use
    hits = s.search_text("a dog running on the beach", k=10)
    batch = s.search_image(["q1.jpg", "q2.jpg"], k=5)   # list[list[Hit]]
    hits = s.search_vector(vec, k=10, nprobe=64, k_factor=4)
    hits = s.search_text("...", exact=True)       # brute force over the shards (no index needed)
    hits = s.search([("a golden retriever", 2.0), (Path("pool.jpg"), 1.0), ("fruit", -1.0)])
    hits = s.more_like([12, 40], negative_ids=[7])  # recommend from stored examples
    hits = s.search_text("...", min_score=0.3, order_by="file_mtime_ns DESC", facets=["folder"])  # shaped:
    hits.facets                                   # see vlsearch.query.shaping
    s = Searcher.open("my-collection", options=SearcherOptions(device="cuda", exact_cache_mb=0))
    with Searcher.open("my-collection", follow=True) as s:   # moves to each version a sync commits
        ...

``Searcher`` is the facade over one module per step: query embedding
(:mod:`vlsearch.query.embedding`), the ANN / exact / filtered k-NN plan (:mod:`vlsearch.query.plan`),
re-ranking (:mod:`vlsearch.query.reranking`), weighted terms and examples
(:mod:`vlsearch.query.terms`) and hit building (:mod:`vlsearch.query.hits`); its
settings are one :class:`~vlsearch.query.options.SearcherOptions`. Design points:

* **Per-call parameters never touch the shared index** (per-call FAISS ``SearchParameters``), so
  concurrent calls with different settings are independent.
* **Opening is cheap in memory**: only the ``id`` column of each shard is read, into an
  id -> (shard, row) map (8 bytes per image, 12 if ids are not sorted). Hits get their metadata
  by reading the one Parquet row group that holds them (no embedding column); decoded row groups
  stay in a byte-bounded LRU cache (``metadata_cache_mb``).
* **The query model is the collection's**: loaded lazily with ``load_model(name, pretrained)``
  from the manifest, or passed in (and checked) as ``encoder``.
* **Versions**: a Searcher reads one collection version at a time (its live shards and
  tombstones; :mod:`vlsearch.query.version`), and holds a lease on it so that no writer removes its
  files. :meth:`Searcher.refresh` moves it to a newer version once that is loaded and warmed;
  ``Searcher.open(path, follow=True)`` does so by itself (a thread checks ``manifest.json`` every
  second). A call runs on the version it started on, whatever switch happens meanwhile;
  :meth:`Searcher.snapshot` pins one version for several calls. Deleted rows are never returned,
  in ANN or exact mode, and a list is never short while enough live rows exist.
* **Scores are cosine similarities** (query vectors are L2-normalised).
"""

from __future__ import annotations

import os
import threading
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from vlsearch.core.cache import ByteLRU
from vlsearch.core.errors import InvalidQueryError
from vlsearch.core.inputs import ImageInput
from vlsearch.query.embedding import QueryEmbedder, TextQuery, check_texts
from vlsearch.query.filters import FilterEngine
from vlsearch.query.hybrid import RRF_K, check_mode
from vlsearch.query.follow import Follower, OnError, follow_interval
from vlsearch.query.options import SearcherOptions
from vlsearch.query.plan import KnnPlan, check_k
from vlsearch.query.reranking import Reranked, RerankStage
from vlsearch.query.results import Hit, Hits, Results, format_hits, hits_to_json_lines
from vlsearch.query.shaped import shaped_mode_search, shaped_text_search, shaped_vector_search
from vlsearch.query.shaping import Shape
from vlsearch.query.term_search import item_vectors, term_vectors, without_ids
from vlsearch.query.terms import NEGATIVE_WEIGHT, Item, Query, TermLike, check_examples, combine, feedback_vector
from vlsearch.query.version import SearcherVersion, SharedParts, Stamp, manifest_stamp
from vlsearch.rerank.model import check_rerank_k
from vlsearch.store.collection import Collection
from vlsearch.store.rows import MetadataReader, RowLocator

if TYPE_CHECKING:  # pragma: no cover
    from vlsearch.models.factory import Encoder

__all__ = ["Searcher", "SearcherOptions", "Hit", "Hits", "Results", "format_hits", "hits_to_json_lines"]


class Searcher:
    """Search one collection by text, image or embedding. Thread-safe; open with :meth:`open`.

    ``collection``: the version to read, as opened (leased or not; :meth:`open` leases it);
    ``encoder``: the collection's model, if already loaded (else loaded on the first text or
    image query); ``reranker``: a Reranker or its file (None: the one shipped for the collection's
    model), loaded on the first ``rerank=K`` query."""

    def __init__(self, collection: Collection, index: Any | None, encoder: "Encoder | None" = None,
                 reranker: Any = None, options: SearcherOptions = SearcherOptions()):
        shared = SharedParts.create(collection, encoder, reranker, options)
        self._setup(shared, SearcherVersion(collection, index, shared), pinned=False)

    def _setup(self, shared: SharedParts, version: SearcherVersion, pinned: bool) -> None:
        self._shared, self._current, self._pinned = shared, version, pinned
        self._refresh_lock = threading.Lock()
        self._stamp: Stamp = None  # None: the first refresh reads the manifest
        self._follower: Follower | None = None
        #: the exception of the last refresh, if it failed (None once one succeeds)
        self.last_refresh_error: Exception | None = None

    @classmethod
    def open(cls, path: str | os.PathLike, mmap: bool = False, encoder: "Encoder | None" = None,
             reranker: Any = None, options: SearcherOptions | None = None, *, follow: bool | float = False,
             on_refresh_error: OnError | None = None, **overrides: Any) -> "Searcher":
        """Open a collection for search: manifest, id map and (if built) index, its current version
        leased; the model loads on first text/image query. ``mmap=True`` memory-maps the index.
        ``encoder`` must be the collection's model (else CollectionMismatchError). ``overrides``:
        fields of ``options`` (:class:`SearcherOptions`) to change, e.g. ``device="cpu"``.

        ``follow=True`` (or a number of seconds, default 1): a daemon thread calls
        :meth:`refresh` at that interval, so the Searcher moves to each new version; its errors go
        to ``on_refresh_error`` and :attr:`last_refresh_error`. :meth:`close` stops it."""
        interval = follow_interval(follow)
        options = replace(options or SearcherOptions(), **overrides)
        collection = Collection.open(path, lease=True)
        try:
            shared = SharedParts.create(collection, encoder, reranker, options, mmap)
        except BaseException:
            collection.release()
            raise
        searcher = cls._over(shared, shared.load(collection), pinned=False)
        if interval is not None:
            searcher._follower = Follower(searcher, interval, on_refresh_error,
                                          name=f"vlsearch-follow-{collection.path.name}")
        return searcher

    @classmethod
    def _over(cls, shared: SharedParts, version: SearcherVersion, pinned: bool) -> "Searcher":
        searcher = cls.__new__(cls)
        searcher._setup(shared, version, pinned)
        return searcher

    # ---- versions ----------------------------------------------------------------------------
    def refresh(self) -> bool:
        """Move to the collection's newest version if a newer one was committed; whether it moved.

        Cheap when nothing changed (one ``os.stat`` of ``manifest.json``). A newer version is
        opened (leased), its index loaded and what this version has warm warmed (exact-search
        vectors, filter engine, re-rank features) before the switch; calls already running finish
        on the version they started on. The replaced version's lease is let go as soon as no call
        or :meth:`snapshot` uses it. A snapshot never moves (False). CollectionError when the new
        version cannot be read: the current one stays."""
        if self._pinned:
            return False
        with self._refresh_lock:  # one refresh builds at a time; the others then find nothing new
            try:
                moved = self._refresh()
            except Exception as exc:
                self.last_refresh_error = exc
                raise
            self.last_refresh_error = None
            return moved

    def _refresh(self) -> bool:
        stamp = manifest_stamp(self._shared.path)  # before the read: a commit after it is seen next time
        if stamp is not None and stamp == self._stamp:
            return False
        new = self._shared.open_newer(self._current)
        self._stamp = stamp
        if new is None:
            return False
        self._current = new  # one reference assignment: each call reads it once, at its start
        return True

    def snapshot(self) -> "Searcher":
        """A Searcher pinned to the version this one reads now, sharing its model and caches
        (cheap): several calls on it (search, hits, item reads) all see that one version."""
        return self._over(self._shared, self._current, pinned=True)

    @property
    def version(self) -> int:
        """The collection version this Searcher reads."""
        return self._current.version

    @property
    def loaded_at(self) -> str:
        """When the version read was loaded (ISO 8601, UTC)."""
        return self._current.loaded_at

    @property
    def following(self) -> bool:
        """Whether a thread moves this Searcher to new versions (``open(..., follow=...)``)."""
        return self._follower is not None and self._follower.running

    def close(self) -> None:
        """Stop following and let go of the version's lease (a snapshot holds none of its own)."""
        if self._follower is not None:
            self._follower.stop()
            self._follower = None
        if not self._pinned:
            self._current.release()

    def __enter__(self) -> "Searcher":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- the current version's parts ---------------------------------------------------------
    @property
    def collection(self) -> Collection:
        return self._current.collection

    @property
    def index(self) -> Any | None:
        return self._current.index

    @property
    def row_locator(self) -> RowLocator:
        return self._current.row_locator

    @property
    def metadata_reader(self) -> MetadataReader:
        return self._current.metadata_reader

    @property
    def plan(self) -> KnnPlan:
        return self._current.plan

    @property
    def reranking(self) -> RerankStage:
        return self._current.reranking

    @property
    def options(self) -> SearcherOptions:
        return self._shared.options

    @property
    def embedder(self) -> QueryEmbedder:
        return self._shared.embedder

    # ---- properties --------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return self._shared.embedder.collection.dim

    @property
    def has_index(self) -> bool:
        return self._current.index is not None

    @property
    def text_cache(self) -> ByteLRU:
        """Query text -> embedding, with hit/miss counts."""
        return self.embedder.text_cache

    @property
    def nprobe_default(self) -> int | None:
        """nprobe when a call gives none: the options', else the manifest's tuned one, else the index's."""
        return self.plan.ann.nprobe_default

    @property
    def k_factor_default(self) -> float | None:
        """Refine factor when a call gives none: the options', else the tuned one (None: the index's own)."""
        return self.plan.ann.k_factor_default

    @property
    def disk_refine(self) -> Any:
        """The ``Refine(disk)`` re-scorer of the index (:class:`~vlsearch.ann.refine.DiskRefine`), or None."""
        return self.plan.ann.disk_refine

    @property
    def encoder(self) -> "Encoder":
        """The collection's model, loaded on first use (thread-safe)."""
        return self.embedder.encoder

    @property
    def filter_engine(self) -> FilterEngine:
        return self.plan.filters.engine

    @property
    def reranker(self) -> Any:
        """The collection model's :class:`~vlsearch.rerank.model.Reranker` (loaded and checked on first use)."""
        return self.reranking.reranker

    @property
    def rerank_features(self) -> Any:
        """Where candidates' re-rank features come from (:class:`~vlsearch.rerank.features.CandidateFeatures`)."""
        return self.reranking.features

    # ---- searches ----------------------------------------------------------------------------
    def search_text(self, text: str | Sequence[str], k: int = 10, nprobe: int | None = None,
                    exact: bool = False, k_factor: float | None = None, where: str | None = None,
                    rerank: int = 0, *, mode: str = "vector", alpha: float | None = None,
                    rrf_k: float = RRF_K, min_score: float | None = None, autocut: int | None = None,
                    group_by: str | None = None, per_group: int | None = None, order_by: str | None = None,
                    depth: int | None = None, facets: Sequence[str] | None = None,
                    dedup: bool | float | None = None) -> Hits | Results:
        """Search by caption text: a string gives ``list[Hit]``, a list of strings ``list[list[Hit]]``.
        ``where``: a metadata filter (SQL condition, see :mod:`vlsearch.query.filters`).
        ``rerank=K`` (K >= k; 0 = off): re-score the first stage's top K with the cross-attention
        re-ranker and return its best k; ``Hit.score`` is then the re-rank score and
        ``Hit.first_stage_score`` the cosine.

        ``min_score``, ``autocut``, ``group_by``/``per_group``, ``order_by``, ``depth``, ``facets``:
        shape the list (:mod:`vlsearch.query.shaping`); each query's hits are then a
        :class:`~vlsearch.query.shaping.ShapedHits` (with ``.facets``). ``dedup=True`` (or a cosine
        threshold) collapses near-duplicate hits into their best-ranked one, still returning ``k``
        hits when enough distinct ones exist.

        ``mode``: ``"vector"`` (the default: embedding k-NN, score = cosine), ``"keyword"`` (BM25
        over captions, path words and text metadata; the text is a query with phrases and field
        prefixes like ``path:beach``) or ``"hybrid"`` (both, fused by Reciprocal Rank Fusion with
        ``rrf_k``, or by ``alpha``-weighted normalised scores); see :mod:`vlsearch.query.hybrid`."""
        single = isinstance(text, str)
        texts = check_texts([text] if single else text)
        if check_mode(mode, alpha, rrf_k) != "vector":
            if rerank:
                raise InvalidQueryError(f"rerank applies to mode='vector' only, not {mode!r}")
            shape = Shape.of(min_score, autocut, group_by, per_group, order_by, depth, facets, dedup)
            results = shaped_mode_search(self._current, texts, lambda: self.embed_texts(texts), k,
                                         (mode, alpha, rrf_k), nprobe, exact, k_factor, where, shape)
            return results[0] if single else results
        query = self.text_query(texts, tokens=bool(check_rerank_k(rerank, check_k(k))))
        results = self.search_text_query(query, k, nprobe, exact, k_factor, where, rerank, min_score=min_score,
                                         autocut=autocut, group_by=group_by, per_group=per_group,
                                         order_by=order_by, depth=depth, facets=facets, dedup=dedup)
        return results[0] if single else results

    def text_query(self, texts: Sequence[str], tokens: bool = False) -> TextQuery:
        """Embed ``texts`` once for :meth:`search_text_query`; ``tokens=True`` (for ``rerank``) also
        keeps the text tower's token states, from the same pass (vectors through the text cache either way)."""
        return self.embedder.text_query(texts, tokens)

    def search_text_query(self, query: TextQuery, k: int = 10, nprobe: int | None = None, exact: bool = False,
                          k_factor: float | None = None, where: str | None = None, rerank: int = 0,
                          *, min_score: float | None = None, autocut: int | None = None, group_by: str | None = None,
                          per_group: int | None = None, order_by: str | None = None, depth: int | None = None,
                          facets: Sequence[str] | None = None, dedup: bool | float | None = None) -> Results:
        """:meth:`search_text` of texts already embedded by :meth:`text_query` (one list per text)."""
        shape = Shape.of(min_score, autocut, group_by, per_group, order_by, depth, facets, dedup)
        if shape is not None:
            return shaped_text_search(self._current, query, k, nprobe, exact, k_factor, where, rerank, shape)
        return self._current.search_text(query, k, nprobe, exact, k_factor, where, rerank)

    def search_image(self, image: ImageInput | Sequence[ImageInput], k: int = 10, nprobe: int | None = None,
                     exact: bool = False, k_factor: float | None = None, where: str | None = None,
                     *, min_score: float | None = None, autocut: int | None = None, group_by: str | None = None,
                     per_group: int | None = None, order_by: str | None = None, depth: int | None = None,
                     facets: Sequence[str] | None = None, dedup: bool | float | None = None) -> Hits | Results:
        """Search by example image (path, PIL image or encoded bytes, or a list of them); shaping
        arguments (and ``dedup``) as in :meth:`search_text`."""
        single = not isinstance(image, (list, tuple))
        images = [image] if single else list(image)
        if not images:
            raise InvalidQueryError("no query image given (empty list)")
        shape = Shape.of(min_score, autocut, group_by, per_group, order_by, depth, facets, dedup)
        results = self._search(self._current, self.embed_images(images), k, nprobe, exact, k_factor, where, shape)
        return results[0] if single else results

    def search_vector(self, vector: np.ndarray, k: int = 10, nprobe: int | None = None,
                      exact: bool = False, k_factor: float | None = None, where: str | None = None,
                      *, min_score: float | None = None, autocut: int | None = None, group_by: str | None = None,
                      per_group: int | None = None, order_by: str | None = None, depth: int | None = None,
                      facets: Sequence[str] | None = None, exclude: Sequence[int] = (),
                      dedup: bool | float | None = None) -> Hits | Results:
        """Search by embedding: ``(d,)`` gives ``list[Hit]``, ``(Q, d)`` gives ``list[list[Hit]]``;
        shaping arguments (and ``dedup``) as in :meth:`search_text`; ``exclude``: ids left out of the hits (taken out
        of the candidates before any shaping, so e.g. an item's own 1.0 never decides ``autocut``)."""
        arr = np.asarray(vector)
        shape = Shape.of(min_score, autocut, group_by, per_group, order_by, depth, facets, dedup)
        results = self._search(self._current, arr, k, nprobe, exact, k_factor, where, shape, exclude)
        return results[0] if arr.ndim == 1 else results

    # ---- weighted terms and examples (see vlsearch.query.terms) ---------------------------------
    def search(self, query: Query | TermLike | Sequence[TermLike], k: int = 10, nprobe: int | None = None,
               exact: bool = False, k_factor: float | None = None, where: str | None = None,
               exclude_items: bool = True, **shaping: Any) -> Hits:
        """Search by a weighted list of terms: texts, images (Path, bytes, PIL) and stored items
        (``Item(id)``), e.g. ``[("a golden retriever", 2.0), (Path("pool.jpg"), 1.0), ("fruit", -1.0)]``.
        The query vector is the normalised weighted sum of the normalised term embeddings (see
        :mod:`vlsearch.query.terms`); ZeroQueryError when the terms cancel out.
        ``exclude_items``: leave the items named by terms out of the hits. ``shaping``: as in
        :meth:`search_text` (``min_score``, ``autocut``, ``group_by``..., ``dedup``)."""
        query = Query.of(query)
        current = self._current
        vector = self._query_vector(current, query)
        exclude = query.items if exclude_items else []
        return self._search(current, vector[None], k, nprobe, exact, k_factor, where, Shape.of(**shaping), exclude)[0]

    def query_vector(self, query: Query | TermLike | Sequence[TermLike]) -> np.ndarray:
        """The unit query vector ``(d,)`` that :meth:`search` searches with."""
        return self._query_vector(self._current, Query.of(query))

    def _query_vector(self, current: SearcherVersion, query: Query) -> np.ndarray:
        return combine(term_vectors(self.embedder, current.plan.stored, query), query.weights)

    def more_like(self, positive_ids: Sequence[int], negative_ids: Sequence[int] = (), k: int = 10,
                  negative_weight: float = NEGATIVE_WEIGHT, exclude_examples: bool = True,
                  nprobe: int | None = None, exact: bool = False, k_factor: float | None = None,
                  where: str | None = None, **shaping: Any) -> Hits:
        """Items like the positive examples and unlike the negative ones (stored item ids):
        ``normalise(mean(positives) - negative_weight * mean(negatives))`` of their unit vectors,
        Rocchio-like (see :mod:`vlsearch.query.terms`). ``exclude_examples``: leave every example
        out of the hits. ``shaping``: as in :meth:`search_text`."""
        pos, neg = check_examples(positive_ids, negative_ids)
        current = self._current
        vector = self._more_like_vector(current, pos, neg, negative_weight)
        exclude = pos + neg if exclude_examples else []
        return self._search(current, vector[None], k, nprobe, exact, k_factor, where, Shape.of(**shaping), exclude)[0]

    def more_like_vector(self, positive_ids: Sequence[int], negative_ids: Sequence[int] = (),
                         negative_weight: float = NEGATIVE_WEIGHT) -> np.ndarray:
        """The unit query vector ``(d,)`` that :meth:`more_like` searches with."""
        return self._more_like_vector(self._current, *check_examples(positive_ids, negative_ids), negative_weight)

    def _more_like_vector(self, current: SearcherVersion, pos: list[int], neg: list[int],
                          negative_weight: float) -> np.ndarray:
        vectors = item_vectors(current.plan.stored, pos + neg)
        return feedback_vector(vectors[: len(pos)], vectors[len(pos):], negative_weight)

    def item_vector(self, item_id: int) -> np.ndarray:
        """A stored item's embedding ``(d,)`` float32; ItemNotFoundError if no live row has the id."""
        return self.item_vectors([item_id])[0]

    def item_vectors(self, item_ids: Sequence[int]) -> np.ndarray:
        """Stored items' embeddings ``(len(item_ids), d)`` float32, in the order given."""
        return item_vectors(self._current.plan.stored, [Item(i).id for i in item_ids])
    def _search(self, current: SearcherVersion, queries: np.ndarray, k: int, nprobe: int | None, exact: bool,
                k_factor: float | None, where: str | None, shape: Shape | None, exclude: Sequence[int] = ()) -> Results:
        """Hits of query vectors on version ``current``, shaped by ``shape``, the ids ``exclude`` left out."""
        if shape is not None:
            return shaped_vector_search(current, queries, k, nprobe, exact, k_factor, where, shape, exclude)
        if not exclude:
            return current.search(queries, k, nprobe, exact, k_factor, where)
        skip, k = np.fromiter(set(exclude), np.int64), check_k(k)
        scores, ids = current.plan.knn(queries, k + len(skip), nprobe, exact, k_factor, where)
        return current.hit_builder.build(*without_ids(scores, ids, skip, k))

    # ---- the steps (each on the version read when it is called: use a snapshot() to chain them)
    def knn(self, queries: np.ndarray, k: int = 10, nprobe: int | None = None, exact: bool = False,
            k_factor: float | None = None, where: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Raw top-k: ``(scores (Q,k) float32 cosine, ids (Q,k) int64)``, id -1 in empty slots.
        With ``where``, the top-k of the images passing the filter (k hits whenever k pass)."""
        return self._current.plan.knn(queries, k, nprobe, exact, k_factor, where)

    def hits(self, scores: np.ndarray, ids: np.ndarray, first_stage: np.ndarray | None = None) -> Results:
        """Turn ``knn`` arrays into Hits with paths, captions and metadata from the shards
        (``first_stage``: the first-stage scores of re-ranked hits)."""
        return self._current.hit_builder.build(scores, ids, first_stage)

    def rerank(self, texts: Sequence[str], scores: np.ndarray, ids: np.ndarray, k: int,
               tokens: tuple[Any, Any] | None = None) -> Reranked:
        """The best ``k`` of each query's candidates ``(scores, ids)`` (Q, K) re-scored by the
        re-ranker: ``(final scores, ids, first-stage scores)`` (see :class:`RerankStage`)."""
        return self._current.reranking.rerank(texts, scores, ids, k, tokens)

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Text embeddings through the text cache; only cache misses are encoded (in one batch)."""
        return self.embedder.texts(texts)

    def embed_images(self, images: Sequence[ImageInput]) -> np.ndarray:
        """Encode query images; an unreadable one raises InvalidQueryError naming it and why."""
        return self.embedder.images(images)

    def filter_ids(self, where: str) -> np.ndarray:
        """Sorted ids of the images passing ``where`` (cached per filter); InvalidQueryError if bad."""
        return self._current.plan.filters.subset(where).ids

    def __repr__(self) -> str:
        v = self._current
        factory = (v.collection.manifest.index or {}).get("factory")
        return (f"Searcher({str(v.collection.path)!r}, version={v.version}, images={len(v.row_locator)}, "
                f"index={factory})")
