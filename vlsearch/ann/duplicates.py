"""Near-duplicate groups among embeddings: the pure helpers that query-time de-duplication
(clip-retrieval's ``deduplicate``, ``dedup=True``) and ``vlsearch duplicates`` share.

Two items are near-duplicates when the cosine of their L2-normalised embeddings is at least a
threshold; a group is a connected component of that relation (as clip-retrieval does it), so a
burst A~B~C is one group even when A and C score below the threshold.
"""

from __future__ import annotations

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

#: clip-retrieval's query-time ``deduplicate`` threshold (cosine >= 0.94 between results).
CLIP_RETRIEVAL_THRESHOLD = 0.94
#: The default near-copy threshold of ``vlsearch duplicates`` and of query-time ``dedup=True``: cosine
#: >= T links two images. Calibrated on generated copies of held-out photos for vlsearch-small
#: (benchmarks/bench_duplicates.py, RESULTS.md "Near-duplicates"); the clip-retrieval API keeps 0.94.
DEFAULT_DUPLICATE_THRESHOLD = 0.90


#: rows compared against all the others per matrix product in :func:`near_duplicate_labels`
BLOCK_ROWS = 1024


def component_labels(n: int, left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Connected-component label ``(n,)`` of each of ``n`` items, given the edges
    ``left[e] ~ right[e]``; labels are numbered in order of each component's first item."""
    left = np.asarray(left, np.int64)
    right = np.asarray(right, np.int64)
    graph = coo_matrix((np.ones(len(left), np.int8), (left, right)), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    # renumber so that label order follows first appearance (stable, independent of scipy's order)
    _, first = np.unique(labels, return_index=True)
    order = np.argsort(first)
    renumber = np.empty(len(order), np.int64)
    renumber[order] = np.arange(len(order))
    return renumber[labels]


def near_duplicate_labels(vectors: np.ndarray, threshold: float) -> np.ndarray:
    """Group label ``(n,)`` of each row of ``vectors`` (L2-normalised); rows in one group are linked
    by cosines ``>= threshold``. Rows are compared :data:`BLOCK_ROWS` at a time against all, so a
    deep candidate list (10,000 rows) needs tens of MiB, not an n x n matrix."""
    vectors = np.asarray(vectors, np.float32)
    n = len(vectors)
    if n == 0:
        return np.zeros(0, np.int64)
    left, right = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    for start in range(0, n, BLOCK_ROWS):
        rows, cols = np.nonzero(vectors[start:start + BLOCK_ROWS] @ vectors.T >= threshold)
        rows = rows + start
        upper = cols > rows
        left.append(rows[upper])
        right.append(cols[upper])
    return component_labels(n, np.concatenate(left), np.concatenate(right))


def first_of_each_group(labels: np.ndarray) -> np.ndarray:
    """Positions of the first row of each group, in row order: what a ranked list keeps when its
    near-duplicates are collapsed into their best-ranked member."""
    labels = np.asarray(labels)
    _, first = np.unique(labels, return_index=True)
    return np.sort(first)
