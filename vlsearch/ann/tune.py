"""Default search settings of a built index: ``nprobe`` and refine ``k_factor`` tuned on fresh queries.

Held-out queries are *leave-one-out*: stored vectors, each searched with ``k + 1`` results and its
own id removed from both the exact and the ANN lists, so no query finds itself. (Queries still in
the index flatter recall: their nearest neighbour is always themselves.) Every setting is a
per-call ``SearchParameters`` tree; the index's own state is not touched while tuning.

The search grid is powers of two of ``nprobe`` (up to ``nlist``) times ``k_factors`` (indexes
with a refine stage); for each ``k_factor`` nprobe grows until the target is met, nprobe reaches
nlist, or recall stops rising. The chosen default is the cheapest setting that meets the target;
when none does, the most accurate one (the cheapest within 0.005 of the best), and
:attr:`Tuning.met` is False with a plain :attr:`Tuning.message`. "Cheapest" is a cost model, not a
stopwatch, so the same seed always gives the same defaults (and index bytes): codes scanned
(``nprobe * ntotal / nlist``) plus ``rescore_cost`` per re-scored candidate (``k_factor * k``).
Each trial's measured ms/query is still recorded.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from vlsearch.core.metrics import ann_recall

#: ``search(queries, k, nprobe, k_factor) -> ids (Q, k)``
Search = Callable[[np.ndarray, int, "int | None", "float | None"], np.ndarray]
#: Refine factors tried (candidates re-ranked = k_factor * k).
K_FACTORS = (4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0)
#: One full-precision re-score of a candidate costs about this many fast-scan code comparisons
#: (an in-RAM refine code) ...
RESCORE_COST = 16.0
#: ... or this many when the candidate's fp16 row is gathered from the on-disk vectors file
#: (vlsearch.ann.refine; measured at 1M x 512 on 2 cores: ~0.47 us per candidate vs ~6 ns per code).
DISK_RESCORE_COST = 80.0
#: nprobe stops doubling when a doubling adds less than this to recall@k.
PLATEAU = 0.002


@dataclass(frozen=True)
class Trial:
    """One measured setting."""

    nprobe: int | None
    k_factor: float | None
    recall: float
    ms_per_query: float

    def as_row(self) -> list[Any]:
        return [self.nprobe, self.k_factor, round(self.recall, 4), round(self.ms_per_query, 4)]


@dataclass(frozen=True)
class Tuning:
    """The chosen defaults, their leave-one-out recall, whether the target was met, and every trial."""

    nprobe: int | None
    k_factor: float | None
    recall: float
    target: float
    met: bool
    queries: int
    trials: tuple[Trial, ...] = field(default_factory=tuple)
    limits: str = ""

    @property
    def message(self) -> str:
        """One plain sentence for ``build-index``, ``vlsearch info`` and the manifest."""
        setting = _setting(self.nprobe, self.k_factor)
        how = f"on {self.queries} leave-one-out queries (stored vectors, own id removed)"
        if self.met:
            return f"defaults {setting}: recall@10 {self.recall:.3f} >= target {self.target} {how}"
        return (f"recall@10 target {self.target} NOT met within {self.limits}: best {self.recall:.3f} at {setting} "
                f"{how}. This index's codes are too lossy for the target: give a larger --max-memory or an "
                "index type with a refine stage, or search with exact=True")


def _setting(nprobe: int | None, k_factor: float | None) -> str:
    parts = [f"nprobe={nprobe}" if nprobe is not None else "", f"k_factor={k_factor:g}" if k_factor else ""]
    return ", ".join(p for p in parts if p) or "no tunable parameter"


def drop_self(found: np.ndarray, own: np.ndarray, k: int) -> np.ndarray:
    """Each row of ``found`` without the query's own id (``own``), first ``k`` kept, order preserved."""
    keep = found != own[:, None]
    order = np.argsort(~keep, axis=1, kind="stable")
    out = np.take_along_axis(found, order, axis=1)[:, :k]
    return np.where(np.take_along_axis(keep, order, axis=1)[:, :k], out, -1)


