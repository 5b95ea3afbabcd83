"""Keyword and hybrid search modes: ``mode="vector" | "keyword" | "hybrid"``.

* **vector**: k-NN of the text's embedding (:mod:`vlsearch.query.plan`); ``score`` is the cosine.
* **keyword**: BM25 over the version's keyword indexes (:mod:`vlsearch.store.keyword`: captions,
  path words, text metadata); ``score`` is tantivy's BM25 score (unbounded, comparable only
  within one query). Phrases (``"two dogs"``), field prefixes (``path:beach``, ``caption:dog``,
  ``label:cat``), ``AND``/``OR``/``-term``. Bad syntax raises InvalidQueryError.
* **hybrid**: both lists, each taken to depth ``max(k, HYBRID_DEPTH)`` (100) so that a row
  ranked just out of one list's top k can still win on the other, then fused:

  - by default **Reciprocal Rank Fusion**: ``score = sum over lists of 1 / (rrf_k + rank)``
    (rank from 1; ``rrf_k`` = 60 as in Cormack et al. 2009, LanceDB, Marqo); a row missing from
    a list gets nothing from it. Scores lie in (0, 2/(rrf_k+1)]. Uses ranks only, so the BM25
    and cosine scales never need reconciling.
  - with ``alpha`` in [0, 1], **weighted fusion** of normalised scores (Weaviate's relative
    score fusion): each list's scores are min-max scaled to [0, 1] over its own depth list
    (its best row 1, its last 0; a list of one row or equal scores: all 1), and
    ``score = alpha * vector + (1 - alpha) * keyword``, a missing row counting 0. ``alpha=1`` is
    the vector order, ``alpha=0`` the keyword order (over the union of both lists).

Measured (``benchmarks/bench_hybrid.py --flickr``, RESULTS.md): on flickr8k-test with only each
image's first caption stored and the other four as queries, vlsearch-small text->image R@10 is
62.2 % by vector, 60.9 % by keyword and 74.8 % by hybrid RRF (+12.6 points; R@1 19.1 -> 34.8).

``where`` restricts every mode to the rows passing the filter; deleted rows never come back.
A keyword or hybrid query with no keyword match returns the vector hits (hybrid) or nothing (keyword).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from vlsearch.core.errors import InvalidQueryError

MODES = ("vector", "keyword", "hybrid")
#: depth each list of a hybrid query is taken to (at least k)
HYBRID_DEPTH = 100
RRF_K = 60


def check_mode(mode: Any, alpha: Any = None, rrf_k: Any = RRF_K) -> str:
    if mode not in MODES:
        raise InvalidQueryError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if alpha is not None:
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
            raise InvalidQueryError(f"alpha must be a number in [0, 1], got {alpha!r}")
        if mode != "hybrid":
            raise InvalidQueryError("alpha applies to mode='hybrid' only")
    if isinstance(rrf_k, bool) or not isinstance(rrf_k, (int, float)) or rrf_k < 0:
        raise InvalidQueryError(f"rrf_k must be a non-negative number, got {rrf_k!r}")
    return mode


def hybrid_depth(k: int) -> int:
    return max(k, HYBRID_DEPTH)


def rrf(lists: list[np.ndarray], k: int, rrf_k: float = RRF_K) -> tuple[np.ndarray, np.ndarray]:
    """Reciprocal Rank Fusion of ranked id lists (best first, -1 = empty): ``(scores, ids)`` of the
    best ``k``, ties broken by id."""
    fused: dict[int, float] = {}
    for ids in lists:
        rank = 0
        for i in ids:
            if i < 0:
                continue
            rank += 1
            fused[int(i)] = fused.get(int(i), 0.0) + 1.0 / (rrf_k + rank)
    return _top(fused, k)


def weighted(vector: tuple[np.ndarray, np.ndarray], keyword: tuple[np.ndarray, np.ndarray], alpha: float,
             k: int) -> tuple[np.ndarray, np.ndarray]:
    """``alpha * minmax(vector scores) + (1 - alpha) * minmax(keyword scores)`` over the union of
    the two ``(scores, ids)`` lists; the best ``k``."""
    fused: dict[int, float] = {}
    for (scores, ids), weight in ((vector, alpha), (keyword, 1.0 - alpha)):
        valid = ids >= 0
        scores, ids = np.asarray(scores, np.float64)[valid], ids[valid]
        if not len(ids):
            continue
        lo, hi = scores.min(), scores.max()
        scaled = np.ones_like(scores) if hi - lo <= 0 else (scores - lo) / (hi - lo)
        for i, s in zip(ids.tolist(), scaled.tolist()):
            fused[i] = fused.get(i, 0.0) + weight * s
    return _top(fused, k)


def _top(fused: dict[int, float], k: int) -> tuple[np.ndarray, np.ndarray]:
    best = sorted(fused.items(), key=lambda item: (-item[1], item[0]))[:k]
    return (np.array([s for _, s in best], np.float32), np.array([i for i, _ in best], np.int64))


def padded(rows: list[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-query ``(scores, ids)`` lists as ``(Q, k)`` arrays, id -1 in empty slots."""
    scores = np.zeros((len(rows), k), np.float32)
    ids = np.full((len(rows), k), -1, np.int64)
    for q, (s, i) in enumerate(rows):
        scores[q, :len(i)], ids[q, :len(i)] = s[:k], i[:k]
    return scores, ids
