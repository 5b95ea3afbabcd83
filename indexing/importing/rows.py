"""A folder's rows streamed as shard-sized Arrow tables: npy rows read block by block, Parquet batch by batch.

Each row becomes an images row ``id`` (its global position), ``path`` (``image_path``, else
``url``, else the id), ``width``/``height`` (the metadata's integer columns of those names),
``captions`` (``[caption]``), the other metadata columns as they are, and its vector (fp16).
Metadata columns whose names vlsearch reserves (``id``, ``path``, ``captions``, ``embedding``,
the file columns) are kept as ``source_<name>``. With caption vectors (``text_emb``) each row
with a caption also gets a captions row ``(image_id, caption, embedding)``.

Rows whose vector is not finite (NaN, inf) are skipped and their ids returned: one bad row never
stops an import of millions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from vlsearch.store.arrays import embedding_array
from vlsearch.store.layout import FILE_COLUMNS, IMAGE_COLUMNS

from indexing.importing.folder import ImportFolder, NpyRows, Partition

PATH_COLUMNS = ("image_path", "url")
CAPTION_COLUMN = "caption"
RESERVED = (*IMAGE_COLUMNS, *FILE_COLUMNS, "embedding")


@dataclass
class Block:
    """Consecutive rows of one partition: positions ``start ..``, vectors, caption vectors, metadata."""

    start: int
    vectors: np.ndarray
    texts: np.ndarray | None
    metadata: pa.Table | None

    def __len__(self) -> int:
        return len(self.vectors)

    def cut(self, n: int) -> tuple["Block", "Block"]:
        """The first ``n`` rows and the rest."""
        texts = (None, None) if self.texts is None else (self.texts[:n], self.texts[n:])
        meta = (None, None) if self.metadata is None else (self.metadata.slice(0, n), self.metadata.slice(n))
        return (Block(self.start, self.vectors[:n], texts[0], meta[0]),
                Block(self.start + n, self.vectors[n:], texts[1], meta[1]))


@dataclass
class ShardRows:
    """One shard's tables and the ids of the rows skipped for non-finite vectors."""

    number: int
    images: pa.Table
    captions: pa.Table
    skipped: np.ndarray


def iter_blocks(folder: ImportFolder, start: int, stop: int, batch: int) -> Iterator[Block]:
    """Rows ``start .. stop`` (global positions) in blocks of at most ``batch`` rows."""
    for part in folder.partitions:
        if part.stop <= start or part.start >= stop:
            continue
        yield from _partition_blocks(part, folder.metadata_schema, max(start, part.start), min(stop, part.stop), batch)


def _partition_blocks(part: Partition, schema: pa.Schema, start: int, stop: int, batch: int) -> Iterator[Block]:
    vectors = NpyRows(part.image)
    texts = NpyRows(part.text) if part.text is not None else None
    pos = part.start
    for rows, meta in _metadata_batches(part, schema, batch):
        lo, hi = pos, pos + rows
        pos = hi
        if hi <= start:
            continue
        if lo >= stop:
            return
        a, b = max(lo, start) - part.start, min(hi, stop) - part.start
        yield Block(a + part.start, vectors.read(a, b), None if texts is None else texts.read(a, b),
                    None if meta is None else meta.slice(a - (lo - part.start), b - a))


def _metadata_batches(part: Partition, schema: pa.Schema, batch: int) -> Iterator[tuple[int, pa.Table | None]]:
    """``(rows, metadata)`` batch by batch (None: the folder has no metadata columns)."""
    if part.metadata is None or not len(schema):
        for lo in range(0, part.rows, batch):
            yield min(batch, part.rows - lo), None
        return
    for rb in pq.ParquetFile(part.metadata).iter_batches(batch_size=batch):
        yield rb.num_rows, _conform(pa.Table.from_batches([rb]), schema)


