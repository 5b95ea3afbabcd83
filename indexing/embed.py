"""Encode an image source into a collection of Parquet shards, resumably.

``embed(source, collection_dir, config)`` streams the source's records, decodes them in worker
processes (``indexing.decode``) while the model encodes the previous batch, encodes each image's
captions too, and writes shard ``k`` (records ``[k*shard_size, (k+1)*shard_size)``, failures
included) atomically through :meth:`Collection.write_shard`. Memory stays flat: one shard of
records and embeddings at a time.

Resume: rerunning on an existing collection removes uncommitted files, skips the records of the
committed shards and continues, so a run killed at any moment ends with exactly the ids of an
uninterrupted run. A complete collection is synced with its source (``indexing.sync``); another
model is refused. The collection is locked (``.lock``) while it is written.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path


from vlsearch.store.layout import IMAGES_DIR, MANIFEST
from vlsearch.store.collection import Collection
from vlsearch.store.manifest import Manifest
from vlsearch.core.errors import CollectionMismatchError
from vlsearch.models.factory import Encoder, default_model, load_model
from vlsearch.core.progress import Progress
from vlsearch.core.allocator import reusing_freed_memory
from vlsearch.core.threads import cpu_threads

from indexing.shards import (
    EmbedConfig, committed_shards, embed_shard, counts_on_disk, chunks, ShardStats, image_schema,
)
from indexing.photos import honour_no_gps, source_record
from indexing.sync import sync
from vlsearch.data.sources import ImageRecord, ImageSource, open_source

log = logging.getLogger(__name__)


def embed(
    source: ImageSource | str | os.PathLike,
    collection_dir: str | os.PathLike,
    config: EmbedConfig = EmbedConfig(),
    progress: Progress | None = None,
    *,
    encoder: Encoder | None = None,
) -> Collection:
    """Create (or resume) the collection at ``collection_dir`` from ``source``; returns it.

    ``encoder``: an already loaded model to use instead of loading ``config.model``. Raises
    SourceError (missing/empty source), CollectionMismatchError (another model or source).
    """
    if not isinstance(source, ImageSource):
        source = open_source(source)
    if config.model is None:
        config = replace(config, model=encoder.name if encoder is not None else default_model())
    path = Path(collection_dir)
    coll = open_existing(path, source, config, check_model_name=encoder is None)
    config = honour_no_gps(coll, config) if coll is not None else config
    if coll is not None and coll.manifest.complete:  # a finished collection follows its source: sync it
        sync(source, coll, config, encoder=encoder, progress=progress)
        return Collection.open(path)
    with cpu_threads(config.threads), reusing_freed_memory():
        return _load_and_run(path, coll, source, encoder, config, progress)


def _load_and_run(path: Path, coll: Collection | None, source: ImageSource, encoder: Encoder | None,
                  config: EmbedConfig, progress: Progress | None) -> Collection:
    """Load the model (unless given), check it against an existing collection, embed what is missing."""
    if encoder is None:
        encoder = load_model(config.model, config.pretrained, device=config.device, precision=config.precision)
    if coll is not None:
        coll.check_model(encoder.info)
    records = iter(source)
    first = next(records)  # SourceError for an empty source, before anything is created
    records = itertools.chain([first], records)
    if coll is None:
        coll = Collection.create(path, Manifest(model=encoder.info, shard_size=config.shard_size,
                                                source=source_record(source, config), precision=encoder.precision))
    with coll.lock():  # the precision record is a manifest write too: inside the writer lock
        _record_precision(coll, encoder.precision)
        return _run(coll, source, records, encoder, config, progress)


def open_existing(path: Path, source: ImageSource, config: EmbedConfig, *,
                  check_model_name: bool = True) -> Collection | None:
    """The collection already at ``path`` (None if none), refused if made from another source or
    (judged by name, before loading a big model) with another model."""
    if not (path / MANIFEST).exists():
        return None
    coll = Collection.open(path)
    check_source(coll, source)
    if check_model_name and config.model != coll.model.name:
        raise CollectionMismatchError(
            f"model {config.model} does not match collection {coll.path}, built with {coll.model.name} "
            f"(pretrained={coll.model.pretrained}); embeddings from different models are not comparable"
        )
    return coll


def _record_precision(coll: Collection, precision: str) -> None:
    """A resumed run in another precision is recorded as ``old+new`` (vectors agree to cosine ~0.999)."""
    recorded = coll.manifest.precision
    if recorded and precision not in recorded.split("+"):
        log.warning("resuming %s (embedded in %s) in %s", coll.path, recorded, precision)
        coll.update_manifest(precision=f"{recorded}+{precision}")


def check_source(coll: Collection, source: ImageSource) -> None:
    mine, theirs = coll.manifest.source, source.describe()
    if (mine.get("type"), mine.get("path")) != (theirs["type"], theirs["path"]):
        raise CollectionMismatchError(
            f"collection {coll.path} was embedded from {mine.get('type')} {mine.get('path')}, not "
            f"{theirs['type']} {theirs['path']}; use another collection directory"
        )


def _run(coll: Collection, source: ImageSource, records: Iterator[ImageRecord], encoder: Encoder,
         config: EmbedConfig, progress: Progress | None) -> Collection:
    done = set(committed_shards(coll))
    shard_size = coll.manifest.shard_size
    if shard_size != config.shard_size:
        log.warning("resuming with the collection's shard size %d (not %d)", shard_size, config.shard_size)
    counts = counts_on_disk(coll)
    stats = ShardStats(start=time.perf_counter(), skipped=len(done) * shard_size, total=source.size_hint(),
                       failures=counts["failures"])
    schema = image_schema(encoder.dim, source.metadata_schema)
    for number, chunk in enumerate(chunks(records, shard_size)):
        if number in done:  # committed by an earlier (possibly distributed) run
            continue
        for key, value in embed_shard(coll, number, chunk, encoder, config, schema, stats, progress).items():
            counts[key] += value
        counts["shards"] = len(coll.shard_paths(IMAGES_DIR))
        coll.update_manifest(counts=dict(counts))
    coll.commit_version(counts=dict(counts), complete=True, source=source_record(source, config))
    log.info("embedded %s into %s in %.1f s", counts, coll.path, time.perf_counter() - stats.start)
    return coll
