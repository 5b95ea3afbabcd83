"""Shaping the result list: cut it where the scores stop being relevant, group it, order it by a
metadata column, and count metadata values among the matches (facets).

::

    hits = s.search_text("a dog on a beach", k=10, min_score=0.25)        # only hits scoring >= 0.25
    hits = s.search_text("a dog on a beach", k=10, autocut=1)             # up to the first score jump
    hits = s.search_text("sunset", k=12, group_by="folder", per_group=3)  # at most 3 photos per folder
    hits = s.search_text("sunset", k=10, min_score=0.2, order_by="file_mtime_ns DESC")  # newest matches
    hits = s.search_text("sunset", k=10, facets=["label", "folder"])
    hits.facets   # {"label": {"dog": 41, "cat": 12, ...}, "folder": {...}}: counts among the relevant set

**The relevant set.** Shaping works on a *candidate list*, the ``depth`` nearest neighbours of the
query (after ``where``), and on the part of it that counts as relevant:

* ``min_score=S``: the candidates scoring at least ``S``. With ``order_by`` or ``facets`` the list is
  fetched deeper (``x4`` each round, up to :data:`MAX_DEPTH`) until a candidate falls below ``S``,
  so that the relevant set is *every* hit scoring ``>= S`` (up to ``MAX_DEPTH``), not the top 10.
* ``autocut=N``: the candidates before the ``N``-th jump of the score curve (:func:`autocut`).
* neither: the whole candidate list (its ``depth`` is the "top N").

``min_score`` is applied first, then ``autocut`` on what is left. Then, in this order:

1. ``order_by="column [ASC|DESC]"`` sorts the relevant set by a metadata column (ascending by
   default; NULLs last either way; ties keep the score order), e.g. newest first among the
   matches. Without it the list stays in score order.
2. ``group_by="column"`` keeps at most ``per_group`` (default 1) hits per value of the column, the
   first ones in that order (NULL is one group). Without ``order_by`` the list is fetched deeper
   (x4 each round, up to ``MAX_DEPTH``) until ``k`` hits are found or the relevant set is exhausted.
3. The first ``k`` are returned, ranked 1..n in that order (``Hit.score`` stays the cosine).

``dedup=True`` (or a cosine threshold ``T``; ``True`` is :data:`DEFAULT_DUPLICATE_THRESHOLD`) collapses
near-duplicate hits into one before any of that: the relevant set's candidates are grouped by
connected components of "cosine of their *stored* vectors ``>= T``" (clip-retrieval's
``deduplicate``, :mod:`vlsearch.ann.duplicates`), and each group keeps its best-ranked member.
Without ``order_by`` the list is fetched deeper (x4 each round, up to ``MAX_DEPTH``) until ``k``
distinct hits are found or the relevant set is exhausted. It works with every query kind, ``where``,
``exact``, ``rerank`` and the keyword/hybrid modes (whose candidates are stored items too).

``facets=[...]`` counts each column's values among the relevant set (before grouping), most
frequent first (at most :data:`FACET_LIMIT` values per column); they come back as
``hits.facets`` (:class:`ShapedHits`, a ``Hits`` with ``facets``, ``relevant`` (the size of the
relevant set) and ``depth`` (the candidates fetched)).

**Depth.** ``depth`` (default: ``k`` when the list is only cut; ``max(k, DEFAULT_DEPTH)`` with
``group_by``, ``order_by`` or ``facets``) is the first candidate list fetched; the list is fetched
deeper only in the two cases above. The relevant set is exhausted when the list comes back
shorter than asked (the collection, or the filter, has no more), when ``min_score`` or
``autocut`` cut inside it, or at ``MAX_DEPTH``.

**Columns** are the image shards' non-embedding scalar columns (``width``, ``height``, ``path``,
``file_mtime_ns``, every extra metadata column), ``folder`` among them (the directory part of
``path``, ``""`` for a file at the root; filled from the path for rows of shards written before it).
Names are matched against the table's columns (case-insensitively) and only then quoted into SQL:
a user's string is data, never SQL. An unknown column, a list or struct column, or a direction
other than ASC/DESC is an :class:`~vlsearch.core.errors.InvalidQueryError`; except that facets
count each element of a list<string> column (``tags``: a photo tagged dog and beach counts once
for each).
Their values come from the collection version's metadata table, the locked DuckDB table that
filters read (:class:`~vlsearch.query.filters.FilterEngine`, built on the first filtered or shaped
query, about 60 MiB per million images), joined with the candidates' ids.

**What a score means.** ``Hit.score`` is the cosine similarity of L2-normalised embeddings, in
[-1, 1]. Its scale depends on the model and on the *kind* of query: a text and an image are
embedded by different towers, and a contrastive model only learns to rank texts against images.
With vlsearch-small on Flickr8k-test (benchmarks/RESULTS.md "scores", ``bench_scores.py``) a
caption scores a median 0.43 with its own image, an image 0.80 with an altered copy of itself, and
unrelated pairs of either kind sit around 0 (95th percentile 0.27-0.28). One ``min_score``
therefore does not fit text and image queries alike (rclip #207): 0.645, which keeps 95 % of the
image matches, keeps 3.3 % of the text ones. Choose it per model and query kind, or use
``autocut``, which looks at the shape of one query's score curve rather than at absolute values.
With ``rerank=K`` the score is the re-ranker's, on another scale again.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from vlsearch.ann.duplicates import DEFAULT_DUPLICATE_THRESHOLD, first_of_each_group, near_duplicate_labels
from vlsearch.core.errors import InvalidQueryError
from vlsearch.query.results import Hits, Results

if TYPE_CHECKING:  # pragma: no cover
    from vlsearch.query.filters import FilterEngine

#: First candidate list with group_by / order_by / facets (when ``depth`` is not given).
DEFAULT_DEPTH = 100
#: Deepest candidate list a shaped search fetches.
MAX_DEPTH = 10_000
#: Each deeper fetch asks for this many times the previous depth.
GROW = 4
#: Values reported per facet column (the most frequent).
FACET_LIMIT = 100
#: Longest accepted column name.
MAX_NAME = 256

_ORDER_RE = re.compile(r"^\s*(\S+?)(?:\s+(asc|desc))?\s*$", re.IGNORECASE)

#: ``fetch(depth) -> (scores (Q, D), ids (Q, D), first-stage scores (Q, D) or None)``
Fetch = Callable[[int], tuple[np.ndarray, np.ndarray, "np.ndarray | None"]]
Build = Callable[[np.ndarray, np.ndarray, "np.ndarray | None"], Results]
#: ``vectors(ids (n,)) -> (n, d)``: the stored, L2-normalised vectors of candidates (for ``dedup``).
Vectors = Callable[[np.ndarray], np.ndarray]


# ---- the cuts -----------------------------------------------------------------------------------

def autocut(scores: Sequence[float] | np.ndarray, jumps: int) -> int:
    """How many of ``scores`` (a ranked list, best first) come before its ``jumps``-th jump.

    Weaviate's autocut: the scores are rescaled so the first is 0 and the last 1 and compared with
    the straight line from the first to the last (``i / (n-1)``); where the curve rises above that
    line to a local maximum, the list has just made a jump bigger than its average step. The cut
    falls before the ``jumps``-th such maximum (the last item counts as one when it rises above the
    two before it). Works the same on similarities (falling) and distances (rising). A list of 0-1
    items, of equal scores, or with no such maximum (an even slope), is kept whole."""
    if isinstance(jumps, bool) or not isinstance(jumps, (int, np.integer)) or jumps < 1:
        raise InvalidQueryError(f"autocut must be a positive integer (the number of jumps), got {jumps!r}")
    y = np.asarray(scores, dtype=np.float64)
    n = len(y)
    if n <= 1 or y[-1] == y[0] or not np.isfinite(y).all():
        return n
    # rounded so that rounding noise on an even slope makes no maxima (a jump of 1e-9 of the range is none)
    diff = np.round((y - y[0]) / (y[-1] - y[0]) - np.arange(n) / (n - 1), 9)
    found = 0
    for i in range(1, n):
        after = diff[i + 1] if i + 1 < n else diff[i - 2] if i >= 2 else math.inf
        if diff[i] > diff[i - 1] and diff[i] > after:
            found += 1
            if found >= jumps:
                return i
    return n


def relevant_count(scores: np.ndarray, min_score: float | None, jumps: int | None) -> int:
    """How many of one query's ranked ``scores`` (valid entries only) are relevant: those at least
    ``min_score``, then cut by :func:`autocut` with ``jumps``."""
    n = len(scores)
    if min_score is not None:  # ranked best first: the passing ones are a prefix
        below = np.flatnonzero(~(np.asarray(scores) >= min_score))
        n = int(below[0]) if len(below) else n
    if jumps is not None:
        n = autocut(scores[:n], jumps)
    return n


# ---- the request --------------------------------------------------------------------------------

def dedup_threshold(dedup: Any) -> float | None:
    """``dedup`` as a cosine threshold: None/False -> None (off), True -> :data:`DEFAULT_DUPLICATE_THRESHOLD`,
    a number in (0, 1] -> itself; InvalidQueryError otherwise."""
    if dedup is None or dedup is False:
        return None
    if dedup is True:
        return DEFAULT_DUPLICATE_THRESHOLD
    if isinstance(dedup, (int, float, np.number)) and math.isfinite(float(dedup)) and 0 < float(dedup) <= 1:
        return float(dedup)
    raise InvalidQueryError(f"dedup must be true, false or a cosine threshold in (0, 1], got {dedup!r}")


def _column_name(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise InvalidQueryError(f"{what} must be a column name, got {value!r}")
    if len(value) > MAX_NAME:
        raise InvalidQueryError(f"{what} is {len(value)} characters long, the limit is {MAX_NAME}")
    return value.strip()


def parse_order(order_by: str) -> tuple[str, bool]:
    """``"column [ASC|DESC]"`` -> ``(column, descending)``; InvalidQueryError otherwise."""
    text = _column_name(order_by, "order_by")
    match = _ORDER_RE.match(text)
    if match is None:
        raise InvalidQueryError(f"order_by {order_by!r} must be \"column\", \"column ASC\" or \"column DESC\"")
    return match.group(1), (match.group(2) or "asc").lower() == "desc"


@dataclass(frozen=True)
class Shape:
    """A checked shaping request (see the module docstring); :meth:`of` builds one."""

    min_score: float | None = None
    autocut: int | None = None
    group_by: str | None = None
    per_group: int = 1
    order_by: str | None = None
    descending: bool = False
    depth: int | None = None
    facets: tuple[str, ...] = ()
    #: collapse near-duplicates at this cosine (None: keep them)
    dedup: float | None = None

    @classmethod
    def of(cls, min_score: Any = None, autocut: Any = None, group_by: Any = None, per_group: Any = None,
           order_by: Any = None, depth: Any = None, facets: Any = None, dedup: Any = None) -> "Shape | None":
        """The request these arguments make (None: nothing to shape); InvalidQueryError if one is bad."""
        if min_score is not None and (isinstance(min_score, bool) or not isinstance(min_score, (int, float, np.number))
                                      or not math.isfinite(float(min_score))):
            raise InvalidQueryError(f"min_score must be a finite number, got {min_score!r}")
        if autocut is not None:
            autocut_ok = not isinstance(autocut, bool) and isinstance(autocut, (int, np.integer)) and autocut >= 1
            if not autocut_ok:
                raise InvalidQueryError(f"autocut must be a positive integer (the number of jumps), got {autocut!r}")
        if per_group is not None and (isinstance(per_group, bool) or not isinstance(per_group, (int, np.integer))
                                      or per_group < 1):
            raise InvalidQueryError(f"per_group must be a positive integer, got {per_group!r}")
        if per_group is not None and group_by is None:
            raise InvalidQueryError("per_group needs group_by (the column to group by)")
        if depth is not None and (isinstance(depth, bool) or not isinstance(depth, (int, np.integer))
                                  or not 1 <= depth <= MAX_DEPTH):
            raise InvalidQueryError(f"depth must be an integer in 1..{MAX_DEPTH}, got {depth!r}")
        if facets is not None and (isinstance(facets, (str, bytes)) or not isinstance(facets, (list, tuple))):
            raise InvalidQueryError(f"facets must be a list of column names, got {facets!r}")
        column, descending = parse_order(order_by) if order_by is not None else (None, False)
        shape = cls(
            min_score=None if min_score is None else float(min_score),
            autocut=None if autocut is None else int(autocut),
            group_by=None if group_by is None else _column_name(group_by, "group_by"),
            per_group=1 if per_group is None else int(per_group),
            order_by=column, descending=descending, depth=None if depth is None else int(depth),
            facets=tuple(dict.fromkeys(_column_name(f, "a facet") for f in facets or ())),
            dedup=dedup_threshold(dedup))
        return None if shape == cls() else shape

    @property
    def columns(self) -> tuple[str, ...]:
        """Every column the request reads (group, order, facets), each once."""
        return tuple(dict.fromkeys(c for c in (self.group_by, self.order_by, *self.facets) if c is not None))

    @property
    def reshapes(self) -> bool:
        """Whether it groups, orders or counts (else it only cuts the list)."""
        return bool(self.columns)

    def start_depth(self, k: int) -> int:
        """The first candidate list's length (see the module docstring)."""
        if self.depth is not None:
            if self.depth < k:
                raise InvalidQueryError(f"depth={self.depth} is smaller than k={k}: the candidate list "
                                        "must hold at least k hits")
            return self.depth
        return max(k, DEFAULT_DEPTH) if self.reshapes else k

    def wants_more(self, kept: int, k: int) -> bool:
        """Whether a query with ``kept`` hits needs a deeper list (when its relevant set goes on)."""
        if (self.group_by is not None or self.dedup is not None) and self.order_by is None and kept < k:
            return True
        return self.min_score is not None and (self.order_by is not None or bool(self.facets))


