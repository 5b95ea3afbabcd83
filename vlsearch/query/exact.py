"""Exact (brute-force) k-NN search: the ground truth for ANN recall, and the search path of
collections that have no index.

The database is scanned in chunks (a numpy array, a :class:`~vlsearch.store.collection.Collection`'s
embedding shards, or any iterator of ``(ids, vectors)`` batches); each chunk is scored with one
BLAS matrix product (``faiss.knn``) and merged into per-query top-k heaps
(``faiss.ResultHeap``), so memory stays at one chunk plus ``Q x k`` results, whatever the size
of the collection. (``faiss.contrib.exhaustive_search.knn_ground_truth`` runs the same kernel over
an iterator but returns row positions, not ids, and reports no progress: :class:`ExactTopK`
uses its parts, ``faiss.knn`` and ``faiss.ResultHeap``, directly.)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable, Iterator, Union

import numpy as np

from vlsearch.core.errors import InvalidQueryError
from vlsearch.core.progress import Progress

if TYPE_CHECKING:  # pragma: no cover
    from vlsearch.store.collection import Collection

#: Rows scored per chunk: 65,536 x 512 float32 = 128 MiB of database vectors at a time.
DEFAULT_CHUNK_SIZE = 65_536
#: Score of an empty result slot (fewer than k database vectors); its id is -1.
MISSING_SCORE = float(np.finfo(np.float32).min)

Database = Union[np.ndarray, "Collection", Iterable[tuple[np.ndarray, np.ndarray]]]


class ExactTopK:
    """Exact top-``k`` of fixed queries, accumulated over database batches streamed in any order
    (``faiss.knn`` per batch merged into ``faiss.ResultHeap``). The one brute-force kernel:
    :func:`exact_search` drives it over a database; the index builder feeds it the batches it
    adds, so the ground truth of its held-out queries costs no extra pass.
    """

    def __init__(self, queries: np.ndarray, k: int, metric: str = "ip"):
        import faiss

        if metric not in ("ip", "l2"):
            raise ValueError(f"metric must be 'ip' or 'l2', not {metric!r}")
        self.queries = np.ascontiguousarray(queries, dtype=np.float32)
        self.k = int(k)
        self.metric = faiss.METRIC_INNER_PRODUCT if metric == "ip" else faiss.METRIC_L2
        self.heap = faiss.ResultHeap(len(self.queries), self.k, keep_max=metric == "ip")
        self.rows = 0

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Score one batch (``ids`` int64, ``vectors`` (n, d)) and merge it into the top-k."""
        import faiss

        if len(self.queries) == 0 or len(vectors) == 0:
            return
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        scores, rows = faiss.knn(self.queries, vectors, min(self.k, len(vectors)), metric=self.metric)
        self.heap.add_result(scores, np.where(rows >= 0, np.asarray(ids)[np.maximum(rows, 0)], -1))
        self.rows += len(vectors)

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """``(scores (Q,k) float32, ids (Q,k) int64)``, best first; empty slots hold id -1."""
        self.heap.finalize()
        return self.heap.D, self.heap.I


def exact_search(
    queries: np.ndarray,
    vectors: Database,
    k: int,
    ids: np.ndarray | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    metric: str = "ip",
    progress: Progress | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` of each query over ``vectors``; returns ``(scores (Q,k) float32, ids (Q,k) int64)``.

    ``vectors`` is an ``(N, d)`` array (``ids`` gives the id of each row, default ``0..N-1``), a
    Collection (its image embeddings, with their image ids), or an iterable of
    ``(ids, vectors)`` batches. ``metric`` is ``"ip"`` (scores are inner products, highest first;
    cosine similarities for normalised vectors) or ``"l2"`` (squared distances, lowest first).
    Slots beyond the database size hold id -1 and score :data:`MISSING_SCORE` (``+inf`` for l2).
    ``progress(done_rows)`` is called after each chunk.
    """
    queries = _check_queries(queries)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= 0:
        raise InvalidQueryError(f"k must be a positive integer, got {k!r}")
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    top = ExactTopK(queries, int(k), metric)
    for chunk_ids, chunk in _chunks(vectors, ids, chunk_size):
        chunk = np.ascontiguousarray(chunk, dtype=np.float32)
        if chunk.ndim != 2 or chunk.shape[1] != queries.shape[1]:
            raise InvalidQueryError(
                f"query dimension {queries.shape[1]} does not match database vectors of shape {chunk.shape}"
            )
        if len(chunk) == 0:
            continue
        top.add(chunk_ids, chunk)
        if progress is not None:
            progress(top.rows)
    return top.result()


def _check_queries(queries: np.ndarray) -> np.ndarray:
    arr = np.asarray(queries)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise InvalidQueryError(f"queries must be a non-empty (Q, d) array, got shape {np.shape(queries)}")
    if not np.issubdtype(arr.dtype, np.number):
        raise InvalidQueryError(f"queries must be numeric, got dtype {arr.dtype}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(arr).all():
        raise InvalidQueryError("queries contain NaN or infinite values")
    return arr


def _chunks(vectors: Database, ids: np.ndarray | None, chunk_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Normalise every database form to ``(ids int64, vectors)`` chunks of at most ``chunk_size`` rows."""
    from vlsearch.store.collection import Collection

    if isinstance(vectors, Collection):
        if ids is not None:
            raise ValueError("ids cannot be given with a Collection: its image ids are used")
        yield from vectors.iter_embeddings(batch_size=chunk_size)
        return
    if isinstance(vectors, np.ndarray):
        if vectors.ndim != 2:
            raise InvalidQueryError(f"database vectors must be (N, d), got shape {vectors.shape}")
        all_ids = np.arange(len(vectors), dtype=np.int64) if ids is None else np.asarray(ids, dtype=np.int64)
        if all_ids.shape != (len(vectors),):
            raise ValueError(f"ids has shape {all_ids.shape}, expected ({len(vectors)},)")
        for start in range(0, len(vectors), chunk_size):
            yield all_ids[start : start + chunk_size], vectors[start : start + chunk_size]
        return
    if ids is not None:
        raise ValueError("ids can only be given with an array of vectors")
    for batch_ids, batch in vectors:
        batch_ids = np.asarray(batch_ids, dtype=np.int64)
        for start in range(0, len(batch), chunk_size):
            yield batch_ids[start : start + chunk_size], batch[start : start + chunk_size]
