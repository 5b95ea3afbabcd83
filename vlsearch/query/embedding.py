"""Query embedding: texts and images -> unit vectors with the collection's model, loaded on
first use, and the query-text cache (a :class:`~vlsearch.core.cache.ByteLRU`)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
from PIL import Image

from vlsearch.core.batching import MicroBatcher
from vlsearch.core.cache import ByteLRU
from vlsearch.core.lazy import Lazy
from vlsearch.core.errors import DecodeError, InvalidQueryError
from vlsearch.core.inputs import ImageInput
from vlsearch.data.images import open_image
from vlsearch.query.options import SearcherOptions, budget
from vlsearch.rerank.model import text_tokens
from vlsearch.store.collection import Collection

if TYPE_CHECKING:  # pragma: no cover
    from vlsearch.models.factory import Encoder

#: Most query texts one text-tower pass takes when concurrent queries are merged (MicroBatcher).
TEXT_BATCH = 64


@dataclass(frozen=True, eq=False)
class TextQuery:
    """Query texts embedded once: their unit vectors ``(Q, d)`` and, when they are to be
    re-ranked, the text tower's token states ``(states, mask)`` of the same pass."""

    texts: list[str]
    vectors: np.ndarray
    tokens: tuple[Any, Any] | None = None


class QueryEmbedder:
    """The collection's model, loaded on first use, and the text-embedding cache. Thread-safe.

    Texts that concurrent queries miss in the cache are encoded together: one caller runs the text
    tower while the others queue, and the next pass takes all the queued texts (up to
    :data:`TEXT_BATCH`; :class:`~vlsearch.core.batching.MicroBatcher`). A lone query runs at once.
    Under load a query's vector may thus come from a batched pass, which can differ from a one-text
    pass in the last bits (bf16, padding); the first one computed is the one cached."""

    def __init__(self, collection: Collection, encoder: "Encoder | None", options: SearcherOptions):
        if encoder is not None:
            collection.check_model(encoder.info, what="query model")
        self.collection = collection
        self.device, self.precision = options.device, options.precision
        self.text_cache = ByteLRU(budget(options.text_cache_mb))
        self._encoder: Lazy[Encoder] = Lazy(self._load, encoder)
        self._text_batcher = MicroBatcher(lambda todo: self.encoder.encode_texts(todo), max_items=TEXT_BATCH)

    @property
    def encoder(self) -> "Encoder":
        """The collection's model, loaded on first use (thread-safe)."""
        return self._encoder.get()

    @property
    def loaded(self) -> bool:
        """Whether the model is loaded (it loads on the first text or image query)."""
        return self._encoder.made

    def _load(self) -> "Encoder":
        from vlsearch.models.factory import load_model

        m = self.collection.manifest.model
        enc = load_model(m.name, m.pretrained, device=self.device, precision=self.precision)
        self.collection.check_model(enc.info, what="query model")
        return enc

    def texts(self, texts: Sequence[str]) -> np.ndarray:
        """Text embeddings through the cache; only cache misses are encoded (in one batch, merged
        with concurrent queries' misses)."""
        return self._through_cache(texts, self._text_batcher)

    def text_query(self, texts: Sequence[str], tokens: bool = False) -> TextQuery:
        """``texts`` embedded for search, their vectors through the cache as by :meth:`texts`. With
        ``tokens`` (re-ranking) one text-tower pass over the distinct texts gives their token states
        and the vectors of cache misses (cached for later queries), so a text searched with and
        without re-ranking is ranked with the same vector, whichever came first."""
        texts = check_texts(texts)
        if not tokens:
            return TextQuery(texts, self.texts(texts))
        distinct = {t: i for i, t in enumerate(dict.fromkeys(texts))}
        states, mask, vectors = text_tokens(self.encoder, list(distinct), with_embeddings=True)
        rows = [distinct[t] for t in texts]
        fresh = self._through_cache(texts, lambda todo: vectors[[distinct[t] for t in todo]])
        return TextQuery(texts, fresh, (states[rows], mask[rows]))

    def _through_cache(self, texts: Sequence[str], encode: Callable[[list[str]], np.ndarray]) -> np.ndarray:
        """``(len(texts), dim)`` vectors: cached ones from the cache, the distinct misses from
        ``encode(misses)`` (then cached)."""
        out = np.empty((len(texts), self.collection.dim), np.float32)
        missing: dict[str, list[int]] = {}
        for i, t in enumerate(texts):
            vec = self.text_cache.get(t)
            if vec is None:
                missing.setdefault(t, []).append(i)
            else:
                out[i] = vec
        if missing:
            todo = list(missing)
            for t, vec in zip(todo, encode(todo)):
                vec = np.array(vec, dtype=np.float32)
                vec.flags.writeable = False
                out[missing[t]] = self.text_cache.put(t, vec)
        return out

    def images(self, images: Sequence[ImageInput]) -> np.ndarray:
        """Encode query images; an unreadable one raises InvalidQueryError naming it and why."""
        pics = []
        for i, img in enumerate(images):
            if not isinstance(img, (str, os.PathLike, bytes, bytearray, memoryview, Image.Image)):
                raise InvalidQueryError(
                    f"query image {i} is a {type(img).__name__}: give a file path, a PIL image or encoded bytes")
            try:
                pics.append(open_image(img))
            except DecodeError as exc:
                raise InvalidQueryError(f"cannot read query image {_describe(img)}: {exc}") from exc
        return self.encoder.encode_images(pics)


def check_texts(texts: Any) -> list[str]:
    """A non-empty list of non-blank strings, else InvalidQueryError."""
    if not isinstance(texts, (list, tuple)):
        raise InvalidQueryError(f"query text must be a string or a list of strings, got {type(texts).__name__}")
    if not texts:
        raise InvalidQueryError("no query text given (empty list)")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise InvalidQueryError(f"query text {i} is a {type(t).__name__}, not a string")
        if not t.strip():
            raise InvalidQueryError(f"query text {i} is empty")
    return list(texts)


def _describe(img: Any) -> str:
    if isinstance(img, (bytes, bytearray, memoryview)):
        return f"({len(img)} bytes)"
    return str(img) if isinstance(img, (str, os.PathLike)) else type(img).__name__
