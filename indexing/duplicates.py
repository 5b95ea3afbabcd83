"""Groups of duplicate images in a collection: ``vlsearch duplicates`` and its Python API.

::

    report = find_duplicates("my-collection")             # threshold: DEFAULT_DUPLICATE_THRESHOLD
    for group in report.groups:
        print(group.keeper, group.paths, group.scores)
    write_duplicate_columns("my-collection", report.groups)  # then search(..., where="dup_keeper")

Two items are duplicates when their files have the same content hash (exact copies) or their
stored embeddings have a cosine ``>= threshold`` (near copies: resized, re-encoded, cropped,
edited); a group is a connected component of that relation
(:func:`vlsearch.ann.duplicates.component_labels`).

Near copies are found with the collection's FAISS index, never by comparing all pairs: every
stored vector is a query, of a range search (radius ``threshold - margin``) where the index scores
precisely (Flat, IVF-Flat, SQ8 codes), else of a k-NN search whose neighbours pass the radius
(PQ and fast-scan codes, whose scores are too rough for a radius); each candidate pair is
verified exactly on the stored vectors. A collection with no index of at most
:data:`EXACT_MAX_ROWS` rows (the size below which ``build-index`` would choose exact search too) is
searched through a temporary exact ``IndexFlat`` (blocked matrix products, bounded memory); a
larger one needs ``vlsearch build-index`` first.

The keeper suggested for each group is its largest image (width x height), then the oldest
(``taken_at`` where the collection has that column and the row a value, else ``file_mtime_ns``),
then the smallest id. Nothing is written to the user's files; :func:`write_duplicate_columns`
writes ``dup_group`` / ``dup_keeper`` columns as a new collection version.
"""

from __future__ import annotations

import csv
import io
import json
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from vlsearch.ann.duplicates import DEFAULT_DUPLICATE_THRESHOLD, component_labels
from vlsearch.ann.faiss_index import is_l2, search_parameters
from vlsearch.ann.live import live_selector
from vlsearch.ann.plan import AutoPolicy
from vlsearch.core.errors import CollectionError, IndexNotBuiltError, InvalidQueryError
from vlsearch.core.progress import Progress, no_progress
from vlsearch.store.collection import Collection

#: Without an index, collections up to this many rows are searched exactly (the ``auto`` index
#: plan's own exact-search limit); above it the index is required.
EXACT_MAX_ROWS = AutoPolicy().flat_max_n
#: Refine candidates per neighbour asked: the ``auto`` plan's own (see :class:`DuplicateOptions`).
DUPLICATE_K_FACTOR = AutoPolicy().refine_k_factor
#: Columns read for grouping and the keeper rule (those a collection lacks are skipped).
ROW_COLUMNS = ("id", "path", "width", "height", "file_mtime_ns", "content_hash", "taken_at")
#: Neighbours asked per row where the index has no precise range search; doubled for rows whose
#: neighbours all pass.
KNN_START, KNN_MAX = 16, 1024


@dataclass(frozen=True)
class DuplicateOptions:
    """How duplicates are found.

    ``threshold``: cosine at or above which two items are near copies. ``exact_only``: content
    hashes only (no embedding search). ``margin``: a range search reaches down to
    ``threshold - margin`` before exact verification, and is used only where the index scores
    stored rows against themselves within ``margin / 3`` of 1.
    ``nprobe``: IVF lists probed (None: the index's tuned default). ``k_factor``: candidates
    re-scored by a Refine layer per neighbour asked (None: the index's default, which tuning may
    set to hundreds for ordinary queries; near copies rank at the top of the shortlist, so the
    ``auto`` plan's own 10 is enough). ``batch_size``: query rows per search call (bounds the
    memory of the candidate lists).
    """

    threshold: float = DEFAULT_DUPLICATE_THRESHOLD
    exact_only: bool = False
    margin: float = 0.03
    nprobe: int | None = None
    k_factor: float | None = DUPLICATE_K_FACTOR
    batch_size: int = 4096

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold <= 1.0:
            raise InvalidQueryError(f"duplicate threshold must be in (0, 1], got {self.threshold}")
        if self.margin < 0 or self.batch_size <= 0:
            raise InvalidQueryError("margin must be >= 0 and batch_size positive")


@dataclass(frozen=True)
class DuplicateGroup:
    """One group: its items keeper first, then by cosine to the keeper; ``scores[i]`` is item
    ``i``'s cosine to the keeper (1.0 for the keeper)."""

    ids: tuple[int, ...]
    paths: tuple[str, ...]
    keeper: str
    scores: tuple[float, ...]

    def to_json(self) -> str:
        """The group as one JSON line: ``{"ids", "paths", "keeper", "scores"}``."""
        return json.dumps(asdict(self), ensure_ascii=False)


