"""k-NN search restricted to a subset of image ids (the rows a metadata filter lets through).

Two strategies, chosen per call by :func:`plan` (thresholds measured by
``benchmarks/bench_filter.py``, figures in ``benchmarks/RESULTS.md``):

* **exact over the subset** when the collection has no index, when ``exact=True``, or when the
  subset is small (``<= exact_max_rows`` rows) and either its vectors are already gathered or
  gathering them touches few Parquet row groups (``<= cold_row_groups``): decoding one 4096-row
  group of float16 embeddings costs ~0.1 s, so a cold gather of a few hundred scattered rows
  would take seconds. Only the row groups holding allowed rows are read (embedding column only,
  one row group at a time), and the gathered vectors are kept with the :class:`Subset` when they
  fit its budget, so the next query with the same filter reads nothing;
* **ANN with a FAISS ``IDSelector``** (a bitmap over ids, or a hash set when ids are sparse)
  passed in the per-call ``SearchParameters``, with ``nprobe`` raised as the subset shrinks
  (``nprobe * selectivity ** -nprobe_exponent``, at most nlist) so that the top-k of the allowed
  rows is still found. Any query that comes back with fewer than ``min(k, rows)`` hits is redone
  probing every list (which sees every allowed row), then exactly, so results are never short.

The subset is just a sorted id array: intersecting it with other restrictions (deleted ids)
before building the :class:`Subset` keeps this module unchanged.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Protocol, Sequence

import numpy as np
import pyarrow.parquet as pq

from vlsearch.query.exact import DEFAULT_CHUNK_SIZE, MISSING_SCORE, exact_search
from vlsearch.store.arrays import embeddings_to_numpy
from vlsearch.store.rows import row_group_starts

#: ``ann(queries, k, nprobe, selector) -> (scores, ids)``: the searcher's ANN call with a selector.
AnnSearch = Callable[[np.ndarray, int, "int | None", Any], "tuple[np.ndarray, np.ndarray]"]


class Locator(Protocol):
    """Maps ids to ``(shard, row in shard, found)``; ``paths`` are the image shard files."""

    paths: Sequence[Any]

    def locate(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]: ...


@dataclass(frozen=True)
class SubsetPolicy:
    """When a restricted search is exact, and how far ANN widens its probe."""

    #: Exact search over the subset up to this many rows (measured switch point) ...
    exact_max_rows: int = 20_000
    #: ... once its vectors are gathered, or when gathering them reads at most this many row groups.
    cold_row_groups: int = 8
    #: ANN probes ``nprobe * selectivity ** -nprobe_exponent`` IVF lists (capped at nlist).
    nprobe_exponent: float = 0.5
    #: ANN re-ranks at least ``min_k_factor * k`` candidates in a refine stage (unless the call
    #: gives k_factor): on the 1M benchmark the auto index's k_factor 10 held filtered recall@10
    #: at 0.90-0.93 whatever the probe; 40 reached >= 0.95 at every selectivity.
    min_k_factor: float = 40.0
    #: Gathered vectors are kept with the subset up to this many bytes (float32).
    vector_cache_bytes: int = 128 << 20


class Subset:
    """Allowed ids (sorted, unique int64) with their FAISS selector and gathered vectors, built
    on first use and kept (thread-safe)."""

    def __init__(self, ids: np.ndarray):
        ids = np.asarray(ids, dtype=np.int64)
        if len(ids) > 1 and not np.all(ids[1:] > ids[:-1]):
            ids = np.unique(ids)
        self.ids = ids
        self._lock = threading.Lock()
        self._selector: Any = None
        self._vectors: np.ndarray | None = None
        self._row_groups: int | None = None

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def nbytes(self) -> int:
        extra = 0 if self._vectors is None else self._vectors.nbytes
        bitmap = getattr(self._selector, "bitmap_array", None)
        return self.ids.nbytes + extra + (0 if bitmap is None else bitmap.nbytes)

    def selector(self) -> Any:
        """A FAISS selector accepting exactly these ids: a bitmap when the largest id is small
        (<= 16 Mi bytes of bits), else an ``IDSelectorBatch`` (hash set + Bloom filter)."""
        import faiss

        with self._lock:
            if self._selector is None:
                top = int(self.ids[-1]) if len(self.ids) else 0
                if len(self.ids) and self.ids[0] >= 0 and top < (16 << 20) * 8:
                    mask = np.zeros(top + 1, bool)
                    mask[self.ids] = True
                    bitmap = np.packbits(mask, bitorder="little")
                    sel = faiss.IDSelectorBitmap(bitmap)
                    sel.bitmap_array = bitmap  # the selector only points at it
                else:
                    sel = faiss.IDSelectorBatch(self.ids)
                self._selector = sel
            return self._selector

    @property
    def gathered(self) -> bool:
        """Whether the subset's vectors are in memory (exact search reads nothing)."""
        return self._vectors is not None

    def row_groups(self, locator: Locator) -> int:
        """How many Parquet row groups hold the subset's rows (what a gather would decode)."""
        if self._row_groups is None:
            shard, row, found = locator.locate(self.ids)
            keys = set()
            for s in np.unique(shard[found]):
                starts = row_group_starts(locator.paths[int(s)])
                groups = np.searchsorted(starts, row[found][shard[found] == s], side="right") - 1
                keys.update((int(s), int(g)) for g in np.unique(groups))
            self._row_groups = len(keys)
        return self._row_groups

    def vectors(self, locator: Locator, dim: int, cache_bytes: int) -> np.ndarray | Iterator[tuple[np.ndarray, np.ndarray]]:
        """The subset's vectors: a cached ``(len, dim)`` array when it fits ``cache_bytes``, else a
        stream of ``(ids, vectors)`` row-group batches."""
        if self._vectors is not None:
            return self._vectors
        if len(self.ids) * dim * 4 > cache_bytes:
            return iter_embeddings_of(locator, self.ids)
        with self._lock:
            if self._vectors is None:
                out = np.empty((len(self.ids), dim), np.float32)
                for ids, vecs in iter_embeddings_of(locator, self.ids):
                    out[np.searchsorted(self.ids, ids)] = vecs
                out.flags.writeable = False
                self._vectors = out
            return self._vectors


