"""Shaped searches over one collection version: the candidate lists of
:func:`vlsearch.query.shaping.shaped_search` from a :class:`~vlsearch.query.version.SearcherVersion`'s
k-NN plan (and re-ranker), its hits from the version's hit builder. Apart from
:mod:`vlsearch.query.shaping`, which the Client imports and which must stay light."""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import TYPE_CHECKING

import numpy as np

from vlsearch.core.errors import InvalidQueryError
from vlsearch.query.plan import check_k
from vlsearch.query.results import Results
from vlsearch.query.shaping import Shape, Vectors, shaped_search
from vlsearch.query.term_search import without_ids
from vlsearch.rerank.model import check_rerank_k

if TYPE_CHECKING:  # pragma: no cover
    from vlsearch.query.embedding import TextQuery
    from vlsearch.query.version import SearcherVersion


def stored_vectors(version: "SearcherVersion") -> Vectors:
    """``ids -> (n, d)``: the version's stored vectors of candidates (what ``dedup`` compares), from
    its vector rows file where the index has one, else from the shards
    (:meth:`vlsearch.store.gather.StoredVectors.get`)."""
    return version.plan.stored.get


def shaped_vector_search(version: "SearcherVersion", queries: np.ndarray, k: int, nprobe: int | None, exact: bool,
                         k_factor: float | None, where: str | None, shape: Shape,
                         exclude: Collection[int] = ()) -> Results:
    """:func:`shaped_search` of query vectors over one collection version (its k-NN plan and hits);
    the ids ``exclude`` are taken out of the candidates before anything is cut, grouped, ordered or
    counted (an example item's own score, 1.0, would otherwise be the list's first jump)."""
    k = check_k(k)
    plan = version.plan
    skip = np.fromiter(set(exclude), np.int64)

    def fetch(depth: int) -> tuple[np.ndarray, np.ndarray, None]:
        scores, ids = plan.knn(queries, depth + len(skip), nprobe, exact, k_factor, where)
        return (*without_ids(scores, ids, skip, depth), None)

    return shaped_search(fetch, version.hit_builder.build, lambda: plan.filters.engine, k, shape,
                         stored_vectors(version))


def shaped_mode_search(version: "SearcherVersion", texts: list[str], vectors: Callable[[], np.ndarray], k: int,
                       mode: tuple[str, float | None, float], nprobe: int | None, exact: bool,
                       k_factor: float | None, where: str | None, shape: Shape | None) -> Results:
    """Keyword or hybrid hits of ``texts`` (``mode``: ``(mode, alpha, rrf_k)``, see
    :mod:`vlsearch.query.hybrid`), shaped by ``shape`` when given; ``vectors()`` embeds the texts."""
    if shape is None:
        return version.search_text_mode(texts, vectors, k, *mode, nprobe, exact, k_factor, where)
    k = check_k(k)

    def fetch(depth: int) -> tuple[np.ndarray, np.ndarray, None]:
        return (*version.knn_text_mode(texts, vectors, depth, *mode, nprobe, exact, k_factor, where), None)

    return shaped_search(fetch, version.hit_builder.build, lambda: version.plan.filters.engine, k, shape,
                         stored_vectors(version))


def shaped_text_search(version: "SearcherVersion", query: "TextQuery", k: int, nprobe: int | None, exact: bool,
                       k_factor: float | None, where: str | None, rerank: int, shape: Shape) -> Results:
    """:func:`shaped_search` of embedded texts; with ``rerank=K`` the candidate list of depth ``D``
    is the re-ranker's best ``D`` of the first stage's top ``max(K, D)`` (scores: the re-ranker's)."""
    rerank = check_rerank_k(rerank, check_k(k))
    if not rerank:
        return shaped_vector_search(version, query.vectors, k, nprobe, exact, k_factor, where, shape)
    if query.tokens is None:
        raise InvalidQueryError("rerank needs the texts' token states: embed them with text_query(tokens=True)")
    plan = version.plan

    def fetch(depth: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        scores, ids = plan.knn(query.vectors, max(rerank, depth), nprobe, exact, k_factor, where)
        return version.reranking.rerank(query.texts, scores, ids, depth, tokens=query.tokens)

    return shaped_search(fetch, version.hit_builder.build, lambda: plan.filters.engine, k, shape,
                         stored_vectors(version))
