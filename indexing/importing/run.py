"""Import a folder of vectors (clip-retrieval output, npy + parquet) into a collection, no re-encoding.

**Ids** are row positions: row ``i`` of partition ``k`` gets id ``start_k + i`` (the rows of the
partitions before it, in partition order), the integers clip-retrieval's back-end and autofaiss
give the same rows. They stay stable as the folder grows by new partitions or a longer last one.

**First import** writes a staging collection ``.<name>.importing`` beside the target, shard by
shard (shard ``k``: positions ``[k * shard_size, (k + 1) * shard_size)``), commits it, gives it
an index (autofaiss ``image.index`` adopted when it matches, else :func:`indexing.build.build_index`),
and renames it to the target: the target appears whole or not at all. A killed import resumes
from the staging collection's committed shards, with no loss and no duplicates.

**Re-import** of a grown folder adds only the rows past the ones imported (the manifest's
``source.partitions`` lists the rows read from each partition) through
:class:`vlsearch.store.update.Update`, one committed version per ``rows_per_version`` rows; the
index follows. Partitions that changed other than by growing at the end are refused: their ids
would shift.

Memory stays bounded by one read batch, one Parquet row group and one version's added rows (npy
rows read block by block, not memory-mapped; Parquet batch by batch), whatever the folder's size.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlsearch.core.errors import CollectionError, CollectionMismatchError, ImportFolderError
from vlsearch.core.modelinfo import ModelInfo
from vlsearch.core.progress import Progress, no_progress
from vlsearch.store.collection import Collection
from vlsearch.store.layout import CAPTIONS_DIR, IMAGES_DIR, MANIFEST
from vlsearch.store.manifest import Manifest

from indexing.build import build_index
from indexing.importing.adopt import adopt_index, check_index, find_image_index
from indexing.importing.folder import ImportFolder
from indexing.importing.models import model_info
from indexing.importing.rows import ShardRows, iter_blocks, iter_shards
from indexing.shards import committed_shards

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImportConfig:
    """How to import. ``model``: clip-retrieval's spelling (``open_clip:ViT-B-32/laion2b_s34b_b79k``,
    ``ViT-B/32``) or vlsearch's (with ``pretrained``)."""

    model: str
    pretrained: str | None = None
    shard_size: int = 10_000
    #: rows read from the npy / parquet files at a time
    batch_size: int = 65_536
    #: a re-import commits one version per this many added rows (its vectors are held until then)
    rows_per_version: int = 200_000
    #: ``image.index`` folder (None: the imported folder or its ``index/``)
    index_dir: str | None = None
    #: build vlsearch's own index even where an ``image.index`` matches
    rebuild_index: bool = False
    #: give a first import an index at all (adopted or built)
    index: bool = True
    index_type: str = "auto"
    max_memory: str = "4GB"

    def __post_init__(self) -> None:
        for name in ("shard_size", "batch_size", "rows_per_version"):
            if getattr(self, name) < 1:
                raise ValueError(f"ImportConfig.{name} must be >= 1, not {getattr(self, name)}")


@dataclass
class ImportReport:
    """What an import did."""

    collection: Path
    layout: str
    model: ModelInfo
    #: rows in the folder
    rows: int
    #: rows added by this run (a resumed first import: since it resumed)
    added: int = 0
    captions: int = 0
    #: ids of rows skipped because their vector is not finite (NaN / inf), this run
    skipped_ids: list[int] = field(default_factory=list)
    #: "adopted", "built", "followed" (a re-import: the index took the new rows), or None
    index: str | None = None
    version: int = 0
    seconds: float = 0.0

    @property
    def rows_per_second(self) -> float:
        return self.added / max(self.seconds, 1e-9)


def import_folder(folder: ImportFolder, collection_dir: str | os.PathLike, config: ImportConfig,
                  progress: Progress | None = None) -> ImportReport:
    """Import the scanned ``folder`` into the collection at ``collection_dir`` (see module docstring)."""
    t0 = time.perf_counter()
    info = model_info(config.model, folder.dim, config.pretrained)
    target = Path(collection_dir).expanduser().resolve()
    report = ImportReport(target, folder.layout, info, folder.rows)
    progress = progress or no_progress
    if (target / MANIFEST).is_file():
        coll = _existing(target, folder, info)
        if not coll.manifest.complete:
            raise CollectionError(f"{target} is a collection still being embedded, not an import")
        _grow(coll, folder, config, report, progress)
    else:
        _first_import(folder, target, info, config, report, progress)
    report.version = Collection.open(target).manifest.version
    report.seconds = time.perf_counter() - t0
    if report.skipped_ids:
        log.warning("%d rows skipped for non-finite vectors, ids: %s", len(report.skipped_ids), report.skipped_ids)
    return report


def _existing(path: Path, folder: ImportFolder, info: ModelInfo) -> Collection:
    """The collection at ``path``, refused unless imported from this folder with this model."""
    coll = Collection.open(path)
    source = coll.manifest.source
    if (source.get("type"), source.get("path")) != (folder.layout, str(folder.path)):
        raise CollectionMismatchError(f"{path} was made from {source.get('type')} {source.get('path')}, not "
                                      f"{folder.layout} {folder.path}; import into another collection directory")
    coll.check_model(info)
    check_partitions(folder, source.get("partitions") or [])
    return coll