def recall_at(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    """recall@k over the real exact ids (:func:`vlsearch.core.metrics.ann_recall`, ``denominator="exact"``)."""
    return ann_recall(found, truth, k, denominator="exact")


def _trial(search: Search, queries: np.ndarray, own: np.ndarray, truth: np.ndarray, k: int,
           nprobe: int | None, k_factor: float | None) -> Trial:
    best = float("inf")
    for _ in range(2):  # best of two: the first run may pay page faults and cache misses
        t0 = time.perf_counter()
        found = search(queries, k + 1, nprobe, k_factor)
        best = min(best, time.perf_counter() - t0)
    found = drop_self(found, own, k)
    return Trial(nprobe, k_factor, recall_at(found, truth, k), 1e3 * best / max(len(queries), 1))


def _nprobe_grid(nlist: int | None, fixed: int | None, below: int | None = None) -> list[int | None]:
    if fixed is not None or nlist is None:
        return [fixed]
    grid, p = [], 1
    while p <= nlist and (below is None or p < below):
        grid.append(p)
        p *= 2
    if (below is None) and grid and grid[-1] < nlist:
        grid.append(nlist)
    return grid


def tune(search: Search, queries: np.ndarray, own_ids: np.ndarray, truth: np.ndarray, *, target: float,
         nlist: int | None, refine: bool, k: int = 10, nprobe: int | None = None,
         k_factor: float | None = None, k_factors: Sequence[float] = K_FACTORS, ntotal: int = 0,
         rescore_cost: float = RESCORE_COST) -> Tuning:
    """Search the (nprobe, k_factor) grid; ``truth`` is the exact top-k with each query's own id removed.

    ``search(queries, k, nprobe, k_factor)`` returns the ANN ids with those per-call settings.
    ``nprobe`` / ``k_factor`` given fix that parameter (only the other one is tuned).
    ``ntotal``: vectors in the index (sizes an IVF list in the cost model); ``rescore_cost``: one
    re-scored candidate's cost in code comparisons.
    """
    kfs: list[float | None] = [k_factor] if (k_factor is not None or not refine) else list(k_factors)
    trials: list[Trial] = []
    met_at: int | None = None
    for kf in kfs:
        last = -1.0
        reached = False
        for p in _nprobe_grid(nlist, nprobe, below=met_at if met_at is not None and nprobe is None else None):
            t = _trial(search, queries, own_ids, truth, k, p, kf)
            trials.append(t)
            if t.recall >= target:
                reached, met_at = True, p
                break
            if p is not None and p >= 8 and t.recall - last < PLATEAU:
                break  # plateau: more lists do not help at this k_factor
            last = t.recall
        if met_at is not None and not reached:
            break  # a larger k_factor no longer lets a smaller nprobe meet the target
        if met_at == 1 or (met_at is not None and nprobe is not None):
            break
    list_size = ntotal / nlist if nlist else float(ntotal)

    def cost(t: Trial) -> tuple[float, int, float]:
        return ((t.nprobe or 1) * list_size + (t.k_factor or 0) * k * rescore_cost, t.nprobe or 0, t.k_factor or 0)

    return _choose(trials, target, len(queries), _limits(nlist, nprobe, kfs), cost)


def _limits(nlist: int | None, nprobe: int | None, kfs: Sequence[float | None]) -> str:
    parts = []
    if nlist is not None:
        parts.append(f"nprobe={nprobe}" if nprobe is not None else f"nprobe <= {nlist} (all lists)")
    if kfs and kfs[-1] is not None:
        parts.append(f"k_factor <= {max(kfs):g}")
    return ", ".join(parts) or "this index (no search parameter to tune)"


def _choose(trials: list[Trial], target: float, n: int, limits: str, cost: Callable[[Trial], Any]) -> Tuning:
    ok = [t for t in trials if t.recall >= target]
    if ok:
        best = min(ok, key=cost)
    else:
        top = max(t.recall for t in trials)
        best = min((t for t in trials if t.recall >= top - 0.005), key=cost)
    return Tuning(best.nprobe, best.k_factor, best.recall, target, bool(ok), n, tuple(trials), limits)