@dataclass(frozen=True)
class DuplicateReport:
    """The groups found (items in no group are not listed) and how they were found.

    ``method``: ``"index range search"``, ``"index k-NN"``, ``"exact search (no index)"`` or
    ``"content hash"``; ``pairs_scored``: candidate pairs verified exactly on the stored vectors
    (far below the ``items * (items - 1) / 2`` of all pairs)."""

    groups: list[DuplicateGroup]
    items: int
    threshold: float
    method: str
    pairs_scored: int
    seconds: float

    @property
    def duplicates(self) -> int:
        """Items that are not their group's keeper: what removing the copies would remove."""
        return sum(len(g.ids) - 1 for g in self.groups)

    def summary(self) -> str:
        return (f"{len(self.groups)} duplicate groups, {self.duplicates} copies among {self.items} items "
                f"(threshold {self.threshold:g}, {self.method}, {self.pairs_scored} pairs scored, "
                f"{self.seconds:.1f} s)")


@dataclass
class _Rows:
    """The live rows of one collection version, in shard order: ids, fp16 vectors and what the
    keeper rule and content-hash grouping read."""

    ids: np.ndarray
    vectors: np.ndarray
    paths: list[str]
    area: np.ndarray
    age: np.ndarray
    hashes: pa.Array
    by_id: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.by_id = np.argsort(self.ids, kind="stable")

    def positions(self, ids: np.ndarray) -> np.ndarray:
        """Row position of each id (-1 for ids not among the live rows, e.g. dead index entries)."""
        return _positions(self.ids, self.by_id, ids)

    def cosines(self, left: np.ndarray, right: np.ndarray, chunk: int = 65_536) -> np.ndarray:
        """Exact cosine of each pair of rows, from the stored vectors."""
        out = np.empty(len(left), np.float32)
        for s in range(0, len(left), chunk):
            a = self.vectors[left[s:s + chunk]].astype(np.float32)
            b = self.vectors[right[s:s + chunk]].astype(np.float32)
            out[s:s + chunk] = np.einsum("ij,ij->i", a, b)
        return out


