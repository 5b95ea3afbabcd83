"""The re-rank step of a text search (``rerank=K``): each query's first-stage candidates are
re-scored by the cross-attention re-ranker (:mod:`vlsearch.rerank.model`) from the query's text
token states and the candidates' image tokens (:mod:`vlsearch.rerank.features`); the best k are kept."""

from __future__ import annotations

import threading
from typing import Any, Callable, Sequence

import numpy as np

from vlsearch.rerank.features import CandidateFeatures
from vlsearch.rerank.model import Reranker, load_reranker, text_tokens
from vlsearch.store.collection import Collection
from vlsearch.store.rows import MetadataReader, RowLocator

Reranked = tuple[np.ndarray, np.ndarray, np.ndarray]


class RerankStage:
    """The collection model's re-ranker and its candidate features, both loaded on first use.

    ``reranker``: a Reranker, a file, or None (the one shipped for the collection's model);
    ``encoder``: returns the query model (loaded lazily by the caller); ``features_mode``: auto,
    stored or recompute (see :class:`~vlsearch.rerank.features.CandidateFeatures`)."""

    def __init__(self, collection: Collection, reranker: Any, encoder: Callable[[], Any], rows: RowLocator,
                 reader: MetadataReader, features_mode: str = "auto"):
        self.collection, self.rows, self.reader, self.features_mode = collection, rows, reader, features_mode
        self._given, self._encoder = reranker, encoder
        self._reranker: Reranker | None = None
        self._features: CandidateFeatures | None = None
        self._lock = threading.Lock()

    @property
    def reranker(self) -> Reranker:
        """The re-ranker, loaded and checked against the collection's model on first use."""
        if self._reranker is None:
            with self._lock:
                if self._reranker is None:
                    given = self._given
                    if not isinstance(given, Reranker):
                        given = load_reranker(self.collection.model, given)
                    given.check_model(self.collection.model)
                    self._reranker = given
        return self._reranker

    @property
    def features(self) -> CandidateFeatures:
        """Where candidates' re-rank features come from (stored per shard, or recomputed)."""
        if self._features is None:
            reranker = self.reranker
            with self._lock:
                if self._features is None:
                    self._features = CandidateFeatures(
                        self.collection, reranker, self._encoder, self.rows.paths, self.rows.locate,
                        self.reader.rows, self.features_mode)
        return self._features

    def rerank(self, texts: Sequence[str], scores: np.ndarray, ids: np.ndarray, k: int,
               tokens: tuple[Any, Any] | None = None) -> Reranked:
        """Re-score each query's candidates ``(scores, ids)`` (Q, K); returns the best ``k`` as
        ``(final scores, ids, first-stage scores)`` (Q, k), id -1 in empty slots. ``tokens``: the
        texts' ``text_tokens`` (states, mask) when already computed."""
        reranker, features = self.reranker, self.features
        states, mask = tokens if tokens is not None else text_tokens(self._encoder(), list(texts))
        out = (np.full((len(ids), k), -np.inf, np.float32), np.full((len(ids), k), -1, np.int64),
               np.full((len(ids), k), -np.inf, np.float32))
        for q in range(len(ids)):
            valid = ids[q] >= 0
            if not valid.any():
                continue
            kv, hub = features.candidates(ids[q][valid])
            final = reranker.combine(scores[q][valid], reranker.itm_logits(states[q], mask[q], kv), hub)
            best = np.argsort(-final, kind="stable")[:k]
            n = len(best)
            out[0][q, :n], out[1][q, :n], out[2][q, :n] = final[best], ids[q][valid][best], scores[q][valid][best]
        return out
