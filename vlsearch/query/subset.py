"""k-NN search restricted to a subset of image ids (the rows a metadata filter lets through).

Two strategies, chosen per call by :func:`plan` (thresholds measured by
``benchmarks/bench_filter.py``, figures in ``benchmarks/RESULTS.md``):

* **exact over the subset** when the collection has no index, when ``exact=True``, or when the
  subset is small (``<= exact_max_rows`` rows) and gathering its vectors is cheap: they are
  gathered already, or the index's vector rows file holds them (one fp16 row read per id,
  :class:`vlsearch.store.gather.StoredVectors`), or they lie in few Parquet row groups
  (``<= cold_row_groups``: without the rows file a row group is decoded up to its last wanted
  row, up to ~0.1 s for 4096 rows, so a cold gather of a few hundred scattered rows would take
  seconds). The gathered vectors are kept with the :class:`Subset` when they fit its budget, so
  the next query with the same filter reads nothing;
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
from typing import Any, Callable, Iterator

import numpy as np

from vlsearch.query.exact import DEFAULT_CHUNK_SIZE, MISSING_SCORE, exact_search
from vlsearch.store.gather import StoredVectors

#: ``ann(queries, k, nprobe, selector) -> (scores, ids)``: the searcher's ANN call with a selector.
AnnSearch = Callable[[np.ndarray, int, "int | None", Any], "tuple[np.ndarray, np.ndarray]"]


@dataclass(frozen=True)
class SubsetPolicy:
    """When a restricted search is exact, and how far ANN widens its probe."""

    #: Exact search over the subset up to this many rows (measured switch point) ...
    exact_max_rows: int = 20_000
    #: ... once its vectors are gathered, or the index's vector rows file holds them, or (without
    #: one) gathering them from the shards reads at most this many row groups.
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
        self._cheap: bool | None = None

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

    def cheap(self, stored: StoredVectors, max_row_groups: int) -> bool:
        """Whether the subset's vectors are gathered, or cheap to gather (:meth:`StoredVectors.cheap`)."""
        if self._cheap is None:
            self._cheap = stored.cheap(self.ids, max_row_groups)
        return self.gathered or self._cheap

    def vectors(self, stored: StoredVectors, cache_bytes: int) -> np.ndarray | Iterator[tuple[np.ndarray, np.ndarray]]:
        """The subset's vectors: a cached ``(len, dim)`` array when it fits ``cache_bytes``, else a
        stream of ``(ids, vectors)`` batches."""
        if self._vectors is not None:
            return self._vectors
        if len(self.ids) * stored.dim * 4 > cache_bytes:
            return stored.batches(self.ids)
        with self._lock:
            if self._vectors is None:
                out = stored.collect(self.ids)
                out.flags.writeable = False
                self._vectors = out
            return self._vectors


def plan(rows: int, ntotal: int, nprobe: int | None, nlist: int | None, exact: bool, has_index: bool,
         policy: SubsetPolicy = SubsetPolicy(), cheap_gather: bool | Callable[[], bool] = True) -> tuple[str, int | None]:
    """``("exact", None)`` or ``("ann", nprobe to use)`` for a subset of ``rows`` of ``ntotal``.
    ``cheap_gather`` (or a function computing it): the subset's vectors are gathered already or
    are cheap to read (:meth:`Subset.cheap`)."""
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
    stored: StoredVectors,
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
    slots beyond the subset's size. ``ann`` is the searcher's ANN call (None: no index);
    ``stored`` reads the subset's vectors for exact search."""
    nq = queries.shape[0]
    if len(subset) == 0:
        return np.full((nq, k), MISSING_SCORE, np.float32), np.full((nq, k), -1, np.int64)
    mode, probe = plan(len(subset), ntotal, nprobe, nlist, exact, ann is not None, policy,
                       lambda: subset.cheap(stored, policy.cold_row_groups))
    if mode == "exact":
        return _exact(queries, k, subset, stored, policy, chunk_size)
    scores, ids = ann(queries, k, probe, subset.selector())
    # a probe too narrow for this subset: never return a short list. Probing every list sees
    # every allowed row; exact search is the last resort (an index missing rows)
    for retry in (nlist if probe is not None and nlist is not None and probe < nlist else None, "exact"):
        short = np.flatnonzero((ids >= 0).sum(axis=1) < min(k, len(subset)))
        if len(short) == 0 or retry is None:
            continue
        scores, ids = scores.copy(), ids.copy()
        scores[short], ids[short] = (_exact(queries[short], k, subset, stored, policy, chunk_size)
                                     if retry == "exact" else ann(queries[short], k, retry, subset.selector()))
    return scores, ids


def _exact(queries: np.ndarray, k: int, subset: Subset, stored: StoredVectors, policy: SubsetPolicy,
           chunk_size: int) -> tuple[np.ndarray, np.ndarray]:
    vectors = subset.vectors(stored, policy.vector_cache_bytes)
    if isinstance(vectors, np.ndarray):
        return exact_search(queries, vectors, k, ids=subset.ids, chunk_size=chunk_size)
    return exact_search(queries, vectors, k, chunk_size=chunk_size)