def _positions(ids: np.ndarray, sorter: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """Position in ``ids`` (sorted by ``sorter``) of each ``wanted`` id, -1 where absent."""
    if len(ids) == 0:
        return np.full(len(wanted), -1, np.int64)
    pos = sorter[np.minimum(np.searchsorted(ids, wanted, sorter=sorter), len(ids) - 1)]
    return np.where(ids[pos] == wanted, pos, -1)


def _open(collection: Collection | str | os.PathLike) -> Collection:
    return collection if isinstance(collection, Collection) else Collection.open(collection)


def _read_rows(coll: Collection, progress: Progress) -> _Rows:
    """All live rows' ids, vectors (fp16: half the memory) and keeper/hash columns."""
    total = coll.count()
    ids, vectors, done = [], [], 0
    for batch_ids, batch in coll.iter_embeddings():
        ids.append(batch_ids)
        vectors.append(batch.astype(np.float16))
        done += len(batch_ids)
        progress(done, total, stage="read")
    ids = np.concatenate(ids) if ids else np.zeros(0, np.int64)
    vectors = np.concatenate(vectors) if vectors else np.zeros((0, coll.dim), np.float16)
    table = _row_table(coll)
    if not np.array_equal(table.column("id").to_numpy(), ids):
        raise CollectionError(f"{coll.path}: metadata and embedding rows disagree; the collection changed "
                              "while it was read: run again")
    width, height = (_int_column(table, c, 0) for c in ("width", "height"))
    return _Rows(ids, vectors, table.column("path").to_pylist(), width * height, _ages(table),
                 table.column("content_hash").combine_chunks() if "content_hash" in table.column_names
                 else pa.nulls(len(ids), pa.string()))


def _row_table(coll: Collection) -> pa.Table:
    """The :data:`ROW_COLUMNS` each shard has (missing ones null), live rows in shard order."""
    parts = []
    for path in coll.shard_paths():
        names = pq.read_schema(path).names
        parts.append(coll.read_shard(path, columns=[c for c in ROW_COLUMNS if c in names]))
    if not parts:
        return pa.table({"id": pa.array([], pa.int64()), "path": pa.array([], pa.string())})
    return pa.concat_tables(parts, promote_options="permissive")


def _int_column(table: pa.Table, name: str, fill: int) -> np.ndarray:
    if name not in table.column_names:
        return np.full(table.num_rows, fill, np.int64)
    return pc.fill_null(table.column(name).cast(pa.int64()), fill).to_numpy()


def _ages(table: pa.Table) -> np.ndarray:
    """Each row's age key (ns since the epoch, smaller is older): ``taken_at`` where present,
    else the file's mtime; rows with neither sort last."""
    age = pc.cast(table.column("file_mtime_ns"), pa.int64()) if "file_mtime_ns" in table.column_names \
        else pa.nulls(table.num_rows, pa.int64())
    if "taken_at" in table.column_names:
        taken = table.column("taken_at")
        if pa.types.is_string(taken.type) or pa.types.is_large_string(taken.type):
            taken = pc.cast(taken, pa.timestamp("ns", "UTC"))
        unit = taken.type.tz if pa.types.is_timestamp(taken.type) else None
        taken = pc.cast(pc.cast(taken, pa.timestamp("ns", unit)), pa.int64())
        age = pc.coalesce(taken, age)
    return pc.fill_null(age, np.iinfo(np.int64).max).to_numpy()


def hash_pairs(hashes: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Row pairs with the same (non-null) content hash: each row linked to the next of its hash."""
    valid = np.flatnonzero(pc.is_valid(hashes).to_numpy(zero_copy_only=False))
    if len(valid) < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    values = np.asarray(hashes.take(pa.array(valid)).to_pylist(), dtype=object)
    order = np.argsort(values, kind="stable")
    rows, sorted_values = valid[order], values[order]
    same = sorted_values[1:] == sorted_values[:-1]
    return rows[:-1][same], rows[1:][same]


# ---- near copies: candidates from the index, verified exactly ----------------------------------

def _cosines_of(scores: np.ndarray, l2: bool) -> np.ndarray:
    """Index scores as cosines (an L2 index of unit vectors scores ``|a - b|^2 = 2 - 2 cos``)."""
    return 1.0 - scores / 2.0 if l2 else scores


class _PairSearch:
    """Near-copy pairs among the rows through one index, every row a query. A range search
    (radius ``threshold - margin``) where the index scores precisely; else k-NN, since compressed
    codes score too roughly for a radius (faiss 1.15: a 4-bit fast-scan PQ scores a unit vector
    against itself at 0.5-0.7, so its range search finds nothing) while their ranking still holds.
    Every candidate is verified exactly on the stored vectors."""

    def __init__(self, rows: _Rows, index: Any, options: DuplicateOptions, sel: Any):
        self.rows, self.index, self.options = rows, index, options
        self.params = search_parameters(index, options.nprobe, options.k_factor, sel)
        self.l2 = is_l2(index)
        self.scored = 0
        self.ranged = self._range_is_precise()

    @property
    def method(self) -> str:
        return "index range search" if self.ranged else "index k-NN"

    def _range(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """``(query row, neighbour id, cosine)`` above the radius, or None without range search."""
        radius = self.options.threshold - self.options.margin
        try:
            lims, scores, ids = self.index.range_search(queries, 2.0 - 2.0 * radius if self.l2 else radius,
                                                        params=self.params)
        except RuntimeError:
            return None
        return np.repeat(np.arange(len(queries)), np.diff(lims).astype(np.int64)), ids, _cosines_of(scores, self.l2)

    def _range_is_precise(self) -> bool:
        """Whether a range search finds the first rows themselves, scored within ``margin / 3`` of 1."""
        probe = self.rows.vectors[:64].astype(np.float32)
        found = self._range(probe)
        if found is None:
            return False
        query, ids, cos = found
        itself = (self.rows.positions(ids) == query) & (np.abs(cos - 1.0) <= self.options.margin / 3)
        return len(np.unique(query[itself])) == len(probe)

    def _knn(self, start: int, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Verified pairs among each query's k nearest; rows whose k neighbours all pass are
        searched again with twice k (up to :data:`KNN_MAX`)."""
        todo, k, left, right = np.arange(len(queries)), KNN_START, [], []
        while len(todo):
            kk = min(k, self.index.ntotal)
            found = self.index.search(queries[todo], kk, params=self.params)[1]
            a = np.repeat(start + todo, kk).reshape(len(todo), kk)
            b = self.rows.positions(found.ravel()).reshape(found.shape)
            valid = (b >= 0) & (b != a)  # not itself, not a dead index entry
            cos = np.full(b.shape, -1.0, np.float32)
            cos[valid] = self.rows.cosines(a[valid], b[valid])
            self.scored += int(valid.sum())
            hit = cos >= self.options.threshold
            again = (hit.sum(axis=1) >= kk - 1) & (kk < min(KNN_MAX, self.index.ntotal))
            keep = hit & ~again[:, None]
            left.append(a[keep])
            right.append(b[keep])
            todo, k = todo[again], 2 * k
        return np.concatenate(left), np.concatenate(right)

    def pairs(self, progress: Progress) -> tuple[np.ndarray, np.ndarray]:
        """Row pairs ``(a, b)``, ``a < b``, each once, with an exact cosine ``>= threshold``."""
        n, batch = len(self.rows.ids), self.options.batch_size
        keys = [np.zeros(0, np.int64)]
        for start in range(0, n, batch):
            queries = self.rows.vectors[start:start + batch].astype(np.float32)
            if self.ranged:
                query, ids, _ = self._range(queries)
                a, b = start + query, self.rows.positions(ids)
                ok = (b >= 0) & (b != a)
                a, b = a[ok], b[ok]
            else:
                a, b = self._knn(start, queries)
            keys.append(np.unique(np.minimum(a, b) * n + np.maximum(a, b)))
            progress(min(start + batch, n), n, stage="search")
        keys = np.unique(np.concatenate(keys))
        left, right = keys // n, keys % n
        if not self.ranged:
            return left, right
        self.scored += len(keys)
        keep = self.rows.cosines(left, right) >= self.options.threshold
        return left[keep], right[keep]


def _search_index(coll: Collection, rows: _Rows) -> tuple[Any, Any, str | None]:
    """``(index, selector of live entries, method)``: the collection's index, or a temporary exact
    one over the stored vectors when it has none and at most :data:`EXACT_MAX_ROWS` rows."""
    if coll.has_index():
        index = coll.load_index()
        return index, live_selector(index, coll.manifest.index), None
    if len(rows.ids) > EXACT_MAX_ROWS:
        raise IndexNotBuiltError(
            f"collection {coll.path} has {len(rows.ids):,} items and no index: near duplicates are searched "
            f"exactly up to {EXACT_MAX_ROWS:,} items only; run `vlsearch build-index {coll.path}` first "
            "(or --exact-only for copies by content hash)")
    import faiss

    flat = faiss.IndexIDMap(faiss.IndexFlat(coll.dim, faiss.METRIC_INNER_PRODUCT))
    flat.add_with_ids(rows.vectors.astype(np.float32), rows.ids)
    return flat, None, "exact search (no index)"


# ---- groups -----------------------------------------------------------------------------------

def _group(rows: _Rows, members: np.ndarray) -> DuplicateGroup:
    """A group from its rows: the keeper (largest, then oldest, then smallest id) first, then the
    others by cosine to it."""
    keeper = members[np.lexsort((rows.ids[members], rows.age[members], -rows.area[members]))[0]]
    scores = rows.vectors[members].astype(np.float32) @ rows.vectors[keeper].astype(np.float32)
    scores = np.where(members == keeper, 1.0, np.minimum(scores, 1.0))
    order = np.lexsort((rows.ids[members], -scores, members != keeper))
    members, scores = members[order], scores[order]
    return DuplicateGroup(ids=tuple(int(i) for i in rows.ids[members]),
                          paths=tuple(rows.paths[m] for m in members), keeper=rows.paths[keeper],
                          scores=tuple(round(float(s), 4) for s in scores))


def _groups(rows: _Rows, left: np.ndarray, right: np.ndarray) -> Iterator[DuplicateGroup]:
    """The connected components of the pairs with two items or more, in order of first item."""
    if len(rows.ids) == 0:
        return
    labels = component_labels(len(rows.ids), left, right)
    counts = np.bincount(labels, minlength=1)
    order = np.argsort(labels, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts)])
    for g in np.flatnonzero(counts >= 2):
        yield _group(rows, order[starts[g]:starts[g + 1]])


