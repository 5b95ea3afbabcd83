"""One collection version as a :class:`~vlsearch.query.searcher.Searcher` reads it, and the parts
every version of one Searcher shares.

* :class:`SharedParts`: the query model and its text cache (:class:`QueryEmbedder`), the
  re-ranker (:func:`~vlsearch.query.reranking.reranker_loader`), the options. Nothing in it
  refers to a version.
* :class:`SearcherVersion`: one version's collection (leased, so that no writer removes its files
  while it is read), index, id -> row map, metadata reader, k-NN plan, re-rank features and hit
  builder. Its objects hold no reference cycle: when nothing refers to a version any more, it dies
  by reference counting and its lease is let go at once (no wait for the cycle collector).
* :meth:`SharedParts.open_newer`: the collection's newest version, opened and *prepared* (index
  loaded, id map built, and what the version it replaces has warm warmed too), or None when the
  current one is the newest.
* :func:`manifest_stamp`: the cheap "did anything commit?" check: a commit renames a new
  ``manifest.json`` into place, so the file's inode changes with every version.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from vlsearch.core.errors import CollectionError, IndexNotBuiltError, InvalidQueryError
from vlsearch.core.lazy import Lazy
from vlsearch.query.embedding import QueryEmbedder, TextQuery
from vlsearch.query import hybrid
from vlsearch.query.hits import HitBuilder
from vlsearch.query.options import SearcherOptions, budget
from vlsearch.query.plan import KnnPlan, check_k
from vlsearch.query.reranking import RerankStage, reranker_loader
from vlsearch.query.results import Results
from vlsearch.rerank.model import Reranker, check_rerank_k
from vlsearch.store.collection import Collection
from vlsearch.store.keyword import KeywordSearcher
from vlsearch.store.layout import IMAGES_DIR, MANIFEST, now_iso
from vlsearch.store.rows import MetadataReader, RowLocator

if TYPE_CHECKING:  # pragma: no cover
    from vlsearch.models.factory import Encoder

#: ``(st_ino, st_mtime_ns, st_size)`` of ``manifest.json``; None when it cannot be read.
Stamp = tuple[int, int, int] | None


def manifest_stamp(path: Path) -> Stamp:
    """What ``os.stat`` says of the collection's ``manifest.json`` (None if it is missing)."""
    try:
        st = os.stat(Path(path) / MANIFEST)
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


@dataclass(frozen=True, eq=False)
class SharedParts:
    """What every version a Searcher reads shares: the query model and text cache, the re-ranker
    (both loaded on first use), the options, and how indexes are loaded (``mmap``)."""

    path: Path
    embedder: QueryEmbedder
    reranker: Lazy[Reranker]
    options: SearcherOptions
    mmap: bool = False

    @classmethod
    def create(cls, collection: Collection, encoder: "Encoder | None", reranker: Any, options: SearcherOptions,
               mmap: bool = False) -> "SharedParts":
        """``encoder``: the collection's model if loaded (checked here); ``reranker``: a Reranker,
        its file or None (see :func:`reranker_loader`)."""
        unleased = collection.with_manifest(collection.manifest)  # the shared parts never hold a version's lease
        return cls(collection.path, QueryEmbedder(unleased, encoder, options),
                   reranker_loader(collection.model, reranker), options, mmap)

    def load(self, collection: Collection) -> "SearcherVersion":
        """``collection`` (a version, usually leased) with its index loaded; its lease is let go
        if that fails."""
        try:
            index = collection.load_index(mmap=self.mmap) if collection.manifest.index is not None else None
            return SearcherVersion(collection, index, self)
        except BaseException:
            collection.release()
            raise

    def open_newer(self, current: "SearcherVersion") -> "SearcherVersion | None":
        """The collection's newest version, leased, loaded and prepared like ``current``; None when
        ``current`` is the newest. CollectionError when it cannot be opened (the lease let go)."""
        collection = Collection.open(self.path, lease=True)
        version = collection.manifest.version
        if version <= current.version:
            collection.release()
            return None
        try:
            current.collection.check_model(collection.model, what=f"the model of version {version}")
            new = self.load(collection)
        except Exception as exc:
            collection.release()
            raise _cannot_move(self.path, version, current.version, exc) from exc
        try:
            new.prepare(like=current)
        except Exception as exc:
            new.release()
            raise _cannot_move(self.path, version, current.version, exc) from exc
        return new


def _cannot_move(path: Path, version: int, current: int, exc: Exception) -> CollectionError:
    return CollectionError(f"cannot read version {version} of collection {path} ({type(exc).__name__}: {exc}); "
                           f"version {current} is still read")


def _encoder_of(embedder: QueryEmbedder) -> Callable[[], Any]:
    """The query model getter the re-rank step calls: refers to the shared embedder only."""
    return lambda: embedder.encoder


