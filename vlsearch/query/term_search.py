"""The steps of a weighted-terms search (:mod:`vlsearch.query.terms`) that need a collection:
stored items' vectors, every term embedded (texts in one batch through the text cache, images in
one batch, items from their shards), and leaving the example items out of the hits."""

from __future__ import annotations

from typing import Iterable

import numpy as np

from vlsearch.core.errors import ItemNotFoundError
from vlsearch.query.embedding import QueryEmbedder
from vlsearch.query.terms import Query
from vlsearch.store.gather import StoredVectors


def item_vectors(stored: StoredVectors, ids: Iterable[int]) -> np.ndarray:
    """The stored embeddings ``(len(ids), dim)`` float32 of live items, in the order given
    (:meth:`StoredVectors.get`); ItemNotFoundError names an id no live row has."""
    wanted = np.asarray(list(ids), np.int64)
    found = stored.locator.locate(wanted)[2]
    if not found.all():
        raise ItemNotFoundError(f"the collection has no item {int(wanted[~found][0])}")
    return stored.get(wanted)


def term_vectors(embedder: QueryEmbedder, stored: StoredVectors, query: Query) -> np.ndarray:
    """Each term's embedding ``(len(query.terms), dim)``, in the query's order."""
    out = np.empty((len(query.terms), embedder.collection.dim), np.float32)
    by_kind: dict[str, list[int]] = {}
    for i, term in enumerate(query.terms):
        by_kind.setdefault(term.kind, []).append(i)
    values = [t.value for t in query.terms]
    if "text" in by_kind:
        out[by_kind["text"]] = embedder.texts([values[i] for i in by_kind["text"]])
    if "image" in by_kind:
        out[by_kind["image"]] = embedder.images([values[i] for i in by_kind["image"]])
    if "item" in by_kind:
        out[by_kind["item"]] = item_vectors(stored, [values[i].id for i in by_kind["item"]])
    return out


def without_ids(scores: np.ndarray, ids: np.ndarray, skip: np.ndarray, depth: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's first ``depth`` candidates ``(scores, ids)`` whose id is not in ``skip`` (-1
    padded): example items left out before any hit is built, cut or counted."""
    if not len(skip):
        return scores, ids
    out_scores, out_ids = np.zeros((len(ids), depth), np.float32), np.full((len(ids), depth), -1, np.int64)
    for q in range(len(ids)):
        keep = ~np.isin(ids[q], skip)
        kept_scores, kept_ids = scores[q][keep][:depth], ids[q][keep][:depth]
        out_scores[q, :len(kept_ids)], out_ids[q, :len(kept_ids)] = kept_scores, kept_ids
    return out_scores, out_ids
