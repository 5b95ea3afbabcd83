"""Searching one version's keyword indexes: parse (InvalidQueryError on bad syntax), search each live
shard's index, drop dead and filtered-out rows, merge by BM25 score."""

from __future__ import annotations

import json
import re
import threading
from functools import cached_property
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from vlsearch.core.errors import IndexNotBuiltError, InvalidQueryError
from vlsearch.store.keyword.index import CAPTION_FIELD, ID_FIELD, PATH_FIELD, keyword_path, missing_keyword_shards

#: first depth asked of a shard beyond what is needed, multiplied until enough rows pass a filter
_FILTER_GROWTH = 4


class ShardKeywordIndex:
    """One shard's tantivy index, opened on first use."""

    def __init__(self, path: Path):
        self.path = path

    @cached_property
    def fields(self) -> list[str]:
        meta = json.loads((self.path / "meta.json").read_text(encoding="utf-8"))
        return [f["name"] for f in meta["schema"] if f["name"] != ID_FIELD]

    @cached_property
    def index(self) -> Any:
        import tantivy

        return tantivy.Index.open(str(self.path))

    @cached_property
    def searcher(self) -> Any:
        return self.index.searcher()

    def parse(self, query: str, fields: Sequence[str]) -> Any:
        """The query as this index reads it: prefixes of fields it lacks match nothing here."""
        mine = [f for f in fields if f in self.fields]
        try:
            return self.index.parse_query(query, mine)
        except ValueError:
            return self.index.parse_query_lenient(query, mine)[0]

    def search(self, query: Any, limit: int) -> tuple[np.ndarray, np.ndarray, int]:
        """``(scores, ids, matches)`` of the best ``limit`` documents; ``matches``: how many match."""
        result = self.searcher.search(query, limit)
        if not result.hits:
            return np.zeros(0, np.float32), np.zeros(0, np.int64), int(result.count or 0)
        scores = np.fromiter((s for s, _ in result.hits), np.float32, len(result.hits))
        ids = np.asarray(self.searcher.fast_field_values(ID_FIELD, [a for _, a in result.hits]), np.int64)
        return scores, ids, int(result.count if result.count is not None else len(ids))


def plain_words(text: str) -> str:
    """``text`` as plain words for the query parser: punctuation (the query syntax: quotes, colons,
    parentheses, +/-...) becomes spaces, and the text is lower-cased so that AND/OR/NOT are words."""
    if not isinstance(text, str):
        raise InvalidQueryError(f"keyword query must be a string, got {type(text).__name__}")
    return " ".join(re.sub(r"[^\w\s]", " ", text).lower().split())


class KeywordSearcher:
    """The keyword indexes of one collection version: its live shards ``numbers`` with their dead
    rows ``dead`` (shard -> sorted ids). Thread-safe; indexes open on the first query."""

    def __init__(self, directory: Path, numbers: Sequence[int], dead: Mapping[int, np.ndarray]):
        self.directory = Path(directory)
        self.numbers = list(numbers)
        self.dead = dead
        self._lock = threading.RLock()
        self._shards: list[tuple[int, ShardKeywordIndex]] | None = None
        self._validator: Any = None

    def check_built(self) -> None:
        """IndexNotBuiltError naming the command when a live shard has no keyword index."""
        missing = missing_keyword_shards(self.directory, self.numbers)
        if missing:
            raise IndexNotBuiltError(
                f"collection {self.directory} has no keyword index for {len(missing)} of its {len(self.numbers)} "
                f"shards (written before keyword search existed): run `vlsearch keyword-index {self.directory}` "
                "or Collection.build_keyword_index()")

    @property
    def shards(self) -> list[tuple[int, ShardKeywordIndex]]:
        if self._shards is None:
            with self._lock:
                if self._shards is None:
                    self.check_built()
                    self._shards = [(n, ShardKeywordIndex(keyword_path(self.directory, n))) for n in self.numbers]
        return self._shards

    @cached_property
    def fields(self) -> list[str]:
        """Every text field of this version's indexes (searched when a query names none)."""
        names = [CAPTION_FIELD, PATH_FIELD]
        for _, shard in self.shards:
            names += shard.fields
        return list(dict.fromkeys(names))

    def check(self, query: str) -> str:
        """The query, if its syntax and fields are valid for this version; else InvalidQueryError."""
        import tantivy

        from vlsearch.store.keyword.index import schema_for

        if not isinstance(query, str) or not query.strip():
            raise InvalidQueryError("keyword query is empty")
        with self._lock:
            if self._validator is None:
                self._validator = tantivy.Index(schema_for(self.fields))  # in memory: only parses
        try:
            self._validator.parse_query(query, self.fields)
        except ValueError as exc:
            raise InvalidQueryError(f"bad keyword query {query!r}: {exc} (fields: {', '.join(self.fields)}; "
                                    'phrases in "double quotes", field prefixes like path:beach)') from None
        return query

    def search(self, query: str, depth: int, allowed: np.ndarray | None = None,
               lenient: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """The best ``depth`` live rows matching ``query``: ``(BM25 scores desc, ids)``.
        ``allowed``: sorted ids the rows must be among (a ``where`` filter), or None. ``lenient``:
        read natural language (a hybrid query): its words only (:func:`plain_words`), so that quotes,
        colons or parentheses in a sentence never raise InvalidQueryError nor drop words."""
        if lenient:
            query = plain_words(query)
            if not query:
                return np.zeros(0, np.float32), np.zeros(0, np.int64)
        self.check(query)
        fields = self.fields
        all_scores, all_ids = [], []
        parsed_by_schema: dict[tuple[str, ...], Any] = {}  # same fields in the same order: the same parsed query
        for number, shard in self.shards:
            schema = tuple(shard.fields)
            if schema not in parsed_by_schema:
                parsed_by_schema[schema] = shard.parse(query, fields)
            parsed = parsed_by_schema[schema]
            dead = self.dead.get(number)
            limit = depth + (0 if dead is None else len(dead))
            if allowed is not None:
                limit *= _FILTER_GROWTH
            while True:
                scores, ids, matches = shard.search(parsed, limit)
                keep = np.ones(len(ids), bool)
                if dead is not None:
                    keep &= ~np.isin(ids, dead)
                if allowed is not None:
                    keep &= np.isin(ids, allowed, assume_unique=False)
                if keep.sum() >= depth or len(ids) >= matches or len(ids) < limit:
                    break
                limit *= _FILTER_GROWTH
            all_scores.append(scores[keep][:depth])
            all_ids.append(ids[keep][:depth])
        if not all_ids:
            return np.zeros(0, np.float32), np.zeros(0, np.int64)
        scores, ids = np.concatenate(all_scores), np.concatenate(all_ids)
        order = np.lexsort((ids, -scores))[:depth]
        return scores[order], ids[order]
