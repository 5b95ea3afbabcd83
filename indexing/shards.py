"""What embedding and sync share: the embed config, one shard's records -> decoded, encoded rows,
their Arrow schema and file columns, and the one shard writer of both engines (:func:`embed_shard`).

:mod:`indexing.embed` (a first run, resumable) and :mod:`indexing.sync` (a finished collection
following its source) both build on this module, so neither imports the other's pipeline.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from vlsearch.store.layout import CAPTIONS_DIR, FAILURES_DIR, IMAGES_DIR
from vlsearch.store.collection import Collection
from vlsearch.store.arrays import embedding_array, embedding_type
from vlsearch.core.errors import SourceError
from vlsearch.data.images import MAX_PIXELS
from vlsearch.data.photo import PHOTO_SCHEMA, photo_columns
from vlsearch.models.factory import Encoder, default_pretrained
from vlsearch.core.progress import Progress

from indexing.decode import DEFAULT_TIMEOUT, DecodedBatch, decode_batches, default_workers
from indexing.gpu_decode import gpu_batches
from vlsearch.data.sources import ImageRecord, content_hash, file_stat, record_hash

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmbedConfig:
    """How to embed a source. ``workers``: decode processes (0: decode in the calling process;
    None: :func:`indexing.decode.default_workers` for the encoder's device)."""

    #: None: :func:`vlsearch.models.factory.default_model` (decided when ``embed`` runs).
    model: str | None = None
    pretrained: str | None = None
    batch_size: int = 64
    workers: int | None = None
    device: str = "auto"
    precision: str = "auto"
    shard_size: int = 10_000
    #: torch intra-op threads of the encoding process (None: torch's default).
    threads: int | None = None
    #: seconds one image may take to decode before it is recorded as a ``timeout`` failure.
    decode_timeout: float | None = DEFAULT_TIMEOUT
    #: JPEGs are DCT-downscaled while decoding to at least this many pixels a side; None: twice
    #: the model's input size (the same as query-side ``Encoder.encode_images``), 0: never.
    draft_size: int | None = None
    max_pixels: int = MAX_PIXELS
    text_batch_size: int = 256
    #: keep location out of the collection: ``gps_lat``/``gps_lon`` stay null (recorded in the
    #: manifest's source as ``no_gps``, which later syncs honour).
    no_gps: bool = False
    #: decode JPEGs on the GPU (nvjpeg, :mod:`indexing.gpu_decode`); None: when the encoder is on
    #: CUDA and most files are JPEGs, False: never.
    gpu_decode: bool | None = None

    def __post_init__(self) -> None:
        for name in ("batch_size", "shard_size", "text_batch_size", "max_pixels"):
            if getattr(self, name) < 1:
                raise ValueError(f"EmbedConfig.{name} must be >= 1, not {getattr(self, name)}")
        if self.workers is not None and self.workers < 0:
            raise ValueError(f"EmbedConfig.workers must be >= 0, not {self.workers}")


def same_model_unloaded(coll: Collection, config: EmbedConfig) -> bool:
    """Whether ``config`` names the collection's model, judged without loading it."""
    pretrained = default_pretrained(config.model, config.pretrained)
    if pretrained is not None and Path(pretrained).expanduser().is_file():
        pretrained = str(Path(pretrained).expanduser().resolve())
    return (config.model, pretrained) == (coll.model.name, coll.model.pretrained)


def embed_records(chunk: list[ImageRecord], encoder: Encoder, schema: pa.Schema, config: EmbedConfig,
                  stats: "ShardStats", progress: Progress | None) -> tuple[pa.Table, pa.Table, pa.Table]:
    """Decode and encode one chunk of records: its ``(images, captions, failures)`` tables."""
    draft = config.draft_size if config.draft_size is not None else 2 * encoder.image_size
    workers = default_workers(encoder.device.type) if config.workers is None else config.workers
    batches = gpu_batches(chunk, encoder, config.gpu_decode, batch_size=config.batch_size, workers=workers,
                          timeout=config.decode_timeout, draft_size=draft or None, max_pixels=config.max_pixels)
    if batches is None:
        batches = decode_batches(chunk, encoder.decode_transform, batch_size=config.batch_size, workers=workers,
                                 timeout=config.decode_timeout, draft_size=draft or None,
                                 pin_memory=encoder.device.type == "cuda", max_pixels=config.max_pixels)
    images, captions, failures = _embed_chunk(chunk, batches, encoder, schema, config, stats, progress)
    if failures.num_rows:
        log.warning("%d of %d images refused (listed in failures/)", failures.num_rows, len(chunk))
    return images, captions, failures


def embed_chunks(chunk_iter: Iterable[list[ImageRecord]], encoder: Encoder, schema: pa.Schema, config: EmbedConfig,
                 stats: "ShardStats", progress: Progress | None) -> Iterator[tuple[pa.Table, pa.Table, pa.Table]]:
    """:func:`embed_records` for each chunk (the sync engine writes the tables itself)."""
    for chunk in chunk_iter:
        yield embed_records(chunk, encoder, schema, config, stats, progress)


def committed_shards(coll: Collection) -> list[int]:
    """Remove the files an interrupted run left uncommitted; the committed shard numbers.

    Shards may be missing in the middle (a distributed run commits them out of order): every
    engine redoes exactly the missing ones."""
    removed = coll.remove_uncommitted()
    if removed:
        log.info("removed %d uncommitted files from an interrupted run", len(removed))
    return coll.shard_numbers(IMAGES_DIR)


def embed_shard(coll: Collection, number: int, chunk: list[ImageRecord], encoder: Encoder, config: EmbedConfig,
                schema: pa.Schema, stats: "ShardStats", progress: Progress | None) -> dict[str, int]:
    """Decode, encode and commit shard ``number`` (``chunk``: its records); the rows written per kind.

    The one shard writer of every engine (local loop, Ray actors)."""
    images, captions, failures = embed_records(chunk, encoder, schema, config, stats, progress)
    coll.write_shard(number, images, captions, failures)
    return {"images": images.num_rows, "captions": captions.num_rows, "failures": failures.num_rows}


def counts_on_disk(coll: Collection) -> dict[str, int]:
    """Rows per kind and committed shards, from the Parquet footers."""
    return {"images": coll.count(IMAGES_DIR), "captions": coll.count(CAPTIONS_DIR),
            "failures": coll.count(FAILURES_DIR), "shards": len(coll.shard_paths(IMAGES_DIR))}


def chunks(records: Iterable[ImageRecord], size: int) -> Iterator[list[ImageRecord]]:
    it = iter(records)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


@dataclass
class ShardStats:
    """Images done (and refused) so far, for the progress callback; ``skipped``: committed earlier."""

    start: float
    skipped: int
    total: int | None
    failures: int
    done: int = 0

    def report(self, progress: Progress | None) -> None:
        if progress is None:
            return
        rate = self.done / max(time.perf_counter() - self.start, 1e-9)
        progress(self.skipped + self.done, self.total, **{"img/s": f"{rate:.1f}", "failures": self.failures})


def _embed_chunk(chunk: list[ImageRecord], batches: Iterator[DecodedBatch], encoder: Encoder, schema: pa.Schema,
                 config: EmbedConfig, stats: ShardStats, progress: Progress | None) -> tuple[pa.Table, pa.Table, pa.Table]:
    ok: list[int] = []
    sizes: list[tuple[int, int]] = []
    files: list[tuple[tuple[int, int] | None, str | None]] = []
    exif: list[dict[str, Any]] = []
    vectors: list[np.ndarray] = []
    cap_ids: list[int] = []
    cap_texts: list[str] = []
    cap_vectors: list[np.ndarray] = []
    failed: list[tuple[int, str, str]] = []
    for batch in batches:
        if batch.ok:
            vectors.append(encoder.encode_image_tensors(batch.pixels))
            texts = [(chunk[i].id, c) for i in batch.ok for c in chunk[i].captions]
            if texts:
                cap_vectors.append(encoder.encode_texts([t for _, t in texts], batch_size=config.text_batch_size))
                cap_ids += [i for i, _ in texts]
                cap_texts += [t for _, t in texts]
        ok += batch.ok
        sizes += batch.sizes
        files += batch.files
        exif += batch.exif
        for i, kind, message in batch.failures:
            log.info("refused %s: %s: %s", chunk[i].path, kind, message)
        failed += batch.failures
        stats.done += len(batch.ok) + len(batch.failures)
        stats.failures += len(batch.failures)
        stats.report(progress)
    dim = encoder.dim
    images = _image_table([chunk[i] for i in ok], sizes, _stack(vectors, dim), schema, files,
                          photo_columns([chunk[i].path for i in ok], exif, gps=not config.no_gps))
    captions = pa.table({"image_id": pa.array(cap_ids, pa.int64()), "caption": pa.array(cap_texts, pa.string()),
                         "embedding": embedding_array(_stack(cap_vectors, dim))})
    failures = pa.table({"path": pa.array([chunk[i].path for i, _, _ in failed], pa.string()),
                         "kind": pa.array([k for _, k, _ in failed], pa.string()),
                         "message": pa.array([m for _, _, m in failed], pa.string())})
    return images, captions, failures


def _stack(parts: list[np.ndarray], dim: int) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros((0, dim), np.float32)


def image_schema(dim: int, metadata: pa.Schema = pa.schema([])) -> pa.Schema:
    """Schema of an image shard: id, path, width, height, captions, <metadata...>, photo columns
    (:data:`vlsearch.data.photo.PHOTO_SCHEMA`), file columns (``vlsearch.store.collection.FILE_COLUMNS``),
    embedding."""
    return pa.schema([("id", pa.int64()), ("path", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
                      ("captions", pa.list_(pa.string())), *metadata, *PHOTO_SCHEMA,
                      ("file_size", pa.int64()), ("file_mtime_ns", pa.int64()), ("content_hash", pa.string()),
                      ("record_hash", pa.string()), ("embedding", embedding_type(dim))])


def file_columns(records: list[ImageRecord],
                 files: list[tuple[tuple[int, int] | None, str | None]] | None = None) -> dict[str, list[Any]]:
    """The file columns of ``records``: size, mtime, content hash and record hash of each.
    ``files``: ``(file_stat, content_hash)`` per record when the decode workers computed them."""
    if not files or len(files) != len(records):
        files = [(file_stat(r), content_hash(r)) for r in records]
    return {"file_size": [None if s is None else s[0] for s, _ in files],
            "file_mtime_ns": [None if s is None else s[1] for s, _ in files],
            "content_hash": [h for _, h in files],
            "record_hash": [record_hash(r) for r in records]}


def _image_table(records: list[ImageRecord], sizes: list[tuple[int, int]], vectors: np.ndarray,
                 schema: pa.Schema, files: list | None = None, photos: dict[str, list[Any]] | None = None) -> pa.Table:
    columns: dict[str, Any] = {
        "id": [r.id for r in records],
        "path": [r.path for r in records],
        "width": [w for w, _ in sizes],
        "height": [h for _, h in sizes],
        "captions": [list(r.captions) for r in records],
        **file_columns(records, files),
        **(photos or photo_columns([r.path for r in records], [None] * len(records))),
    }
    arrays = []
    for field in schema:
        if field.name == "embedding":
            arrays.append(embedding_array(vectors))
            continue
        values = columns[field.name] if field.name in columns else [r.metadata.get(field.name) for r in records]
        try:
            arrays.append(pa.array(values, type=field.type))
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise SourceError(f"metadata column {field.name!r} does not fit type {field.type}: {exc}") from exc
    return pa.Table.from_arrays(arrays, schema=schema)
