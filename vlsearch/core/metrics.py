"""Retrieval metrics (pure numpy): Recall@K, MRR, median/mean rank, and ANN-vs-exact recall.

Conventions (those of CLIP_benchmark and the Flickr30k / MS-COCO retrieval literature):

* **text -> image (t2i)**: every caption is a query over all images; it has exactly one correct
  image, its own. Its *rank* is the 1-based position of that image in the ranking.
* **image -> text (i2t)**: every image is a query over all captions; each of its captions is
  correct. Its *rank* is the position of its **first** (best ranked) correct caption.
* **Recall@K** = fraction of queries whose rank is <= K (t2i: the caption's own image is in the
  top K; i2t: at least one of the image's captions is in the top K), in ``[0, 1]``.
* **MRR** = mean over queries of ``1 / rank`` (first correct item); 0 for a query whose correct
  item was never returned (ranked lists cut at depth k, see :func:`ranks_from_ids`).
* **median_rank** / **mean_rank**: median and mean of the 1-based ranks (1 is perfect).

Ties (equal similarity scores) are broken **pessimistically**: a wrong item whose score equals
the best correct item's score is counted as ranked before it, so
``rank = 1 + #{wrong items with score >= best correct score}``. This is deterministic,
independent of item order, and never rewards a degenerate model (a constant similarity matrix
gets the worst rank, not the best). Ties among correct items do not matter (only the first
correct item counts). For ranked id lists the given order is used as is.

Images with no caption cannot be i2t queries: they are left out of the i2t averages (their
count is reported as ``n_queries``) but stay in the gallery as distractors for t2i.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

DEFAULT_KS: tuple[int, ...] = (1, 5, 10)
#: Elements of the temporary (rows x columns) arrays built per chunk (~64 MB of float32).
_CHUNK_ELEMENTS = 16_000_000


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    ks = tuple(int(k) for k in ks)
    if not ks or any(k < 1 for k in ks):
        raise ValueError(f"ks must be positive integers, got {ks!r}")
    return ks


def _check_inputs(sim_t2i: np.ndarray, text_image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    sim = np.asarray(sim_t2i)
    if sim.ndim != 2 or sim.shape[0] == 0 or sim.shape[1] == 0:
        raise ValueError(f"sim_t2i must be a non-empty (n_texts, n_images) matrix, got shape {sim.shape}")
    text_image = _check_text_image(text_image, *sim.shape)
    if np.issubdtype(sim.dtype, np.floating) and np.isnan(sim).any():
        raise ValueError("sim_t2i contains NaN scores")
    return sim, text_image


def _check_text_image(text_image: np.ndarray, n_texts: int, n_images: int) -> np.ndarray:
    text_image = np.asarray(text_image)
    if text_image.shape != (n_texts,):
        raise ValueError(f"text_image must have shape ({n_texts},) (one image index per caption), "
                         f"got {text_image.shape}")
    if not np.issubdtype(text_image.dtype, np.integer):
        raise ValueError(f"text_image must hold integer image indices, got dtype {text_image.dtype}")
    if text_image.min() < 0 or text_image.max() >= n_images:
        raise ValueError(f"text_image values must be image indices in [0, {n_images}), "
                         f"got range [{text_image.min()}, {text_image.max()}]")
    return text_image.astype(np.int64)


def t2i_ranks(sim_t2i: np.ndarray, text_image: np.ndarray) -> np.ndarray:
    """1-based rank of each caption's own image among all images (pessimistic ties), ``(n_texts,)``."""
    sim, text_image = _check_inputs(sim_t2i, text_image)
    n_texts, n_images = sim.shape
    ranks = np.empty(n_texts, np.int64)
    step = max(1, _CHUNK_ELEMENTS // n_images)
    for start in range(0, n_texts, step):
        block = sim[start:start + step]
        rows = np.arange(block.shape[0])
        correct = block[rows, text_image[start:start + step]]
        # every image scoring >= the correct one, the correct one included, ranks at or above it
        ranks[start:start + step] = (block >= correct[:, None]).sum(axis=1)
    return ranks


def i2t_ranks(sim_t2i: np.ndarray, text_image: np.ndarray) -> np.ndarray:
    """1-based rank of each image's first correct caption among all captions, ``(n_images,)``.

    ``rank = 1 + #{captions of other images scoring >= the image's best caption score}``;
    images without any caption get rank ``inf``.
    """
    sim, text_image = _check_inputs(sim_t2i, text_image)
    n_texts, n_images = sim.shape
    ranks = np.empty(n_images)
    step = max(1, _CHUNK_ELEMENTS // n_texts)
    for start in range(0, n_images, step):
        cols = np.arange(start, min(start + step, n_images))
        ranks[cols] = _i2t_block(sim[:, cols], text_image, cols)
    return ranks


def _i2t_block(block: np.ndarray, text_image: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """i2t ranks of the images ``cols`` from their ``(n_texts, len(cols))`` similarity columns."""
    correct = text_image[:, None] == cols[None, :]         # (n_texts, c)
    has = correct.any(axis=0)
    best = np.where(correct, block, -np.inf).max(axis=0)  # best correct score per image
    wrong_ge = ((block >= best[None, :]) & ~correct).sum(axis=0)
    return np.where(has, 1.0 + wrong_ge, np.inf)


def embedding_ranks(
    text_vectors: np.ndarray,
    image_vectors: np.ndarray,
    text_image: np.ndarray,
    text_queries: np.ndarray | None = None,
    image_queries: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """t2i and i2t ranks straight from embeddings (inner product), never holding the full matrix.

    Same definitions as :func:`t2i_ranks` / :func:`i2t_ranks` on ``text_vectors @ image_vectors.T``,
    computed one block of queries at a time (memory ~ one block of ``_CHUNK_ELEMENTS`` scores).
    ``text_queries`` / ``image_queries`` optionally restrict the queries to a subset (indices);
    the galleries are always complete. Returns ``(t2i ranks of text_queries, i2t ranks of
    image_queries)``.
    """
    text_vectors = np.asarray(text_vectors, dtype=np.float32)
    image_vectors = np.asarray(image_vectors, dtype=np.float32)
    if text_vectors.ndim != 2 or image_vectors.ndim != 2 or text_vectors.shape[1] != image_vectors.shape[1]:
        raise ValueError(f"text and image vectors must be (n, d) with the same d, "
                         f"got {text_vectors.shape} and {image_vectors.shape}")
    n_texts, n_images = len(text_vectors), len(image_vectors)
    if n_texts == 0 or n_images == 0:
        raise ValueError(f"need at least one caption and one image, got {n_texts} and {n_images}")
    text_image = _check_text_image(text_image, n_texts, n_images)
    tq = np.arange(n_texts) if text_queries is None else np.asarray(text_queries, dtype=np.int64)
    iq = np.arange(n_images) if image_queries is None else np.asarray(image_queries, dtype=np.int64)
    t2i = np.empty(len(tq), np.int64)
    step = max(1, _CHUNK_ELEMENTS // n_images)
    for start in range(0, len(tq), step):
        rows = tq[start:start + step]
        t2i[start:start + step] = t2i_ranks(text_vectors[rows] @ image_vectors.T, text_image[rows])
    i2t = np.empty(len(iq))
    step = max(1, _CHUNK_ELEMENTS // n_texts)
    for start in range(0, len(iq), step):
        cols = iq[start:start + step]
        i2t[start:start + step] = _i2t_block(text_vectors @ image_vectors[cols].T, text_image, cols)
    return t2i, i2t


def ranks_from_ids(retrieved: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """1-based position of the first retrieved item equal to the query's target, else ``inf``.

    ``retrieved`` is ``(Q, k)`` labels of ranked results (e.g. image indices, or for i2t the image
    index of each retrieved caption); ``targets`` is ``(Q,)``, the label a result must carry to be
    correct. The order of ``retrieved`` is taken as the ranking (ties already broken by the
    searcher); ``-1`` padding never matches a target >= 0. A query whose target is not in its
    ``k`` results gets ``inf``: Recall@K for K <= k and MRR (as MRR@k) stay exact, ranks > k are
    unknown.
    """
    retrieved = np.asarray(retrieved)
    targets = np.asarray(targets)
    if retrieved.ndim != 2 or targets.shape != (retrieved.shape[0],):
        raise ValueError(f"retrieved must be (Q, k) and targets (Q,), got {retrieved.shape} and {targets.shape}")
    match = retrieved == targets[:, None]
    found = match.any(axis=1)
    ranks = np.full(retrieved.shape[0], np.inf)
    ranks[found] = match[found].argmax(axis=1) + 1
    return ranks


def metrics_from_ranks(
    ranks: np.ndarray, ks: Sequence[int] = DEFAULT_KS, depth: int | None = None
) -> dict[str, float | int | None]:
    """``R@K`` (fraction of ranks <= K), ``mrr``, ``median_rank``, ``mean_rank``, ``n_queries``.

    ``inf`` ranks (nothing correct retrieved / no correct item) count as misses and 0 reciprocal
    rank; ``median_rank`` / ``mean_rank`` are ``None`` when they would be infinite (unknown).
    Queries with ``nan`` rank are left out. With ``depth``, also ``mrr@depth``: reciprocal ranks
    beyond ``depth`` count 0 (the MRR a top-``depth`` result list can show).
    """
    ks = _check_ks(ks)
    ranks = np.asarray(ranks, dtype=np.float64)
    ranks = ranks[~np.isnan(ranks)]
    if ranks.size == 0:
        raise ValueError("no query has a rank: nothing to average")
    out: dict[str, float | int | None] = {f"R@{k}": float(np.mean(ranks <= k)) for k in ks}
    out["mrr"] = float(np.mean(1.0 / ranks))  # 1/inf == 0
    if depth is not None:
        out[f"mrr@{int(depth)}"] = float(np.mean(np.where(ranks <= depth, 1.0 / ranks, 0.0)))
    median = float(np.median(ranks))
    mean = float(np.mean(ranks))
    out["median_rank"] = median if np.isfinite(median) else None
    out["mean_rank"] = mean if np.isfinite(mean) else None
    out["n_queries"] = int(ranks.size)
    return out


def retrieval_metrics(
    sim_t2i: np.ndarray, text_image: np.ndarray, ks: Sequence[int] = DEFAULT_KS
) -> dict[str, dict[str, float | int | None]]:
    """Text->image and image->text retrieval metrics from a full similarity matrix.

    Args:
        sim_t2i: ``(n_texts, n_images)`` similarity of every caption to every image (higher is
            closer, e.g. cosine similarity of normalised embeddings).
        text_image: ``(n_texts,)`` index (column of ``sim_t2i``) of each caption's image; several
            captions may share one image.
        ks: the K of Recall@K.

    Returns:
        ``{"t2i": {...}, "i2t": {...}}``, each with ``"R@K"`` for every K, ``"mrr"``,
        ``"median_rank"``, ``"mean_rank"`` (1-based) and ``"n_queries"``; conventions and the
        pessimistic tie rule are in the module docstring. Images without captions are not i2t
        queries.
    """
    ks = _check_ks(ks)
    i2t = i2t_ranks(sim_t2i, text_image)
    return {
        "t2i": metrics_from_ranks(t2i_ranks(sim_t2i, text_image), ks),
        "i2t": metrics_from_ranks(i2t[np.isfinite(i2t)], ks),
    }


def ann_recall_per_query(ann_ids: np.ndarray, exact_ids: np.ndarray, k: int) -> np.ndarray:
    """Per query, ``|ANN top-k ∩ exact top-k| / k`` (the "k-NN intersection" measure), ``(Q,)``.

    Only the first ``k`` columns of each array are used; ``-1`` padding (fewer than ``k``
    results) never counts as an intersection. Ids are compared as sets, so the order within the
    top k does not matter. When the exact k-th and (k+1)-th scores tie, a different but equally
    close id from the ANN index counts as a miss.
    """
    return _intersections(ann_ids, exact_ids, k) / k


def _intersections(ann_ids: np.ndarray, exact_ids: np.ndarray, k: int) -> np.ndarray:
    """Per query, how many real exact top-k ids the ANN top-k holds (int64, ``(Q,)``)."""
    ann_ids = np.asarray(ann_ids)
    exact_ids = np.asarray(exact_ids)
    if ann_ids.ndim != 2 or exact_ids.ndim != 2 or ann_ids.shape[0] != exact_ids.shape[0]:
        raise ValueError(f"ann_ids and exact_ids must be (Q, >=k) arrays with the same Q, "
                         f"got {ann_ids.shape} and {exact_ids.shape}")
    if k < 1 or ann_ids.shape[1] < k or exact_ids.shape[1] < k:
        raise ValueError(f"k={k} must be in [1, {min(ann_ids.shape[1], exact_ids.shape[1])}]")
    ann, exact = ann_ids[:, :k], exact_ids[:, :k]
    out = np.empty(ann.shape[0], np.int64)
    step = max(1, _CHUNK_ELEMENTS // (k * k))
    for start in range(0, ann.shape[0], step):
        e, a = exact[start:start + step], ann[start:start + step]
        # each exact id counted once if it appears anywhere in the ANN list (duplicates in ANN ignored)
        hit = (e[:, :, None] == a[:, None, :]).any(axis=2) & (e >= 0)
        out[start:start + step] = hit.sum(axis=1)
    return out


def ann_recall(ann_ids: np.ndarray, exact_ids: np.ndarray, k: int, denominator: str = "k") -> float:
    """ANN-vs-exact recall@k: the one definition (``vlsearch bench``, the index builder's nprobe
    tuning and ``benchmarks/bench_search.py`` all use it).

    ``denominator="k"`` (default): mean over queries of :func:`ann_recall_per_query`,
    ``|ANN top-k ∩ exact top-k| / k`` (faiss.contrib.evaluation's k-NN intersection measure, with
    ``-1`` padding never counted). ``denominator="exact"``: the total intersection over the total
    number of real exact ids (``min(k, valid)`` per query), so a database smaller than k does not
    cap recall below 1; no queries gives 1.0. The two agree whenever every query has k exact ids.
    """
    if denominator == "k":
        return float(np.mean(ann_recall_per_query(ann_ids, exact_ids, k)))
    if denominator != "exact":
        raise ValueError(f"denominator must be 'k' or 'exact', not {denominator!r}")
    exact_ids = np.asarray(exact_ids)
    if len(exact_ids) == 0:
        return 1.0
    hits = _intersections(ann_ids, exact_ids, k)
    valid = np.minimum(k, (exact_ids[:, :k] >= 0).sum(axis=1))
    return float(hits.sum() / max(int(valid.sum()), 1))