class DuplicateFinder:
    """One run over one collection version: reads its rows, links exact and near copies, yields
    the groups. ``method``, ``items`` and ``pairs_scored`` describe the run once it has started."""

    def __init__(self, collection: Collection | str | os.PathLike, options: DuplicateOptions = DuplicateOptions(),
                 progress: Progress | None = None):
        self.coll = _open(collection)
        self.options = options
        self.progress = progress or no_progress
        self.method, self.items, self.pairs_scored = "content hash", 0, 0

    def groups(self) -> Iterator[DuplicateGroup]:
        """The groups, one at a time (the search over all items runs before the first)."""
        rows = _read_rows(self.coll, self.progress)
        self.items = len(rows.ids)
        left, right = hash_pairs(rows.hashes)
        if not self.options.exact_only and self.items > 1:
            near_left, near_right = self._near_pairs(rows)
            left, right = np.concatenate([left, near_left]), np.concatenate([right, near_right])
        yield from _groups(rows, left, right)

    def _near_pairs(self, rows: _Rows) -> tuple[np.ndarray, np.ndarray]:
        """Pairs with an exact cosine ``>= threshold``, among the index's candidates."""
        index, sel, method = _search_index(self.coll, rows)
        search = _PairSearch(rows, index, self.options, sel)
        pairs = search.pairs(self.progress)
        self.method, self.pairs_scored = method or search.method, search.scored
        return pairs