def iter_embeddings_of(locator: Locator, ids: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(ids, vectors float32)`` of the given ids, reading only the row groups that hold them
    (embedding column only), one row group at a time. Unknown ids are skipped."""
    shard, row, found = locator.locate(ids)
    ids, shard, row = ids[found], shard[found], row[found]
    order = np.lexsort((row, shard))
    ids, shard, row = ids[order], shard[order], row[order]
    for s in np.unique(shard):
        pick = shard == s
        pf = pq.ParquetFile(locator.paths[int(s)])
        starts = row_group_starts(locator.paths[int(s)], pf)
        rows, sids = row[pick], ids[pick]
        groups = np.searchsorted(starts, rows, side="right") - 1
        for g in np.unique(groups):
            sel = groups == g
            column = pf.read_row_group(int(g), columns=["embedding"]).column(0)
            yield sids[sel], embeddings_to_numpy(column.take(rows[sel] - starts[g]))


def plan(rows: int, ntotal: int, nprobe: int | None, nlist: int | None, exact: bool, has_index: bool,
         policy: SubsetPolicy = SubsetPolicy(), cheap_gather: bool | Callable[[], bool] = True) -> tuple[str, int | None]:
    """``("exact", None)`` or ``("ann", nprobe to use)`` for a subset of ``rows`` of ``ntotal``.
    ``cheap_gather`` (or a function computing it): the subset's vectors are gathered already or
    take at most ``cold_row_groups`` row groups to read."""
    if exact or not has_index:
        return "exact", None
    if rows <= policy.exact_max_rows and (cheap_gather() if callable(cheap_gather) else cheap_gather):
        return "exact", None
    if nprobe is None or nlist is None:
        return "ann", nprobe
    selectivity = rows / max(ntotal, 1)
    return "ann", int(min(nlist, math.ceil(nprobe * selectivity ** -policy.nprobe_exponent)))


def restricted_knn(
    queries: np.ndarray,
    k: int,
    subset: Subset,
    locator: Locator,
    dim: int,
    *,
    ann: AnnSearch | None,
    ntotal: int,
    nprobe: int | None,
    nlist: int | None,
    exact: bool = False,
    policy: SubsetPolicy = SubsetPolicy(),
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` of each query among the subset's ids: ``(scores (Q,k), ids (Q,k))``, id -1 in
    slots beyond the subset's size. ``ann`` is the searcher's ANN call (None: no index)."""
    nq = queries.shape[0]
    if len(subset) == 0:
        return np.full((nq, k), MISSING_SCORE, np.float32), np.full((nq, k), -1, np.int64)
    mode, probe = plan(len(subset), ntotal, nprobe, nlist, exact, ann is not None, policy, lambda: (
        subset.gathered or subset.row_groups(locator) <= policy.cold_row_groups))
    if mode == "exact":
        return _exact(queries, k, subset, locator, dim, policy, chunk_size)
    scores, ids = ann(queries, k, probe, subset.selector())
    # a probe too narrow for this subset: never return a short list. Probing every list sees
    # every allowed row; exact search is the last resort (an index missing rows)
    for retry in (nlist if probe is not None and nlist is not None and probe < nlist else None, "exact"):
        short = np.flatnonzero((ids >= 0).sum(axis=1) < min(k, len(subset)))
        if len(short) == 0 or retry is None:
            continue
        scores, ids = scores.copy(), ids.copy()
        scores[short], ids[short] = (_exact(queries[short], k, subset, locator, dim, policy, chunk_size)
                                     if retry == "exact" else ann(queries[short], k, retry, subset.selector()))
    return scores, ids


def _exact(queries: np.ndarray, k: int, subset: Subset, locator: Locator, dim: int, policy: SubsetPolicy,
           chunk_size: int) -> tuple[np.ndarray, np.ndarray]:
    vectors = subset.vectors(locator, dim, policy.vector_cache_bytes)
    if isinstance(vectors, np.ndarray):
        return exact_search(queries, vectors, k, ids=subset.ids, chunk_size=chunk_size)
    return exact_search(queries, vectors, k, chunk_size=chunk_size)

