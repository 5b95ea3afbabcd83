"""Stored vectors of given ids: the one gather that filtered exact search, ``dedup`` and item terms use.

From the version's vector rows file (:class:`vlsearch.ann.refine.VectorRows`, one fp16 row read
per id, memory-mapped) when its index has one, or from an uncompressed index's own vectors
(:class:`vlsearch.ann.refine.IndexRows`: an adopted autofaiss ``HNSW32``); else from the shards, reading only the row-group
pages that hold the wanted rows: each row group is read in small batches (embedding column
only, one thread) that stop after its last wanted row, instead of decoding all its 4096 rows.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Iterator, Protocol, Sequence

import numpy as np
import pyarrow.parquet as pq

from vlsearch.ann.refine import IndexRows, VectorRows
from vlsearch.core.cache import ByteLRU
from vlsearch.core.errors import CollectionError
from vlsearch.store.arrays import embeddings_to_numpy
from vlsearch.store.rows import row_group_starts

log = logging.getLogger(__name__)

#: rows per decoded batch when reading a row group up to its last wanted row
PAGE_BATCH_ROWS = 256
#: Vectors read from the shards for point lookups (:meth:`StoredVectors.get`), fp16, by
#: ``(shard file, size, mtime, row)``: a shard file never changes, so an entry stays right in every
#: version that keeps the file, and repeated queries (a page re-asking, popular queries) do not
#: decode a row group again for one row.
_SHARD_ROWS = ByteLRU(64 << 20)
#: ids read from the rows file per streamed batch (64 MiB of float32 at 256 dimensions)
STREAM_BATCH = 65536


class Locator(Protocol):
    """Maps ids to ``(shard, row in shard, found)``; ``paths`` are the image shard files."""

    paths: Sequence[Any]

    def locate(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]: ...


def open_rows(folder: Path, entry: dict[str, Any] | None) -> VectorRows | None:
    """The vector rows file an index entry names, or None (none named, or its files are gone:
    the shards are read instead)."""
    try:
        return VectorRows.from_entry(folder, entry or {})
    except CollectionError as e:
        log.warning("%s; reading vectors from the shards", e)
        return None


class StoredVectors:
    """The stored vectors (float32) of live ids of one collection version (thread-safe)."""

    def __init__(self, locator: Locator, dim: int, rows: VectorRows | IndexRows | None = None):
        self.locator, self.dim, self.rows = locator, dim, rows

    def get(self, ids: np.ndarray) -> np.ndarray:
        """``(len(ids), dim)`` in the order given (repeats allowed); ids no live row has read as
        zeros. For a few ids (candidates, items): rows read from the shards are kept by row."""
        unique, inverse = np.unique(np.asarray(ids, np.int64), return_inverse=True)
        got = np.zeros((len(unique), self.dim), np.float32)
        rest = np.ones(len(unique), bool)
        if self.rows is not None:
            rows, valid = self.rows.rows(unique)
            got[valid], rest = self.rows.read(rows[valid]), ~valid
        if rest.any():
            got[rest] = self._cached_shard_rows(unique[rest])
        return got[inverse.reshape(-1)]

    def collect(self, ids: np.ndarray) -> np.ndarray:
        """``(len(ids), dim)`` of sorted unique ``ids`` (a subset), streamed, nothing kept; zeros for
        ids no live row has."""
        out = np.zeros((len(ids), self.dim), np.float32)
        for batch_ids, vectors in self.batches(ids):
            out[np.searchsorted(ids, batch_ids)] = vectors
        return out

    def _cached_shard_rows(self, ids: np.ndarray) -> np.ndarray:
        """Vectors of unique ``ids`` from the shards, through :data:`_SHARD_ROWS`."""
        shard, row, found = self.locator.locate(ids)
        files = {s: (str(self.locator.paths[s]), *_stamp(self.locator.paths[s])) for s in set(shard[found].tolist())}
        keys = [(*files[s], r) if f else None for s, r, f in zip(shard.tolist(), row.tolist(), found.tolist())]
        out = np.zeros((len(ids), self.dim), np.float32)
        missing = []
        for i, key in enumerate(keys):
            cached = None if key is None else _SHARD_ROWS.get(key)
            if cached is None:
                missing.append(i)
            else:
                out[i] = cached
        for batch_ids, vectors in shard_vectors(self.locator, ids[missing]) if missing else ():
            at = np.searchsorted(ids, batch_ids)
            out[at] = vectors
            for i, vector in zip(at.tolist(), vectors):
                _SHARD_ROWS.put(keys[i], vector.astype(np.float16))
        return out

    def batches(self, ids: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``(ids, vectors)`` batches covering the live ones of ``ids``; unknown ids are skipped."""
        ids = np.asarray(ids, np.int64)
        rest = ids
        if self.rows is not None:
            rows, valid = self.rows.rows(ids)
            hits = np.flatnonzero(valid)
            for lo in range(0, len(hits), STREAM_BATCH):
                pick = hits[lo:lo + STREAM_BATCH]
                yield ids[pick], self.rows.read(rows[pick])
            rest = ids[~valid]  # added after the rows file was written (an index built without it)
        if len(rest):
            yield from shard_vectors(self.locator, rest)

    def cheap(self, ids: np.ndarray, max_row_groups: int) -> bool:
        """Whether gathering ``ids`` is cheap: all are in the rows file, or they lie in at most
        ``max_row_groups`` shard row groups."""
        if self.rows is not None:
            rest = ids[~self.rows.rows(np.asarray(ids, np.int64))[1]]
            return not len(rest) or row_groups(self.locator, rest) <= max_row_groups
        return row_groups(self.locator, ids) <= max_row_groups


def _stamp(path: Any) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def _by_row_group(locator: Locator, ids: np.ndarray) -> Iterator[tuple[int, int, np.ndarray, np.ndarray]]:
    """``(shard, row group, ids, rows within the group)`` of the live ``ids``, rows ascending."""
    shard, row, found = locator.locate(np.asarray(ids, np.int64))
    ids, shard, row = np.asarray(ids, np.int64)[found], shard[found], row[found]
    order = np.lexsort((row, shard))
    ids, shard, row = ids[order], shard[order], row[order]
    for s in np.unique(shard):
        pick = shard == s
        starts = row_group_starts(locator.paths[int(s)])
        groups = np.searchsorted(starts, row[pick], side="right") - 1
        for g in np.unique(groups):
            sel = groups == g
            yield int(s), int(g), ids[pick][sel], row[pick][sel] - starts[g]


def row_groups(locator: Locator, ids: np.ndarray) -> int:
    """How many Parquet row groups hold the live ``ids`` (what a shard gather reads)."""
    return sum(1 for _ in _by_row_group(locator, ids))


def shard_vectors(locator: Locator, ids: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(ids, vectors float32)`` of the live ``ids`` from the shards, one row group at a time,
    decoding each only up to its last wanted row (in :data:`PAGE_BATCH_ROWS`-row batches)."""
    files: dict[int, pq.ParquetFile] = {}
    for s, g, group_ids, rows in _by_row_group(locator, ids):
        pf = files.get(s) or files.setdefault(s, pq.ParquetFile(locator.paths[s]))
        parts, start = [], 0
        for batch in pf.iter_batches(batch_size=PAGE_BATCH_ROWS, row_groups=[g], columns=["embedding"],
                                     use_threads=False):
            end = start + batch.num_rows
            inside = rows[(rows >= start) & (rows < end)]
            if len(inside):
                parts.append(embeddings_to_numpy(batch.column(0).take(inside - start)))
            start = end
            if start > rows[-1]:
                break
        yield group_ids, np.concatenate(parts)
