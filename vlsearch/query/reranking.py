"""The re-rank step of a text search (``rerank=K``): each query's first-stage candidates are
re-scored by the cross-attention re-ranker (:mod:`vlsearch.rerank.model`) from the query's text
token states and the candidates' image tokens (:mod:`vlsearch.rerank.features`); the best k are kept."""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import numpy as np

from vlsearch.core.lazy import Lazy
from vlsearch.core.modelinfo import ModelInfo
from vlsearch.rerank.features import CandidateFeatures
from vlsearch.rerank.model import Reranker, load_reranker, text_tokens
from vlsearch.store.collection import Collection
from vlsearch.store.rows import MetadataReader, RowLocator

Reranked = tuple[np.ndarray, np.ndarray, np.ndarray]


def reranker_loader(model: ModelInfo, given: Any = None) -> Lazy[Reranker]:
    """The re-ranker of a collection's ``model``, loaded and checked against it on first use:
    ``given`` is a Reranker, a file, or None (the one shipped for the model). One per Searcher,
    shared by every collection version it reads."""
    return Lazy(functools.partial(_load_reranker, model, given))


def _load_reranker(model: ModelInfo, given: Any) -> Reranker:
    if not isinstance(given, Reranker):
        given = load_reranker(model, given)
    given.check_model(model)
    return given


class RerankStage:
    """The re-ranker (shared, see :func:`reranker_loader`) and this collection version's candidate
    features, both loaded on first use.

    ``encoder``: returns the query model (loaded lazily by the caller); ``features_mode``: auto,
    stored or recompute (see :class:`~vlsearch.rerank.features.CandidateFeatures`)."""

    def __init__(self, collection: Collection, reranker: Lazy[Reranker], encoder: Callable[[], Any],
                 rows: RowLocator, reader: MetadataReader, features_mode: str = "auto"):
        self.collection, self.rows, self.reader, self.features_mode = collection, rows, reader, features_mode
        self._reranker, self._encoder = reranker, encoder
        # built from its parts, not from a bound method: no reference cycle through self (a
        # version's lease is let go by reference counting when its Searcher moves on)
        self._features: Lazy[CandidateFeatures] = Lazy(functools.partial(
            _candidate_features, collection, reranker, encoder, rows, reader, features_mode))

    @property
    def reranker(self) -> Reranker:
        """The re-ranker, loaded and checked against the collection's model on first use."""
        return self._reranker.get()

    @property
    def features(self) -> CandidateFeatures:
        """Where candidates' re-rank features come from (stored per shard, or recomputed)."""
        return self._features.get()

    @property
    def loaded(self) -> bool:
        """Whether the re-ranker's candidate features are set up (on the first re-ranked query)."""
        return self._features.made

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


def _candidate_features(collection: Collection, reranker: Lazy[Reranker], encoder: Callable[[], Any],
                        rows: RowLocator, reader: MetadataReader, mode: str) -> CandidateFeatures:
    return CandidateFeatures(collection, reranker.get(), encoder, rows.paths, rows.locate, reader.rows, mode)
