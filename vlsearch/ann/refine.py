"""The vector rows file (every stored vector by id, row-addressable) and the on-disk refine that
re-scores an ANN shortlist exactly from it.

Every index build writes ``vectors-<token>.f16.npy`` (entry fields ``rows_file`` /
``rows_ids_file``, :class:`VectorRows`): filtered exact search, ``dedup`` and item terms read
single rows from it instead of decoding whole Parquet row groups. A ``Refine(disk)`` index also
re-scores from it (``refine_file`` / ``refine_ids_file`` name the same files).

The in-RAM index is a compact fast-scan shortlist (e.g. ``IVF2048,PQ128x4fs``: ~78 bytes per
vector with ids and centroids); the final ranking is an exact inner product (or L2) against the
collection's own fp16 embeddings, read from ``vectors-<token>.f16.npy`` beside the shards:

* a plain ``.npy`` array ``(N, dim) float16``, row ``r`` = the ``r``-th smallest image id;
* ``vectors-<token>.ids.npy`` (int64, sorted) is the id -> row map (``searchsorted``); it is
  absent when the ids are exactly ``0..N-1`` (row = id);
* both are memory-mapped read-only with ``MADV_RANDOM`` (a query touches ``k * k_factor``
  scattered rows; the kernel's default read-around would fetch megabytes per row on a cold
  cache); the page cache keeps hot rows, the process's own memory holds none of them
  (:meth:`DiskRefine.warm` maps them all up front where RAM allows).

The stored embeddings *are* fp16, so the re-score is exact with respect to the collection: the
result equals a full-precision re-score of the same shortlist. The gather and the dot products run
in torch, one query at a time (multi-threaded ``index_select``; ~10x numpy fancy indexing).

Why not FAISS's ``IndexRefine`` over an ``IO_FLAG_MMAP_IFC``-mapped ``SQfp16`` refine index
(checked, faiss 1.15): it works, but the mapping cannot be given ``MADV_RANDOM`` from Python
(a cold query then reads ~8 MB per candidate with this machine's 8 MB read-ahead) and
``IndexRefine`` needs ids ``0..N-1`` (an ``IDMap`` in RAM otherwise); ``search_subset``, which
would score given rows, is not implemented for ``IndexScalarQuantizer``.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from vlsearch.core.errors import CollectionError
from vlsearch.core.fsutil import atomic_path

VECTORS_SUFFIX, IDS_SUFFIX = ".f16.npy", ".ids.npy"
#: :meth:`VectorRows.read` reads a whole span when the wanted rows are at least 1 in this many of it
#: (a cold page cache: one random read costs about as much as ~30 rows read in sequence) ...
DENSE_SPAN = 16
#: ... in chunks of this many rows (one reused buffer: a span can be a whole 1 GB file)
SPAN_CHUNK = 65536
#: Shortlist factor when neither the call nor the manifest gives one.
DEFAULT_K_FACTOR = 10.0


def new_vectors_stem() -> str:
    """A fresh file stem per build, so a rebuild never overwrites the files a live index reads."""
    return f"vectors-{uuid.uuid4().hex[:12]}"


@dataclass(frozen=True)
class RowsPart:
    """Writes batches of vectors into their rows of a pre-sized rows file, by id; picklable, so
    the part tasks of a distributed build write their own rows (``pwrite`` to disjoint rows: no
    locking). ``sorted_ids``: every id ascending, or None when the ids are ``0..N-1`` (row = id)."""

    path: str
    start: int
    dim: int
    sorted_ids: np.ndarray | None

    def write(self, fd: int, ids: np.ndarray, vecs: np.ndarray) -> None:
        """pwrite each run of consecutive rows (plain writes: no mapped pages in this process's RSS)."""
        rows = ids if self.sorted_ids is None else np.searchsorted(self.sorted_ids, ids)
        half = np.ascontiguousarray(vecs, dtype=np.float16)
        breaks = np.flatnonzero(np.diff(rows) != 1) + 1
        for lo, hi in zip(np.r_[0, breaks], np.r_[breaks, len(rows)]):
            os.pwrite(fd, half[lo:hi].tobytes(), self.start + int(rows[lo]) * self.dim * 2)


@dataclass
class RowsWriter:
    """What :func:`vectors_writer` yields: call it with ``(ids, vectors)`` to write rows here;
    ``part`` writes them from another process (same file system); ``fields`` names the files."""

    part: RowsPart
    fields: dict[str, Any]
    fd: int

    def __call__(self, ids: np.ndarray, vecs: np.ndarray) -> None:
        self.part.write(self.fd, ids, vecs)


@contextlib.contextmanager
def vectors_writer(folder: Path, stem: str, sorted_ids: np.ndarray, dim: int) -> Iterator[RowsWriter]:
    """Write the fp16 rows file (+ id map unless ids are 0..N-1) from ``add(ids, vectors)`` calls.

    ``sorted_ids``: every id of the collection, ascending. Each batch is scattered to its rows,
    so any shard order works, from any process (:class:`RowsPart`). On a clean exit the files are
    fsynced and renamed into place and ``fields`` (``rows_file``, ``rows_ids_file``) names them.
    """
    n = len(sorted_ids)
    identity = bool(n == 0 or (sorted_ids[0] == 0 and sorted_ids[-1] == n - 1))  # sorted + unique
    fields = {"rows_file": f"{stem}{VECTORS_SUFFIX}", "rows_ids_file": None if identity else f"{stem}{IDS_SUFFIX}"}
    with atomic_path(folder / fields["rows_file"]) as tmp, open(tmp, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<f2", "fortran_order": False, "shape": (n, dim)})
        start = f.tell()
        f.truncate(start + n * dim * 2)
        f.flush()
        part = RowsPart(str(tmp), start, dim, None if identity else np.ascontiguousarray(sorted_ids, dtype=np.int64))
        yield RowsWriter(part, fields, f.fileno())
    if not identity:
        with atomic_path(folder / fields["rows_ids_file"]) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, np.ascontiguousarray(sorted_ids, dtype=np.int64))


def refine_fields(rows: dict[str, Any]) -> dict[str, Any]:
    """The entry fields that make a ``Refine(disk)`` index re-score from the rows file ``rows`` names."""
    return {"refine_file": rows["rows_file"], "refine_ids_file": rows["rows_ids_file"]}


def rows_fields(entry: dict[str, Any]) -> tuple[str | None, str | None]:
    """``(rows file, id map file)`` an index entry names (older ``Refine(disk)`` entries: the refine's)."""
    if entry.get("rows_file"):
        return entry["rows_file"], entry.get("rows_ids_file")
    return entry.get("refine_file"), entry.get("refine_ids_file")


def remove_stale(folder: Path, keep: Iterable[str | None]) -> None:
    """Delete ``vectors-*`` files of earlier builds (after the manifest points at the new ones)."""
    keep = {k for k in keep if k}
    for p in folder.glob("vectors-*.npy"):
        if p.name not in keep:
            p.unlink(missing_ok=True)


def _map(path: Path) -> np.ndarray:
    arr = np.load(path, mmap_mode="r")
    mm = getattr(arr, "_mmap", None)
    if mm is not None and hasattr(mmap, "MADV_RANDOM"):
        mm.madvise(mmap.MADV_RANDOM)
    return arr


class VectorRows:
    """Every stored vector of a collection version by id, from the memory-mapped fp16 rows file
    (thread-safe, read-only)."""

    def __init__(self, vectors_path: Path, ids_path: Path | None):
        for p in (vectors_path, ids_path):
            if p is not None and not p.is_file():
                raise CollectionError(f"vector rows file {p} is missing: rebuild the index")
        self.vectors = _map(vectors_path)
        self.ids = _map(ids_path) if ids_path is not None else None
        if self.ids is not None and len(self.ids) != len(self.vectors):
            raise CollectionError(f"{ids_path} holds {len(self.ids)} ids but {vectors_path} {len(self.vectors)} rows")

    @classmethod
    def from_entry(cls, folder: Path, entry: dict[str, Any]) -> "VectorRows | None":
        """The rows file of a manifest index entry, or None when it names none."""
        name, ids = rows_fields(entry)
        return cls(folder / name, folder / ids if ids else None) if name else None

    def warm(self) -> None:
        """Bring the whole rows file into the page cache and this process's mapping (one read per
        page), so the first queries do not pay a page fault per candidate row. For a server whose
        RAM holds the file; under memory pressure the kernel drops the pages again, and that is fine."""
        pages = self.vectors.reshape(-1).view(np.uint8)[:: mmap.PAGESIZE]
        pages.max(initial=0)

    @property
    def nbytes(self) -> int:
        return self.vectors.nbytes + (0 if self.ids is None else self.ids.nbytes)

    def rows(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(row, valid)`` for each id (-1 and unknown ids are invalid)."""
        n = len(self.vectors)
        if self.ids is None:
            valid = (ids >= 0) & (ids < n)
            return np.where(valid, ids, 0), valid
        pos = np.minimum(np.searchsorted(self.ids, ids), max(n - 1, 0))
        valid = (ids >= 0) & (np.asarray(self.ids[pos]) == ids)
        return np.where(valid, pos, 0), valid

    def read(self, rows: np.ndarray) -> np.ndarray:
        """The vectors ``(len(rows), dim)`` float32 at these rows. Scattered rows are gathered
        from the mapping in ascending order; dense ones (at least 1 in :data:`DENSE_SPAN` of the
        rows they span) are read in sequence with plain reads: on a cold page cache a random read
        per row costs as much as reading ~30 rows in sequence, and a page fault per 4 KiB page of the
        ``MADV_RANDOM`` mapping costs more than copying the rows between the wanted ones."""
        order = None if len(rows) < 2 or bool(np.all(rows[1:] >= rows[:-1])) else np.argsort(rows, kind="stable")
        ordered = rows if order is None else rows[order]
        if len(rows) and ordered[-1] - ordered[0] < DENSE_SPAN * len(rows):
            got = self._read_span(ordered)
        else:
            got = self.vectors[ordered].astype(np.float32)
        if order is None:
            return got
        out = np.empty(got.shape, np.float32)
        out[order] = got
        return out

    def _read_span(self, ordered: np.ndarray) -> np.ndarray:
        """The rows ``ordered`` (ascending), read chunk by chunk from the file (not the mapping)
        into one reused buffer of :data:`SPAN_CHUNK` rows."""
        dim = self.vectors.shape[1]
        out = np.empty((len(ordered), dim), np.float32)
        lo, hi = int(ordered[0]), int(ordered[-1]) + 1
        buf = np.empty((min(SPAN_CHUNK, hi - lo), dim), np.float16)
        with open(self.vectors.filename, "rb", buffering=0) as f:
            f.seek(self.vectors.offset + lo * dim * 2)
            for start in range(lo, hi, len(buf)):
                chunk = buf[:min(len(buf), hi - start)]
                if f.readinto(memoryview(chunk).cast("B")) != chunk.nbytes:
                    raise CollectionError(f"vector rows file {self.vectors.filename} is shorter than its header says")
                a, b = np.searchsorted(ordered, [start, start + len(chunk)])
                out[a:b] = chunk[ordered[a:b] - start]
        return out


class IndexRows:
    """The stored vectors an uncompressed index holds, by id: a bare ``IndexFlat`` or
    ``IndexHNSWFlat`` (an adopted autofaiss ``HNSW32``), whose labels are the item ids. The rows
    interface of :class:`VectorRows` for collections whose index has no rows file beside it."""

    def __init__(self, index: Any):
        self.index = index

    @classmethod
    def of(cls, index: Any) -> "IndexRows | None":
        """Rows of ``index`` when it keeps its vectors uncompressed under the ids, else None."""
        import faiss

        return cls(index) if isinstance(index, (faiss.IndexFlat, faiss.IndexHNSWFlat)) else None

    def rows(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(row, valid)`` for each id: the label is the row."""
        valid = (ids >= 0) & (ids < self.index.ntotal)
        return np.where(valid, ids, 0), valid

    def read(self, rows: np.ndarray) -> np.ndarray:
        """The vectors ``(len(rows), dim)`` float32 at these rows."""
        return self.index.reconstruct_batch(np.ascontiguousarray(rows, np.int64)).astype(np.float32, copy=False)


class DiskRefine(VectorRows):
    """Exact re-scoring of shortlists from the memory-mapped fp16 rows file (thread-safe, read-only)."""

    def __init__(self, vectors_path: Path, ids_path: Path | None, metric: str = "ip"):
        super().__init__(vectors_path, ids_path)
        self.metric = metric
        self._torch_rows: Any = None

    @classmethod
    def from_entry(cls, folder: Path, entry: dict[str, Any]) -> "DiskRefine | None":
        """The refine of a manifest index entry, or None when the index has no on-disk refine."""
        if not entry.get("refine_file"):
            return None
        ids = entry.get("refine_ids_file")
        return cls(folder / entry["refine_file"], folder / ids if ids else None, entry.get("metric", "ip"))

    def rescore(self, queries: np.ndarray, cand: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` of the candidate ids ``cand`` (Q, K') by exact score: (distances, ids) like FAISS
        (inner product descending, or squared L2 ascending), -1 / -inf|inf in empty slots."""
        nq, kk = cand.shape
        rows, valid = self.rows(cand.ravel())
        score = self._scores(np.ascontiguousarray(queries, dtype=np.float32), rows.reshape(nq, kk))
        sign, fill = (-1.0, -np.inf) if self.metric == "ip" else (1.0, np.inf)  # sort ascending on sign * score
        score = np.where(valid.reshape(nq, kk), score, fill)
        order = np.argsort(sign * score, axis=1, kind="stable")[:, :k]
        top = np.take_along_axis(score, order, axis=1)
        ids = np.where(np.isfinite(top), np.take_along_axis(cand, order, axis=1), -1)
        if top.shape[1] < k:  # fewer candidates than k
            pad = ((0, 0), (0, k - top.shape[1]))
            top = np.pad(top, pad, constant_values=fill)
            ids = np.pad(ids, pad, constant_values=-1)
        return top.astype(np.float32), ids.astype(np.int64)

    def _scores(self, queries: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Exact fp32 score of each query against its candidate rows, (Q, K').

        torch, one query at a time: ``index_select`` gathers the rows from the mapping with torch's
        threads, and a query's rows (~1 MB) stay in cache for the fp16->fp32 cast and the dot
        product; ~10x a numpy fancy-index gather (benchmarks/RESULTS.md, issue 21).
        """
        import torch

        table, q, rows_t = self._table(), torch.from_numpy(queries), torch.from_numpy(rows)
        out = torch.empty(rows.shape, dtype=torch.float32)
        with torch.inference_mode():
            for i in range(len(rows)):
                v = table.index_select(0, rows_t[i]).float()
                out[i] = v @ q[i] if self.metric == "ip" else (v - q[i]).square().sum(1)
        return out.numpy()

    def _table(self) -> Any:
        """The fp16 rows as a (read-only, shared-memory) torch tensor over the mapping."""
        if self._torch_rows is None:
            import torch

            with warnings.catch_warnings():  # torch warns that the mapping is read-only; nothing writes it
                warnings.simplefilter("ignore", UserWarning)
                self._torch_rows = torch.from_numpy(self.vectors)
        return self._torch_rows

    def search(self, index: Any, queries: np.ndarray, k: int, k_factor: float,
               params: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """Shortlist ``ceil(k * k_factor)`` candidates with ``index`` (per-call ``params``), re-score exactly."""
        kk = max(k, int(np.ceil(k * k_factor)))
        _, cand = index.search(queries, kk, params=params)
        return self.rescore(queries, cand, k)


def file_bytes(folder: Path, entry: dict[str, Any]) -> int:
    """Bytes on disk of an entry's vector rows files (0 without them)."""
    names = set(rows_fields(entry))
    return sum(os.path.getsize(folder / n) for n in names if n and (folder / n).is_file())