def check_partitions(folder: ImportFolder, imported: list[int]) -> None:
    """ImportFolderError unless the rows imported so far keep their positions: every partition
    read before the last one read is unchanged, and that one has not shrunk."""
    current = [p.rows for p in folder.partitions]
    for k, rows in enumerate(imported):
        now = current[k] if k < len(current) else None
        last = k == len(imported) - 1
        if now is None or (now != rows if not last else now < rows):
            raise ImportFolderError(
                f"partition {k} of {folder.path} held {rows} rows when it was imported and now holds "
                f"{now if now is not None else 'none (gone)'}: only new partitions, or rows appended to the last "
                "one imported, can be added (other changes would shift the ids); import into a new collection")


def source_record(folder: ImportFolder, rows: int) -> dict[str, Any]:
    """The manifest ``source`` after the first ``rows`` positions were read."""
    parts = [min(p.rows, rows - p.start) for p in folder.partitions if p.start < rows]
    return {**folder.describe(), "partitions": parts, "rows": rows}


# ---- first import: a staging collection renamed into place -----------------------------------

def staging_path(target: Path) -> Path:
    return target.parent / f".{target.name}.importing"


def _first_import(folder: ImportFolder, target: Path, info: ModelInfo, config: ImportConfig,
                  report: ImportReport, progress: Progress) -> None:
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise CollectionError(f"{target} exists and is not a collection: import into an empty or new directory")
    image_index = None if config.rebuild_index or not config.index else find_image_index(folder, config.index_dir)
    if image_index is not None:
        check_index(image_index, folder)  # before any row is written: a mismatch costs nothing
    stage = staging_path(target)
    coll = _staging(stage, folder, info, config)
    if not coll.manifest.complete:
        _write_shards(coll, folder, config, report, progress)
    if config.index and not coll.has_index():
        report.index = _index(coll, image_index, report, config, progress)
    if target.exists():
        target.rmdir()
    os.rename(stage, target)  # the commit point of a first import
    log.info("imported %s into %s", folder.path, target)


def _staging(stage: Path, folder: ImportFolder, info: ModelInfo, config: ImportConfig) -> Collection:
    """The staging collection: resumed when a killed import left one, else created."""
    if (stage / MANIFEST).is_file():
        coll = _existing(stage, folder, info)
        log.info("resuming the import in %s", stage)
        return coll
    return Collection.create(stage, Manifest(model=info, shard_size=config.shard_size,
                                             source={**folder.describe(), "partitions": [], "rows": 0}))


def _write_shards(coll: Collection, folder: ImportFolder, config: ImportConfig, report: ImportReport,
                  progress: Progress) -> None:
    """Write every shard not committed yet, then commit the collection as complete."""
    with coll.lock():
        done = committed_shards(coll)
        size = coll.manifest.shard_size
        start = (max(done) + 1) * size if done else 0
        counts = {"images": coll.count(IMAGES_DIR), "captions": coll.count(CAPTIONS_DIR), "failures": 0,
                  "shards": len(done)}
        coll.update_manifest(source=source_record(folder, min(start, folder.rows)))
        for shard in iter_shards(iter_blocks(folder, start, folder.rows, config.batch_size),
                                 size, folder.dim):
            if shard.images.num_rows:
                coll.write_shard(shard.number, shard.images, shard.captions)
                counts["shards"] += 1
            _count(report, counts, shard)
            progress(min((shard.number + 1) * size, folder.rows), folder.rows, stage="import")
        coll.update_manifest(counts=dict(counts))
        coll.commit_version(counts=dict(counts), complete=True, source=source_record(folder, folder.rows))


def _count(report: ImportReport, counts: dict[str, int], shard: ShardRows) -> None:
    report.added += shard.images.num_rows
    report.captions += shard.captions.num_rows
    report.skipped_ids += shard.skipped.tolist()
    counts["images"] += shard.images.num_rows
    counts["captions"] += shard.captions.num_rows


def _index(coll: Collection, image_index: Path | None, report: ImportReport, config: ImportConfig,
           progress: Progress) -> str:
    """Adopt the checked ``image_index`` (refused if rows were skipped: it holds them), else build one."""
    if image_index is not None:
        if report.skipped_ids or coll.count() != report.rows:
            raise ImportFolderError(f"{image_index} indexes rows the import skipped (non-finite vectors, ids "
                                    f"{report.skipped_ids[:5]}...); rerun with --rebuild-index")
        adopt_index(coll, image_index)
        return "adopted"
    build_index(coll, index_type=config.index_type, max_memory=config.max_memory, progress=progress)
    return "built"


# ---- re-import: only the rows past the imported ones, by versions ----------------------------

def _grow(coll: Collection, folder: ImportFolder, config: ImportConfig, report: ImportReport,
          progress: Progress) -> None:
    start = int(coll.manifest.source.get("rows", 0))
    for lo in range(start, folder.rows, config.rows_per_version):
        hi = min(lo + config.rows_per_version, folder.rows)
        with coll.update() as update:
            for shard in iter_shards(iter_blocks(folder, lo, hi, config.batch_size), coll.manifest.shard_size,
                                     folder.dim):
                if shard.images.num_rows:
                    update.add(shard.images, shard.captions)
                _count(report, {"images": 0, "captions": 0}, shard)
            update.record(source=source_record(folder, hi))
        progress(hi - start, folder.rows - start, stage="import")
    if report.added and coll.manifest.index is not None:
        report.index = "followed"