class ShapedHits(Hits):
    """The hits of one shaped query: a ``Hits`` list, plus ``facets`` (column -> {value: count},
    most frequent first; empty when none were asked), ``relevant`` (how many candidates passed
    ``min_score``/``autocut``) and ``depth`` (how many candidates were fetched)."""

    def __init__(self, hits: Sequence[Any] = (), facets: dict[str, dict[Any, int]] | None = None,
                 relevant: int | None = None, depth: int | None = None):
        super().__init__(hits)
        self.facets: dict[str, dict[Any, int]] = dict(facets or {})
        self.relevant, self.depth = relevant, depth


# ---- the metadata -------------------------------------------------------------------------------

def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def column_sql(engine: "FilterEngine", name: str, lists: bool = False) -> str:
    """The SQL expression (over table alias ``i``) of a column the user named, checked against the
    engine's table; InvalidQueryError for an unknown or non-scalar column (``lists``: a list of
    strings is accepted too, as facets count its elements)."""
    schema = engine.schema
    known = {n.lower(): n for n in schema.names if n != "embedding"}
    real = known.get(name.lower())
    if real is None:
        raise InvalidQueryError(f"unknown column {name!r}; columns: {', '.join(sorted(known.values()))}")
    kind = schema.field(real).type
    if lists and _is_string_list(kind):
        return "i." + _quote(real)
    if pa.types.is_nested(kind):
        raise InvalidQueryError(f"column {real!r} holds {kind} values: group_by, order_by and facets take a "
                                "column of single values")
    return "i." + _quote(real)


