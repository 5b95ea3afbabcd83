"""Tombstones: the rows of live shards that later versions deleted, one file per version
(``tombstones/vNNNNNN.parquet``, columns ``shard`` and ``id``), read into ``shard -> sorted dead ids``."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vlsearch.core.fsutil import atomic_path
from vlsearch.store.layout import TOMBSTONES_DIR, shard_number, version_name

#: shard number -> sorted int64 ids of its dead rows
DeadRows = dict[int, np.ndarray]


def read_tombstones(directory: Path, name: str | None) -> DeadRows:
    """The dead rows listed in tombstone file ``name`` of the collection at ``directory`` (None: none)."""
    dead: DeadRows = {}
    if name:
        table = pq.read_table(directory / TOMBSTONES_DIR / name)
        shards = table.column("shard").to_numpy()
        ids = table.column("id").to_numpy().astype(np.int64)
        for n in np.unique(shards):
            dead[int(n)] = np.sort(ids[shards == n])
    return dead


def live_mask(dead: Mapping[int, np.ndarray], path: Path, ids: np.ndarray) -> np.ndarray | None:
    """Boolean mask of the live rows among ``ids`` of shard file ``path`` (None: all live)."""
    rows = dead.get(shard_number(path))
    return None if rows is None else ~np.isin(ids, rows)


def remove_rows(dead: Mapping[int, np.ndarray], paths: Iterable[Path],
                removed: np.ndarray) -> tuple[DeadRows, np.ndarray]:
    """New dead rows (``dead`` plus the live rows of ids ``removed`` in image shard files ``paths``)
    and the removed ids actually found."""
    new = {n: ids.copy() for n, ids in dead.items()}
    hit: list[np.ndarray] = []
    if len(removed):
        for path in paths:
            ids = pq.read_table(path, columns=["id"]).column(0).to_numpy().astype(np.int64)
            live = live_mask(dead, path, ids)
            gone = ids[np.isin(ids, removed) & (True if live is None else live)]
            if len(gone):
                n = shard_number(path)
                new[n] = np.union1d(new.get(n, np.zeros(0, np.int64)), gone)
                hit.append(gone)
    return new, (np.unique(np.concatenate(hit)) if hit else np.zeros(0, np.int64))


def write_tombstones(directory: Path, dead: Mapping[int, np.ndarray], version: int) -> str | None:
    """Write the tombstone file of ``version`` atomically; its name (None when no row is dead)."""
    if not any(len(v) for v in dead.values()):
        return None
    name = version_name(version, ".parquet")
    shards = np.concatenate([np.full(len(v), n, np.int32) for n, v in sorted(dead.items())])
    ids = np.concatenate([v for _, v in sorted(dead.items())])
    with atomic_path(directory / TOMBSTONES_DIR / name) as tmp:
        pq.write_table(pa.table({"shard": shards, "id": ids}), tmp)
    return name
