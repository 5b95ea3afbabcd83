"""Shaped searches over one collection version: the candidate lists of
:func:`vlsearch.query.shaping.shaped_search` from a :class:`~vlsearch.query.version.SearcherVersion`'s
k-NN plan (and re-ranker), its hits from the version's hit builder. Apart from
:mod:`vlsearch.query.shaping`, which the Client imports and which must stay light."""

from __future__ import annotations

import os
from collections.abc import Callable, Collection
from typing import TYPE_CHECKING, Any

import numpy as np

from vlsearch.core.cache import ByteLRU
from vlsearch.core.errors import InvalidQueryError
from vlsearch.query.plan import check_k
from vlsearch.query.results import Results
from vlsearch.query.shaping import Shape, Vectors, shaped_search
from vlsearch.query.term_search import item_vectors, without_ids
from vlsearch.rerank.model import check_rerank_k

if TYPE_CHECKING:  # pragma: no cover
    from vlsearch.query.embedding import TextQuery
    from vlsearch.query.version import SearcherVersion
    from vlsearch.store.rows import RowLocator


#: Candidates' vectors read from the shards for ``dedup``, fp16, by ``(shard file, size, mtime, row)``:
#: a shard file never changes, so an entry stays right in every version that keeps the file. A
#: shard row group decodes in ~0.1 s (4096 rows of the embedding column), so repeated queries
#: (a page re-asking, a benchmark, popular queries) must not decode it again for one row.
_SHARD_VECTORS = ByteLRU(64 << 20)


def _shard_vectors(locator: "RowLocator", ids: np.ndarray, dim: int) -> np.ndarray:
    """Stored vectors of live ``ids`` from the shards, through :data:`_SHARD_VECTORS`."""
    shard, row, _ = locator.locate(ids)
    files = {s: (str(locator.paths[s]), *_stamp(locator.paths[s])) for s in set(shard.tolist())}
    keys = [(*files[s], r) for s, r in zip(shard.tolist(), row.tolist())]
    out = np.empty((len(ids), dim), np.float32)
    missing = []
    for i, key in enumerate(keys):
        cached = _SHARD_VECTORS.get(key)
        if cached is None:
            missing.append(i)
        else:
            out[i] = cached
    if missing:
        out[missing] = item_vectors(locator, ids[missing], dim)
        for i in missing:
            _SHARD_VECTORS.put(keys[i], out[i].astype(np.float16))
    return out


def _stamp(path: Any) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def _flat_index(index: Any) -> Any:
    """``index`` when it is a bare ``IndexFlat`` / ``IndexHNSWFlat`` (e.g. an adopted autofaiss
    ``HNSW32``): it holds the stored vectors uncompressed under labels that are the item ids."""
    if index is None:
        return None
    import faiss

    return index if isinstance(index, (faiss.IndexFlat, faiss.IndexHNSWFlat)) else None


def stored_vectors(version: "SearcherVersion") -> Vectors:
    """``ids -> (n, d)``: the version's stored vectors of candidates (what ``dedup`` compares): from
    the index's memory-mapped ``Refine(disk)`` rows, or a flat index's own copy, where they have
    them (the same fp16 values), else from the shard row groups that hold them (cached by row)."""
    refine, dim, locator = version.plan.ann.disk_refine, version.collection.dim, version.row_locator
    flat = _flat_index(version.plan.ann.index) if refine is None else None

    def vectors(ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, np.int64)
        if refine is None and flat is None:
            return _shard_vectors(locator, ids, dim)
        out = np.empty((len(ids), dim), np.float32)
        if refine is not None:
            rows, valid = refine.rows(ids)
            out[valid] = refine.vectors[rows[valid]]
        else:
            valid = (ids >= 0) & (ids < flat.ntotal)
            if valid.any():
                out[valid] = flat.reconstruct_batch(ids[valid])
        if not valid.all():  # added after the index was built
            out[~valid] = _shard_vectors(locator, ids[~valid], dim)
        return out

    return vectors


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