def _is_string_list(kind: pa.DataType) -> bool:
    return (pa.types.is_list(kind) or pa.types.is_large_list(kind)) and (
        pa.types.is_string(kind.value_type) or pa.types.is_large_string(kind.value_type))


def candidate_values(engine: "FilterEngine", ids: np.ndarray, counts: Sequence[int],
                     columns: Sequence[str], lists: Sequence[str] = ()) -> list[pa.Table]:
    """For each query row of ``ids``, a table of its first ``counts[q]`` candidates: ``pos`` (the
    place in its list) and one column per name of ``columns`` (as ``c0, c1, ...``), in ``pos`` order.
    ``lists``: the columns that may be lists of strings (facets)."""
    exprs = [column_sql(engine, c, c in lists) for c in columns]  # checked before anything runs
    q_index = np.concatenate([np.full(n, q, np.int32) for q, n in enumerate(counts)]) if len(counts) else []
    pos = np.concatenate([np.arange(n, dtype=np.int32) for n in counts]) if len(counts) else []
    flat = np.concatenate([ids[q, :n] for q, n in enumerate(counts)]) if len(counts) else []
    candidates = pa.table({"q": pa.array(q_index, pa.int32()), "pos": pa.array(pos, pa.int32()),
                           "id": pa.array(flat, pa.int64())})
    select = ", ".join(f"{e} AS c{j}" for j, e in enumerate(exprs))
    sql = (f"SELECT c.q, c.pos{', ' + select if select else ''} FROM _shape_candidates c "
           "LEFT JOIN images i ON c.id = i.id ORDER BY c.q, c.pos")
    table = engine.select(sql, _shape_candidates=candidates)
    q_column = table.column("q").to_numpy()
    starts = np.searchsorted(q_column, np.arange(len(counts) + 1))
    return [table.slice(int(starts[q]), int(starts[q + 1] - starts[q])).drop_columns(["q"])
            for q in range(len(counts))]


