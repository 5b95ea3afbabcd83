"""Shard io: writing shard files and reading one version's live rows (its tombstoned rows left out)."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vlsearch.store.arrays import embeddings_to_numpy, write_table
from vlsearch.store.keyword.index import KEYWORD_DIR, build_shard_index
from vlsearch.store.layout import CAPTIONS_DIR, FAILURES_DIR, IMAGES_DIR, SHARD_FILE_RE, shard_name, shard_number
from vlsearch.store.manifest import Manifest
from vlsearch.store.tombstones import DeadRows, live_mask, read_tombstones


def _id_column(kind: str) -> str:
    return "id" if kind == IMAGES_DIR else "image_id"


class ShardFiles:
    """The shard files of one version of the collection at ``directory`` (cheap: reads nothing until asked)."""

    def __init__(self, directory: Path, manifest: Manifest):
        self.directory = directory
        self.manifest = manifest

    @cached_property
    def dead_rows(self) -> DeadRows:
        """Deleted rows of this version: shard number -> sorted ids of its dead rows."""
        return read_tombstones(self.directory, self.manifest.tombstones)

    def live_mask(self, path: Path, ids: np.ndarray) -> np.ndarray | None:
        """Boolean mask of the live rows among ``ids`` of shard file ``path`` (None: all live)."""
        return live_mask(self.dead_rows, path, ids)

    def shard_paths(self, kind: str = IMAGES_DIR) -> list[Path]:
        """Live shard files of ``kind`` (images, captions or failures) of this version, in order."""
        folder = self.directory / kind
        if self.manifest.shards is not None:
            paths = [folder / shard_name(n) for n in self.manifest.shards]
            return paths if kind == IMAGES_DIR else [p for p in paths if p.is_file()]
        if not folder.is_dir():
            return []
        return sorted(p for p in folder.iterdir() if SHARD_FILE_RE.match(p.name))

    def shard_numbers(self, kind: str = IMAGES_DIR) -> list[int]:
        return [shard_number(p) for p in self.shard_paths(kind)]

    def next_shard_number(self) -> int:
        """A shard number no file on disk uses (new rows never overwrite a committed shard)."""
        taken = [shard_number(p) for kind in (IMAGES_DIR, CAPTIONS_DIR, FAILURES_DIR)
                 if (self.directory / kind).is_dir() for p in (self.directory / kind).iterdir()
                 if SHARD_FILE_RE.match(p.name)]
        if (self.directory / KEYWORD_DIR).is_dir():  # a keyword index left by a crash before its shard
            taken += [int(p.name[5:]) for p in (self.directory / KEYWORD_DIR).iterdir()
                      if p.name.startswith("part-") and p.name[5:].isdigit()]
        return max(taken, default=-1) + 1

    def write_shard(self, number: int, images: pa.Table, captions: pa.Table | None = None,
                    failures: pa.Table | None = None) -> None:
        """Write shard ``number`` atomically; the images file is written last and commits it (its
        keyword index, :mod:`vlsearch.store.keyword`, is written before it, like its captions)."""
        build_shard_index(self.directory, number, images)
        if captions is not None:
            write_table(self.directory / CAPTIONS_DIR / shard_name(number), captions)
        if failures is not None:
            write_table(self.directory / FAILURES_DIR / shard_name(number), failures)
        write_table(self.directory / IMAGES_DIR / shard_name(number), images)

    def read_shard(self, path: Path, kind: str = IMAGES_DIR, columns: Sequence[str] | None = None) -> pa.Table:
        """The live rows of one shard file (``columns`` only)."""
        if kind == FAILURES_DIR or shard_number(path) not in self.dead_rows:
            return pq.read_table(path, columns=list(columns) if columns else None)
        wanted = list(columns) if columns else None
        id_column = _id_column(kind)
        table = pq.read_table(path, columns=None if wanted is None else list(dict.fromkeys([*wanted, id_column])))
        mask = self.live_mask(path, table.column(id_column).to_numpy().astype(np.int64))
        table = table.filter(pa.array(mask))
        return table if wanted is None else table.select(wanted)

    def read_table(self, kind: str = IMAGES_DIR, columns: Sequence[str] | None = None) -> pa.Table:
        """Read all shards of ``kind`` (only ``columns``); fine for metadata, not for 1M embeddings."""
        paths = self.shard_paths(kind)
        if not paths:
            return pa.table({}) if columns is None else pa.table({c: [] for c in columns})
        return pa.concat_tables([self.read_shard(p, kind, columns) for p in paths], promote_options="permissive")

    def iter_embeddings(
        self, kind: str = IMAGES_DIR, batch_size: int = 65_536, id_column: str | None = None,
        paths: Sequence[Path] | None = None,
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Stream ``(ids int64, vectors float32 (B, dim))`` over all shards with bounded memory.

        ``id_column`` defaults to ``id`` for images and ``image_id`` for captions; ``paths``: only
        these shard files (e.g. one worker's group), in the order given.
        """
        id_column = id_column or _id_column(kind)
        for path in self.shard_paths(kind) if paths is None else paths:
            pf = pq.ParquetFile(path)
            for batch in pf.iter_batches(batch_size=batch_size, columns=[id_column, "embedding"]):
                ids = batch.column(0).to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
                vectors = embeddings_to_numpy(batch.column(1))
                mask = self.live_mask(path, ids)
                yield (ids, vectors) if mask is None else (ids[mask], vectors[mask])

    def read_embeddings(self, kind: str = IMAGES_DIR, id_column: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """All ``(ids, vectors)`` of ``kind`` in memory at once (small collections, benchmarks)."""
        parts = list(self.iter_embeddings(kind, id_column=id_column))
        if not parts:
            return np.zeros(0, np.int64), np.zeros((0, self.manifest.model.dim), np.float32)
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def count(self, kind: str = IMAGES_DIR) -> int:
        """Live row count: Parquet footers, less the dead rows (reads only their shards' ids)."""
        total = 0
        for p in self.shard_paths(kind):
            if kind != FAILURES_DIR and shard_number(p) in self.dead_rows:
                ids = pq.read_table(p, columns=[_id_column(kind)]).column(0).to_numpy().astype(np.int64)
                total += int(self.live_mask(p, ids).sum())
            else:
                total += pq.ParquetFile(p).metadata.num_rows
        return total