def _conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` with every column of the folder's unified schema, in its order and types."""
    n = table.num_rows
    columns = [table.column(f.name).cast(f.type) if f.name in table.column_names else pa.nulls(n, f.type)
               for f in schema]
    return pa.Table.from_arrays(columns, schema=schema)


def iter_shards(blocks: Iterator[Block], shard_size: int, dim: int) -> Iterator[ShardRows]:
    """Group blocks into shards ``k`` holding positions ``[k * shard_size, (k + 1) * shard_size)``."""
    pending: list[Block] = []
    number = None
    for block in blocks:
        while len(block):
            k = block.start // shard_size
            if number is not None and k != number:
                yield shard_rows(number, pending, dim)
                pending = []
            number = k
            head, block = block.cut(min(len(block), (k + 1) * shard_size - block.start))
            pending.append(head)
    if pending:
        yield shard_rows(number, pending, dim)


def shard_rows(number: int, blocks: list[Block], dim: int) -> ShardRows:
    """The images and captions tables of ``blocks`` (non-finite vectors left out)."""
    vectors = np.concatenate([b.vectors for b in blocks])
    ids = np.concatenate([np.arange(b.start, b.start + len(b), dtype=np.int64) for b in blocks])
    meta = None if blocks[0].metadata is None else pa.concat_tables([b.metadata for b in blocks])
    good = np.isfinite(vectors).all(axis=1)
    if not good.all():
        vectors, keep = vectors[good], pa.array(good)
        meta = meta.filter(keep) if meta is not None else None
    kept = ids[good]
    images = images_table(kept, vectors, meta)
    texts = None if blocks[0].texts is None else np.concatenate([b.texts for b in blocks])[good]
    return ShardRows(number, images, captions_table(kept, texts, meta, dim), ids[~good])


def images_table(ids: np.ndarray, vectors: np.ndarray, meta: pa.Table | None) -> pa.Table:
    """The images rows (standard columns, metadata, embedding) of ``ids``."""
    n = len(ids)
    path = None if meta is None else _first_text(meta, PATH_COLUMNS)
    columns: dict[str, pa.Array | pa.ChunkedArray] = {
        "id": pa.array(ids, pa.int64()),
        "path": pa.array(ids.astype(str)) if path is None else pc.coalesce(path, pa.array(ids.astype(str))),
        "width": _int_column(meta, "width", n),
        "height": _int_column(meta, "height", n),
        "captions": _captions_list(meta, n),
    }
    for name in [] if meta is None else meta.column_names:
        if name == "image_path" or name == CAPTION_COLUMN or (name in ("width", "height") and _is_int(meta, name)):
            continue
        columns[f"source_{name}" if name in RESERVED else name] = meta.column(name)
    for name in FILE_COLUMNS:
        columns[name] = pa.nulls(n, pa.string() if name.endswith("hash") else pa.int64())
    columns["embedding"] = embedding_array(vectors)
    return pa.table(columns)


def captions_table(ids: np.ndarray, texts: np.ndarray | None, meta: pa.Table | None, dim: int) -> pa.Table:
    """Captions rows ``(image_id, caption, embedding)`` of the rows with a caption and a finite caption vector."""
    captions = None if meta is None or CAPTION_COLUMN not in meta.column_names else meta.column(CAPTION_COLUMN)
    if texts is None or captions is None:
        return pa.table({"image_id": pa.array([], pa.int64()), "caption": pa.array([], pa.string()),
                         "embedding": embedding_array(np.zeros((0, dim), np.float32))})
    captions = captions.cast(pa.string())
    keep = np.asarray(captions.is_valid()) & np.isfinite(texts).all(axis=1)
    return pa.table({"image_id": pa.array(ids[keep], pa.int64()), "caption": captions.filter(pa.array(keep)),
                     "embedding": embedding_array(texts[keep])})


def _first_text(meta: pa.Table, names: tuple[str, ...]) -> pa.ChunkedArray | None:
    for name in names:
        if name in meta.column_names:
            return meta.column(name).cast(pa.string())
    return None


def _is_int(meta: pa.Table | None, name: str) -> bool:
    return meta is not None and name in meta.column_names and pa.types.is_integer(meta.schema.field(name).type)


def _int_column(meta: pa.Table | None, name: str, n: int) -> pa.Array | pa.ChunkedArray:
    if _is_int(meta, name):
        return meta.column(name).cast(pa.int32(), safe=False)
    return pa.nulls(n, pa.int32())


def _captions_list(meta: pa.Table | None, n: int) -> pa.Array:
    """``[caption]`` per row, ``[]`` where it has none (built from offsets: no per-row Python)."""
    if meta is None or CAPTION_COLUMN not in meta.column_names:
        return pa.ListArray.from_arrays(pa.array(np.zeros(n + 1, np.int32)), pa.array([], pa.string()))
    captions = meta.column(CAPTION_COLUMN).cast(pa.string()).combine_chunks()
    valid = np.asarray(captions.is_valid(), bool)
    offsets = np.concatenate([[0], np.cumsum(valid)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), captions.filter(pa.array(valid)))