def _order(values: pa.Table, column: str, descending: bool) -> np.ndarray:
    keys = [(column, "descending" if descending else "ascending"), ("pos", "ascending")]
    # pyarrow puts NULLs (and NaNs) at the end by default, in either direction
    return pc.take(values.column("pos"), pc.sort_indices(values, sort_keys=keys)).to_numpy()


def _cap(order: np.ndarray, keys: list[Any], per_group: int, k: int) -> np.ndarray:
    """The first ``k`` of ``order`` keeping at most ``per_group`` per key (``keys`` by position)."""
    seen: dict[Any, int] = {}
    kept = []
    for p in order.tolist():
        key = keys[p]
        if seen.get(key, 0) < per_group:
            seen[key] = seen.get(key, 0) + 1
            kept.append(p)
            if len(kept) == k:
                break
    return np.asarray(kept, np.int64)


def _facet(values: pa.Table, column: str) -> dict[Any, int]:
    if _is_string_list(values.schema.field(column).type):  # a list column (tags): count each element
        flat = pc.list_flatten(values.column(column))
        values = pa.table({"pos": pa.array(np.zeros(len(flat), np.int32)), column: flat})
    counts = values.select(["pos", column]).group_by(column).aggregate([("pos", "count")])
    counts = counts.sort_by([("pos_count", "descending"), (column, "ascending")]).slice(0, FACET_LIMIT)
    return dict(zip(counts.column(column).to_pylist(), counts.column("pos_count").to_pylist()))