class SearcherVersion:
    """One version of a collection, ready to search: its (leased) collection and index, the id ->
    ``(shard, row)`` map, the metadata reader and its cache, the k-NN plan, the re-rank features
    and the hit builder. Thread-safe; immutable but for its caches."""

    def __init__(self, collection: Collection, index: Any | None, shared: SharedParts):
        options = shared.options
        self.collection, self.index = collection, index
        paths = collection.shard_paths(IMAGES_DIR)
        self.row_locator = RowLocator(paths, collection)
        self.metadata_reader = MetadataReader(paths, cache_bytes=budget(options.metadata_cache_mb))
        self.plan = KnnPlan(collection, index, self.row_locator, options)
        self.reranking = RerankStage(collection, shared.reranker, _encoder_of(shared.embedder), self.row_locator,
                                     self.metadata_reader, options.rerank_features)
        self.hit_builder = HitBuilder(self.row_locator, self.metadata_reader, collection.path)
        #: when this version was loaded (ISO 8601, UTC)
        self.loaded_at = now_iso()

    @property
    def version(self) -> int:
        return self.collection.manifest.version

    def prepare(self, like: "SearcherVersion") -> None:
        """Warm what ``like`` (the version this one replaces) has warm: the exact-search vectors,
        the filter engine, the re-rank features; so the first request after a switch costs no more
        than the one before it."""
        if like.plan.exact.warm:
            self.plan.exact.warm_up()
        if like.plan.filters.built:
            self.plan.filters.engine  # built on first access
        if like.reranking.loaded:
            self.reranking.features  # built on first access
        if "keyword" in like.__dict__:  # keyword search was used: open this version's keyword indexes too
            try:
                self.keyword.fields
            except IndexNotBuiltError:
                pass  # told at the first keyword query; never a reason not to move
        self.loaded_at = now_iso()

    def release(self) -> None:
        """Let go of this version's lease now (its files may then be collected by the next writer)."""
        self.collection.release()

    # ---- searches over this version only -------------------------------------------------------
    def search(self, queries: np.ndarray, k: int, nprobe: int | None, exact: bool, k_factor: float | None,
               where: str | None) -> Results:
        """Hits of the k-NN of query vectors (see :meth:`KnnPlan.knn`)."""
        return self.hit_builder.build(*self.plan.knn(queries, k, nprobe, exact, k_factor, where))

    def search_text(self, query: TextQuery, k: int, nprobe: int | None, exact: bool, k_factor: float | None,
                    where: str | None, rerank: int) -> Results:
        """Hits of embedded texts, the first stage's top ``rerank`` re-ranked when ``rerank`` > 0."""
        depth = check_rerank_k(rerank, check_k(k))
        if depth and query.tokens is None:
            raise InvalidQueryError("rerank needs the texts' token states: embed them with text_query(tokens=True)")
        scores, ids = self.plan.knn(query.vectors, depth or k, nprobe, exact, k_factor, where)
        if not depth:
            return self.hit_builder.build(scores, ids)
        return self.hit_builder.build(*self.reranking.rerank(query.texts, scores, ids, k, tokens=query.tokens))

    @cached_property
    def keyword(self) -> KeywordSearcher:
        """This version's keyword indexes (:mod:`vlsearch.store.keyword`), opened on first use."""
        return KeywordSearcher(self.collection.path, self.collection.shard_numbers(), self.collection.dead_rows())

    def search_text_mode(self, texts: list[str], vectors: Callable[[], np.ndarray], k: int, mode: str,
                         alpha: float | None, rrf_k: float, nprobe: int | None, exact: bool,
                         k_factor: float | None, where: str | None) -> Results:
        """Keyword or hybrid hits of ``texts`` (:mod:`vlsearch.query.hybrid`); ``vectors()`` embeds
        them (hybrid only)."""
        return self.hit_builder.build(*self.knn_text_mode(texts, vectors, k, mode, alpha, rrf_k, nprobe, exact,
                                                          k_factor, where))

    def knn_text_mode(self, texts: list[str], vectors: Callable[[], np.ndarray], k: int, mode: str,
                      alpha: float | None, rrf_k: float, nprobe: int | None, exact: bool,
                      k_factor: float | None, where: str | None) -> tuple[np.ndarray, np.ndarray]:
        """The keyword or hybrid top ``k`` ``(scores, ids)`` of ``texts``, -1 in empty slots."""
        k = check_k(k)
        depth = k if mode == "keyword" else hybrid.hybrid_depth(k)
        if mode == "keyword":  # a keyword query's syntax is checked; a hybrid one is natural language, read leniently
            for text in texts:
                self.keyword.check(text)
        allowed = self.plan.filters.subset(where).ids if where is not None else None
        keyword = [self.keyword.search(text, depth, allowed, lenient=mode == "hybrid") for text in texts]
        if mode == "keyword":
            return hybrid.padded(keyword, k)
        v_scores, v_ids = self.plan.knn(vectors(), depth, nprobe, exact, k_factor, where)
        fused = []
        for q, (kw_scores, kw_ids) in enumerate(keyword):
            if alpha is None:
                fused.append(hybrid.rrf([v_ids[q], kw_ids], k, rrf_k))
            else:
                fused.append(hybrid.weighted((v_scores[q], v_ids[q]), (kw_scores, kw_ids), alpha, k))
        return hybrid.padded(fused, k)

    def __repr__(self) -> str:
        return f"SearcherVersion({str(self.collection.path)!r}, version={self.version}, images={len(self.row_locator)})"
