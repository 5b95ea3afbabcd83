"""Set metadata columns of rows already in a collection, as one new version, without re-encoding:
what ``index --refresh-metadata`` (EXIF columns), ``duplicates --write-columns`` and auto-tags use.

::

    values = pa.table({"id": [3, 7], "tags": [["dog"], ["beach", "sea"]]})
    set_columns(coll, values)   # version N+1: rows 3 and 7 get their tags, every other row null

Every live image shard is rewritten into a new shard (same rows, same order, dead rows dropped),
so that all shards keep one schema: a row named in ``values`` gets its value, any other row keeps
the value it had (``keep=True``, the default) or gets null (``keep=False``, or when the column is
new). Ids and embeddings do not change, so the index and its ``Refine(disk)`` rows stay as they
are; each new shard gets its keyword index as it is written. Re-rank features stored per shard
(``vlsearch rerank-features``) count as missing for rewritten shards, as after ``compact``: store
them again. A crash before the commit leaves version N (the new shards are garbage).
"""

from __future__ import annotations

import logging
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from vlsearch.core.errors import InvalidQueryError
from vlsearch.store.directory import CollectionDir
from vlsearch.store.layout import CAPTIONS_DIR, FAILURES_DIR, FILE_COLUMNS, IMAGES_DIR, shard_name

log = logging.getLogger(__name__)

#: Columns a caller cannot set: identity, location and the embedding are the collection's own.
PROTECTED_COLUMNS = ("id", "path", "embedding", *FILE_COLUMNS)


def set_columns(coll: CollectionDir, values: pa.Table, keep: bool = True,
                progress: Callable[[int, int], None] | None = None) -> dict[str, int]:
    """Give the rows whose ids ``values`` lists (column ``id``) its other columns' values, as one
    new version (see module docstring). Returns ``rows_updated``, ``ids_unmatched``,
    ``shards_rewritten`` and ``version``. Holds the collection's writer lock."""
    columns = _check_values(values)
    with coll.lock():
        base = coll.reopen()
        base.collect_garbage()
        value_ids = values.column("id").combine_chunks()
        shards = list(base.manifest.shards if base.manifest.shards is not None else base.shard_numbers())
        number, written, matched = base.next_shard_number(), [], 0
        for i, old in enumerate(shards):
            images = base.read_shard(base.path / IMAGES_DIR / shard_name(old))
            rows = pc.index_in(images.column("id"), value_set=value_ids)
            matched += int(pc.sum(pc.is_valid(rows)).as_py() or 0)
            for name in columns:
                images = _with_column(images, name, values.column(name), rows, keep)
            base.write_shard(number, images, *_companions(base, old))
            written.append(number)
            number += 1
            if progress is not None:
                progress(i + 1, len(shards))
        base.commit_version(shards=tuple(written), tombstones=None, index=base.manifest.index,
                            counts=dict(base.manifest.counts, shards=len(written)))
        coll.manifest = base.manifest
    log.info("collection %s: version %d sets %s on %d rows", base.path, base.manifest.version, columns, matched)
    return {"rows_updated": matched, "ids_unmatched": values.num_rows - matched,
            "shards_rewritten": len(written), "version": base.manifest.version}


def _check_values(values: pa.Table) -> list[str]:
    if not isinstance(values, pa.Table):
        raise InvalidQueryError(f"column values must be a pyarrow Table, not {type(values).__name__}")
    if "id" not in values.column_names:
        raise InvalidQueryError("column values need an `id` column naming the rows to set")
    columns = [c for c in values.column_names if c != "id"]
    protected = [c for c in columns if c in PROTECTED_COLUMNS]
    if protected:
        raise InvalidQueryError(f"column(s) {protected} belong to the collection and cannot be set")
    if not columns:
        raise InvalidQueryError("column values name no column to set (only `id`)")
    ids = values.column("id").to_numpy()
    if len(np.unique(ids)) != len(ids):
        raise InvalidQueryError("column values list an id more than once")
    return columns


def _with_column(images: pa.Table, name: str, values: pa.ChunkedArray, rows: pa.Array, keep: bool) -> pa.Table:
    """``images`` with column ``name`` = ``values[rows]`` where ``rows`` is valid, else the old
    value (``keep``) or null."""
    new = pc.take(values, rows)
    if name in images.column_names:
        position = images.column_names.index(name)
        if keep:
            old = images.column(name)
            try:
                old = old.cast(values.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                raise InvalidQueryError(f"column {name!r} holds {old.type} values, which cannot become "
                                        f"{values.type}: {exc}") from exc
            new = pc.if_else(pc.is_valid(rows), new, old)
        return images.set_column(position, name, new)
    before = images.column_names.index("embedding") if "embedding" in images.column_names else images.num_columns
    return images.add_column(before, name, new)


def _companions(base: CollectionDir, number: int) -> tuple[pa.Table | None, pa.Table | None]:
    """Shard ``number``'s live caption rows and its failures, carried to the rewritten shard."""
    out = []
    for kind in (CAPTIONS_DIR, FAILURES_DIR):
        path = base.path / kind / shard_name(number)
        out.append(base.read_shard(path, kind) if path.is_file() else None)
    return out[0], out[1]


__all__ = ["PROTECTED_COLUMNS", "set_columns"]