# ---- the search ---------------------------------------------------------------------------------

def distinct_positions(vectors: np.ndarray, threshold: float) -> np.ndarray:
    """Positions (ascending) of the best-ranked member of each near-duplicate group among ranked,
    L2-normalised ``vectors`` ``(n, d)``: connected components of cosine ``>= threshold``
    (:func:`vlsearch.ann.duplicates.near_duplicate_labels`)."""
    return first_of_each_group(near_duplicate_labels(vectors, threshold))


def _shape_query(shape: Shape, k: int, ids: np.ndarray, n: int, values: pa.Table | None,
                 vectors: Vectors | None) -> tuple[np.ndarray, dict[str, dict[Any, int]]]:
    """One query's kept positions (at most ``k``, in their final order) among its first ``n``
    (relevant) candidates ``ids``, and its facet counts; ``values``: the candidates' columns."""
    order = np.arange(n)
    if shape.dedup is not None and n:
        if vectors is None:
            raise InvalidQueryError("dedup needs the candidates' stored vectors, which this search does not have")
        order = distinct_positions(vectors(ids[:n]), shape.dedup)
    if values is None:
        return order[:k], {}
    keys = values.column(shape.group_by).to_pylist() if shape.group_by is not None else None  # by position
    if len(order) < n:
        values = values.take(order)
    if shape.order_by is not None:
        order = _order(values, shape.order_by, shape.descending)
    if keys is not None:
        order = _cap(order, keys, shape.per_group, k)
    return order[:k], {c: _facet(values, c) for c in shape.facets}


