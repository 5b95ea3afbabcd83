"""Embedding columns: ``(N, dim)`` numpy <-> Arrow ``fixed_size_list<float16>[dim]``, and the one
atomic Parquet writer of every shard file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vlsearch.core.fsutil import atomic_path


def embedding_type(dim: int) -> pa.DataType:
    return pa.list_(pa.float16(), dim)


def embedding_array(vectors: np.ndarray) -> pa.FixedSizeListArray:
    """``(N, dim)`` float array -> Arrow fixed-size list of float16."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float16)
    n, dim = vectors.shape
    return pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), type=pa.float16()), dim)


def embeddings_to_numpy(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Arrow fixed-size list column -> ``(N, dim)`` float32 numpy (no per-row Python)."""
    if isinstance(column, pa.ChunkedArray):
        chunks = [embeddings_to_numpy(c) for c in column.chunks]
        dim = column.type.list_size
        return np.concatenate(chunks) if chunks else np.zeros((0, dim), np.float32)
    dim = column.type.list_size
    flat = column.flatten().to_numpy(zero_copy_only=False)
    return flat.reshape(-1, dim).astype(np.float32)


def write_table(path: Path, table: pa.Table) -> None:
    """Write ``table`` to ``path`` atomically (temp, fsync, rename), zstd, 4,096-row groups."""
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, row_group_size=4096, compression="zstd")