def iter_duplicates(collection: Collection | str | os.PathLike, options: DuplicateOptions = DuplicateOptions(),
                    progress: Progress | None = None) -> Iterator[DuplicateGroup]:
    """The duplicate groups of a collection one at a time (for collections with many groups)."""
    return DuplicateFinder(collection, options, progress).groups()


def find_duplicates(collection: Collection | str | os.PathLike, threshold: float = DEFAULT_DUPLICATE_THRESHOLD,
                    *, exact_only: bool = False, nprobe: int | None = None,
                    k_factor: float | None = DUPLICATE_K_FACTOR,
                    progress: Progress | None = None) -> DuplicateReport:
    """Every duplicate group of a collection (see the module docstring). ``progress(done, total,
    stage=...)`` reports the stages ``read`` and ``search``. Writes nothing."""
    start = time.perf_counter()
    options = DuplicateOptions(threshold, exact_only, nprobe=nprobe, k_factor=k_factor)
    finder = DuplicateFinder(collection, options, progress)
    groups = list(finder.groups())
    return DuplicateReport(groups, finder.items, threshold, finder.method, finder.pairs_scored,
                           time.perf_counter() - start)


def write_duplicate_columns(collection: Collection | str | os.PathLike, groups: list[DuplicateGroup]) -> dict[str, int]:
    """Write ``dup_group`` (the group's number, null for items in no group) and ``dup_keeper``
    (true for keepers and for items in no group) as one new version, so ``where="dup_keeper"``
    hides the copies. Rows added after the groups were found get nulls (hidden by that filter):
    find and write again after a sync. Returns :func:`vlsearch.store.columns.set_columns`'s report."""
    coll = _open(collection)
    ids = coll.read_table(columns=["id"]).column("id").to_numpy()
    number = np.full(len(ids), -1, np.int64)
    keeper = np.ones(len(ids), bool)
    sorter = np.argsort(ids, kind="stable")
    for g, group in enumerate(groups):
        at = _positions(ids, sorter, np.asarray(group.ids, np.int64))  # -1: removed since it was found
        number[at[at >= 0]], keeper[at[at >= 0]] = g, False
        if at[0] >= 0:
            keeper[at[0]] = True
    return coll.set_columns(pa.table({"id": pa.array(ids, pa.int64()),
                                      "dup_group": pa.array(number, pa.int64(), mask=number < 0),
                                      "dup_keeper": pa.array(keeper)}), keep=False)


# ---- output -----------------------------------------------------------------------------------

def format_groups(groups: list[DuplicateGroup]) -> str:
    """A plain-text table: one line per item, groups separated, the keeper marked ``*``."""
    if not groups:
        return "no duplicates"
    lines = [("group", "", "cosine", "path")]
    for g, group in enumerate(groups):
        lines += [(str(g), "*" if i == 0 else "", f"{s:.4f}", p) for i, (p, s) in enumerate(zip(group.paths, group.scores))]
    width = max(len(line[0]) for line in lines)
    return "\n".join(f"{a:>{width}} {b:1} {c:>6}  {d}" for a, b, c, d in lines)


def groups_to_json_lines(groups: list[DuplicateGroup]) -> str:
    """One JSON object per group: ``{"ids": [...], "paths": [...], "keeper": "<path>", "scores": [...]}``."""
    return "\n".join(g.to_json() for g in groups)


def groups_to_csv(groups: list[DuplicateGroup]) -> str:
    """CSV, one row per item: ``group,id,path,keeper,score``."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["group", "id", "path", "keeper", "score"])
    for g, group in enumerate(groups):
        for i, (item, path, score) in enumerate(zip(group.ids, group.paths, group.scores)):
            writer.writerow([g, item, path, "true" if i == 0 else "false", score])
    return out.getvalue().rstrip("\n")


__all__ = ["DEFAULT_DUPLICATE_THRESHOLD", "EXACT_MAX_ROWS", "DuplicateFinder", "DuplicateGroup",
           "DuplicateOptions", "DuplicateReport", "find_duplicates", "format_groups", "groups_to_csv",
           "groups_to_json_lines", "hash_pairs", "iter_duplicates", "write_duplicate_columns"]