def shaped_search(fetch: Fetch, build: Build, engine: Callable[[], "FilterEngine"], k: int,
                  shape: Shape, vectors: Vectors | None = None) -> Results:
    """Run ``shape`` over the candidate lists ``fetch(depth)`` gives (deeper as needed), and turn
    each query's kept candidates into hits with ``build``; one :class:`ShapedHits` per query.
    ``vectors``: the candidates' stored vectors, which ``shape.dedup`` compares."""
    depth = shape.start_depth(k)
    columns = shape.columns
    lists = [c for c in shape.facets if c not in (shape.group_by, shape.order_by)]  # facets count list elements
    for column in columns:  # a bad column is the caller's error, reported before any search runs
        column_sql(engine(), column, column in lists)
    done: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray | None, dict[str, dict[Any, int]], int, int]] = {}
    while True:
        scores, ids, first = fetch(depth)
        valid = (ids >= 0).sum(axis=1)
        counts = [relevant_count(scores[q, :valid[q]], shape.min_score, shape.autocut) for q in range(len(ids))]
        tables = candidate_values(engine(), ids, [0 if q in done else n for q, n in enumerate(counts)], columns,
                                  lists) if columns else None
        for q in range(len(ids)):
            if q in done:
                continue
            n = counts[q]
            values = None if tables is None else tables[q].rename_columns(["pos", *columns])
            kept, facets = _shape_query(shape, k, ids[q], n, values, vectors)
            exhausted = valid[q] < depth or n < valid[q] or depth >= MAX_DEPTH
            if exhausted or not shape.wants_more(len(kept), k):
                done[q] = (scores[q, kept], ids[q, kept], None if first is None else first[q, kept], facets, n, depth)
        if len(done) == len(ids):
            break
        depth = min(MAX_DEPTH, depth * GROW)
    return _results(build, done, len(ids), first is not None)


def _results(build: Build, done: dict[int, tuple], queries: int, with_first: bool) -> Results:
    """The kept candidates of every query as :class:`ShapedHits` (padded arrays built into hits at once)."""
    width = max([len(d[1]) for d in done.values()] + [0])
    out_scores = np.zeros((queries, width), np.float32)
    out_ids = np.full((queries, width), -1, np.int64)
    out_first = np.full((queries, width), np.nan, np.float32) if with_first else None
    for q, (s, i, f, _, _, _) in done.items():
        out_scores[q, :len(i)], out_ids[q, :len(i)] = s, i
        if out_first is not None and f is not None:
            out_first[q, :len(i)] = f
    built = build(out_scores, out_ids, out_first)
    return Results(ShapedHits(hits, facets=done[q][3], relevant=done[q][4], depth=done[q][5])
                   for q, hits in enumerate(built))


def format_facets(facets: dict[str, dict[Any, int]], limit: int = 10) -> str:
    """Plain-text facet counts: one line per column, its ``limit`` most frequent values."""
    lines = []
    for column, counts in facets.items():
        shown = [f"{'NULL' if value is None else value} ({count})" for value, count in list(counts.items())[:limit]]
        more = f", ... {len(counts) - limit} more" if len(counts) > limit else ""
        lines.append(f"{column}: {', '.join(shown) or '-'}{more}")
    return "\n".join(lines)
