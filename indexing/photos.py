"""Photo metadata columns of rows already embedded, and the ``--no-gps`` choice a collection keeps.

:func:`refresh_metadata` (``vlsearch index SOURCE COLL --refresh-metadata``) re-reads the EXIF of
every live row from its file, headers only, and writes the photo columns
(:data:`vlsearch.data.photo.PHOTO_SCHEMA`) as one new version through
:meth:`Collection.set_columns`: no decode, no re-encoding. It is how a collection embedded before
these columns existed gets them.

``--no-gps`` is recorded in the manifest's ``source`` as ``"no_gps": true`` (:func:`source_record`)
and is sticky: every later sync and refresh keeps location out (:func:`honour_no_gps`), and asking
for it on a collection that has locations clears them from every row (:func:`keep_location_out`).
"""

from __future__ import annotations

import io
import logging
import os
from dataclasses import replace
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from vlsearch.core.errors import CollectionError
from vlsearch.core.progress import Progress
from vlsearch.data.locations import open_location
from vlsearch.data.photo import FOLDER, GPS_COLUMNS, PHOTO_SCHEMA, exif_of_file, photo_columns
from vlsearch.data.sources import ImageRecord, ImageSource, open_source, read_record
from vlsearch.store.collection import Collection

from indexing.shards import EmbedConfig

log = logging.getLogger(__name__)

#: Key of the manifest's ``source`` that records ``--no-gps``.
NO_GPS = "no_gps"


def source_record(source: ImageSource, config: EmbedConfig) -> dict[str, Any]:
    """What the manifest records about ``source``: its description, and ``no_gps`` when asked."""
    return {**source.describe(), **({NO_GPS: True} if config.no_gps else {})}


def honour_no_gps(coll: Collection, config: EmbedConfig) -> EmbedConfig:
    """``config``, with ``no_gps`` set when the collection recorded it."""
    return replace(config, no_gps=True) if coll.manifest.source.get(NO_GPS) else config


def keep_location_out(coll: Collection) -> Collection:
    """Clear ``gps_lat``/``gps_lon`` of every row (one new version) and record ``no_gps``, unless
    already recorded; returns the collection reopened."""
    if coll.manifest.source.get(NO_GPS):
        return coll
    empty = pa.table({"id": pa.array([], pa.int64()),
                      **{name: pa.array([], PHOTO_SCHEMA.field(name).type) for name in GPS_COLUMNS}})
    coll.set_columns(empty, keep=False)
    with coll.lock():  # recorded after the rows are cleared: a crash between leaves it to do again
        latest = Collection.open(coll.path)
        latest.update_manifest(source={**latest.manifest.source, NO_GPS: True})
    log.info("collection %s: locations cleared, no_gps recorded", coll.path)
    return Collection.open(coll.path)


def refresh_advice(coll: Collection) -> str | None:
    """What to run when some live shards were written before the photo columns existed (else None)."""
    old = sum(FOLDER not in pq.read_schema(path).names for path in coll.shard_paths())
    if not old:
        return None
    return (f"{old} shard(s) of {coll.path} were embedded before the photo metadata columns (taken_at, camera, "
            "lens, GPS, orientation, folder) and have none: `vlsearch index SOURCE COLLECTION --refresh-metadata` "
            "reads them from the files without re-encoding")


def record_exif(record: ImageRecord) -> dict[str, Any] | None:
    """The EXIF columns of a record's file, read from its headers; None when it cannot be read."""
    try:
        if record.tar_range is not None:
            return exif_of_file(io.BytesIO(read_record(record)))
        with open_location(record.location) as fh:
            return exif_of_file(fh)
    except OSError:
        return None


def refresh_metadata(source: ImageSource | str | os.PathLike, collection: Collection | str | os.PathLike,
                     config: EmbedConfig = EmbedConfig(), progress: Progress | None = None) -> dict[str, int]:
    """Re-read the photo columns of every live row from its file (see module docstring). Returns
    ``rows_updated``, ``files_unread`` (rows whose file is gone or unreadable: they keep their
    values) and ``version``. Raises CollectionError for an unfinished collection."""
    if not isinstance(source, ImageSource):
        source = open_source(source)
    coll = collection if isinstance(collection, Collection) else Collection.open(collection)
    if not coll.manifest.complete:
        raise CollectionError(f"collection {coll.path} is not finished; rerun the embedding to resume it first")
    if config.no_gps:
        coll = keep_location_out(coll)
    config = honour_no_gps(coll, config)
    live = set(coll.read_table(columns=["id"]).column("id").to_pylist())
    records, exif, unread = [], [], 0
    for record in source:
        if record.id not in live:
            continue
        values = record_exif(record)
        if values is None:
            unread += 1
            continue
        records.append(record)
        exif.append(values)
        if progress is not None:
            progress(len(records) + unread, len(live))
    columns = photo_columns([r.path for r in records], exif, gps=not config.no_gps)
    values = pa.table({"id": pa.array([r.id for r in records], pa.int64()),
                       **{f.name: pa.array(columns[f.name], f.type) for f in PHOTO_SCHEMA}})
    result = coll.set_columns(values, keep=True)
    return {"rows_updated": result["rows_updated"], "files_unread": len(live) - len(records),
            "version": result["version"]}


__all__ = ["NO_GPS", "honour_no_gps", "keep_location_out", "record_exif", "refresh_advice", "refresh_metadata", "source_record"]
