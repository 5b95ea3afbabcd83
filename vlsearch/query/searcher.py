"""The query engine: text, image and vector search over a collection.

::

    from vlsearch import Searcher
    s = Searcher.open("my-collection")           # manifest + id map + index; model on first use
    hits = s.search_text("a dog running on the beach", k=10)
    batch = s.search_image(["q1.jpg", "q2.jpg"], k=5)   # list[list[Hit]]
    hits = s.search_vector(vec, k=10, nprobe=64, k_factor=4)
    hits = s.search_text("...", exact=True)       # brute force over the shards (no index needed)
    s = Searcher.open("my-collection", options=SearcherOptions(device="cuda", exact_cache_mb=0))

``Searcher`` is the facade over one module per step: query embedding
(:mod:`vlsearch.query.embedding`), the ANN / exact / filtered k-NN plan (:mod:`vlsearch.query.plan`),
re-ranking (:mod:`vlsearch.query.reranking`) and hit building (:mod:`vlsearch.query.hits`); its
settings are one :class:`~vlsearch.query.options.SearcherOptions`. Design points:

* **Per-call parameters never touch the shared index** (per-call FAISS ``SearchParameters``), so
  concurrent calls with different settings are independent.
* **Opening is cheap in memory**: only the ``id`` column of each shard is read, into an
  id -> (shard, row) map (8 bytes per image, 12 if ids are not sorted). Hits get their metadata
  by reading the one Parquet row group that holds them (no embedding column); decoded row groups
  stay in a byte-bounded LRU cache (``metadata_cache_mb``).
* **The query model is the collection's**: loaded lazily with ``load_model(name, pretrained)``
  from the manifest, or passed in (and checked) as ``encoder``.
* **One collection version**: a Searcher reads the version it opened (its live shards and
  tombstones), whatever syncs commit meanwhile. Deleted rows are never returned, in ANN or exact
  mode, and a list is never short while enough live rows exist.
* **Scores are cosine similarities** (query vectors are L2-normalised).
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from vlsearch.core.cache import ByteLRU
from vlsearch.core.errors import InvalidQueryError
from vlsearch.core.inputs import ImageInput
from vlsearch.query.embedding import QueryEmbedder, TextQuery, check_texts
from vlsearch.query.filters import FilterEngine
from vlsearch.query.hits import HitBuilder
from vlsearch.query.options import SearcherOptions, budget
from vlsearch.query.plan import KnnPlan, check_k
from vlsearch.query.reranking import Reranked, RerankStage
from vlsearch.query.results import Hit, Hits, Results, format_hits, hits_to_json_lines
from vlsearch.rerank.model import check_rerank_k
from vlsearch.store.collection import Collection
from vlsearch.store.layout import IMAGES_DIR
from vlsearch.store.rows import MetadataReader, RowLocator

if TYPE_CHECKING:  # pragma: no cover
    from vlsearch.models.factory import Encoder

__all__ = ["Searcher", "SearcherOptions", "Hit", "Hits", "Results", "format_hits", "hits_to_json_lines"]


class Searcher:
    """Search one collection by text, image or embedding. Thread-safe; open with :meth:`open`.

    ``encoder``: the collection's model, if already loaded (else loaded on the first text or
    image query); ``reranker``: a Reranker or its file (None: the one shipped for the collection's
    model), loaded on the first ``rerank=K`` query."""

    def __init__(self, collection: Collection, index: Any | None, encoder: "Encoder | None" = None,
                 reranker: Any = None, options: SearcherOptions = SearcherOptions()):
        self.collection, self.index, self.options = collection, index, options
        self.embedder = QueryEmbedder(collection, encoder, options)
        paths = collection.shard_paths(IMAGES_DIR)
        self.row_locator = RowLocator(paths, collection)
        self.metadata_reader = MetadataReader(paths, cache_bytes=budget(options.metadata_cache_mb))
        self.plan = KnnPlan(collection, index, self.row_locator, options)
        self.reranking = RerankStage(collection, reranker, lambda: self.encoder, self.row_locator,
                                     self.metadata_reader, options.rerank_features)
        self._hits = HitBuilder(self.row_locator, self.metadata_reader, collection.path)

    @classmethod
    def open(cls, path: str | os.PathLike, mmap: bool = False, encoder: "Encoder | None" = None,
             reranker: Any = None, options: SearcherOptions | None = None, **overrides: Any) -> "Searcher":
        """Open a collection for search: manifest, id map and (if built) index; the model loads on
        first text/image query. ``mmap=True`` memory-maps the index. ``encoder`` must be the
        collection's model (else CollectionMismatchError). ``overrides``: fields of ``options``
        (:class:`SearcherOptions`) to change, e.g. ``device="cpu"``, ``exact_cache_mb=0``."""
        collection = Collection.open(path)
        index = collection.load_index(mmap=mmap) if collection.manifest.index is not None else None
        return cls(collection, index, encoder, reranker, replace(options or SearcherOptions(), **overrides))

    # ---- properties --------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return self.collection.dim

    @property
    def has_index(self) -> bool:
        return self.index is not None

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
                    rerank: int = 0) -> Hits | Results:
        """Search by caption text: a string gives ``list[Hit]``, a list of strings ``list[list[Hit]]``.
        ``where``: a metadata filter (SQL condition, see :mod:`vlsearch.query.filters`).
        ``rerank=K`` (K >= k; 0 = off): re-score the first stage's top K with the cross-attention
        re-ranker and return its best k; ``Hit.score`` is then the re-rank score and
        ``Hit.first_stage_score`` the cosine."""
        single = isinstance(text, str)
        texts = check_texts([text] if single else text)
        query = self.text_query(texts, tokens=bool(check_rerank_k(rerank, check_k(k))))
        results = self.search_text_query(query, k, nprobe, exact, k_factor, where, rerank)
        return results[0] if single else results

    def text_query(self, texts: Sequence[str], tokens: bool = False) -> TextQuery:
        """Embed ``texts`` once for :meth:`search_text_query`; ``tokens=True`` (for ``rerank``) also
        keeps the text tower's token states, from the same pass (vectors through the text cache either way)."""
        return self.embedder.text_query(texts, tokens)

    def search_text_query(self, query: TextQuery, k: int = 10, nprobe: int | None = None, exact: bool = False,
                          k_factor: float | None = None, where: str | None = None, rerank: int = 0) -> Results:
        """:meth:`search_text` of texts already embedded by :meth:`text_query` (one list per text)."""
        depth = check_rerank_k(rerank, check_k(k))
        if depth and query.tokens is None:
            raise InvalidQueryError("rerank needs the texts' token states: embed them with text_query(tokens=True)")
        scores, ids = self.knn(query.vectors, depth or k, nprobe, exact, k_factor, where)
        if not depth:
            return self.hits(scores, ids)
        return self.hits(*self.rerank(query.texts, scores, ids, k, tokens=query.tokens))

    def search_image(self, image: ImageInput | Sequence[ImageInput], k: int = 10, nprobe: int | None = None,
                     exact: bool = False, k_factor: float | None = None, where: str | None = None) -> Hits | Results:
        """Search by example image (path, PIL image or encoded bytes, or a list of them)."""
        single = not isinstance(image, (list, tuple))
        images = [image] if single else list(image)
        if not images:
            raise InvalidQueryError("no query image given (empty list)")
        results = self.hits(*self.knn(self.embed_images(images), k, nprobe, exact, k_factor, where))
        return results[0] if single else results

    def search_vector(self, vector: np.ndarray, k: int = 10, nprobe: int | None = None,
                      exact: bool = False, k_factor: float | None = None, where: str | None = None) -> Hits | Results:
        """Search by embedding: ``(d,)`` gives ``list[Hit]``, ``(Q, d)`` gives ``list[list[Hit]]``."""
        arr = np.asarray(vector)
        results = self.hits(*self.knn(arr, k, nprobe, exact, k_factor, where))
        return results[0] if arr.ndim == 1 else results

    # ---- the steps ---------------------------------------------------------------------------
    def knn(self, queries: np.ndarray, k: int = 10, nprobe: int | None = None, exact: bool = False,
            k_factor: float | None = None, where: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Raw top-k: ``(scores (Q,k) float32 cosine, ids (Q,k) int64)``, id -1 in empty slots.
        With ``where``, the top-k of the images passing the filter (k hits whenever k pass)."""
        return self.plan.knn(queries, k, nprobe, exact, k_factor, where)

    def hits(self, scores: np.ndarray, ids: np.ndarray, first_stage: np.ndarray | None = None) -> Results:
        """Turn ``knn`` arrays into Hits with paths, captions and metadata from the shards
        (``first_stage``: the first-stage scores of re-ranked hits)."""
        return self._hits.build(scores, ids, first_stage)

    def rerank(self, texts: Sequence[str], scores: np.ndarray, ids: np.ndarray, k: int,
               tokens: tuple[Any, Any] | None = None) -> Reranked:
        """The best ``k`` of each query's candidates ``(scores, ids)`` (Q, K) re-scored by the
        re-ranker: ``(final scores, ids, first-stage scores)`` (see :class:`RerankStage`)."""
        return self.reranking.rerank(texts, scores, ids, k, tokens)

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Text embeddings through the text cache; only cache misses are encoded (in one batch)."""
        return self.embedder.texts(texts)

    def embed_images(self, images: Sequence[ImageInput]) -> np.ndarray:
        """Encode query images; an unreadable one raises InvalidQueryError naming it and why."""
        return self.embedder.images(images)

    def filter_ids(self, where: str) -> np.ndarray:
        """Sorted ids of the images passing ``where`` (cached per filter); InvalidQueryError if bad."""
        return self.plan.filters.subset(where).ids

    def __repr__(self) -> str:
        factory = (self.collection.manifest.index or {}).get("factory")
        return f"Searcher({str(self.collection.path)!r}, images={len(self.row_locator)}, index={factory})"
