"""The on-disk collection format — the one reader/writer used by indexer, searcher, benchmarks, tests.

::

    my-collection/
      manifest.json               versioned; model, dim, metric, counts, source, index, times
      images/part-00000.parquet   id, path, width, height, captions, <metadata...>, embedding
      captions/part-00000.parquet image_id, caption, embedding
      failures/part-00000.parquet path, kind, message
      index.faiss                 (built by indexing.build; described in manifest["index"])

Embeddings are stored as ``fixed_size_list<float16>[dim]``: half the disk and I/O of float32,
and the rounding (relative error ~5e-4 on unit vectors) is far below the score gaps that decide
a ranking. Readers hand out float32.

Shard ``k`` holds the source records ``[k*shard_size, (k+1)*shard_size)`` (failures included),
so resuming after a crash means skipping ``complete_shards * shard_size`` records. A shard is
committed when its ``images/`` file exists; its captions and failures files are written first.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import CollectionError, CollectionMismatchError, CollectionNotFoundError
from .fsutil import atomic_path, write_json
from .modelinfo import ModelInfo

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
INDEX_FILE = "index.faiss"
IMAGES_DIR, CAPTIONS_DIR, FAILURES_DIR = "images", "captions", "failures"
EMBEDDING_DTYPE = "float16"
#: Columns every image shard has; any other column (except ``embedding``) is user metadata.
IMAGE_COLUMNS = ("id", "path", "width", "height", "captions")
_SHARD_RE = re.compile(r"^part-(\d{5,})\.parquet$")


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def shard_name(number: int) -> str:
    return f"part-{number:05d}.parquet"


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


@dataclass(frozen=True)
class Manifest:
    """``manifest.json``: everything that defines a collection and how it was made."""

    model: ModelInfo
    metric: str = "ip"
    embedding_dtype: str = EMBEDDING_DTYPE
    shard_size: int = 10_000
    source: dict[str, Any] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=lambda: {"images": 0, "captions": 0, "failures": 0, "shards": 0})
    complete: bool = False
    index: dict[str, Any] | None = None
    #: precision the embeddings were computed in (fp32, bf16, int8...; ``a+b`` when a resumed run
    #: changed it); None in collections written before it was recorded. Stored vectors are fp16 either way.
    precision: str | None = None
    created_at: str = field(default_factory=now_iso)
    updated_at: str = field(default_factory=now_iso)
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "model": self.model.to_dict(),
            "metric": self.metric,
            "embedding_dtype": self.embedding_dtype,
            "shard_size": self.shard_size,
            "counts": dict(self.counts),
            "complete": self.complete,
            "source": self.source,
            "index": self.index,
            **({"precision": self.precision} if self.precision else {}),
            "created_at": self.created_at,
            "updated_at": self.updated_at,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Manifest":
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise CollectionError(
                f"collection format version {version!r} is not supported (this vlsearch reads {FORMAT_VERSION})"
            )
        return cls(
            model=ModelInfo.from_dict(data["model"]),
            metric=data.get("metric", "ip"),
            embedding_dtype=data.get("embedding_dtype", EMBEDDING_DTYPE),
            shard_size=int(data.get("shard_size", 10_000)),
            source=data.get("source") or {},
            counts=data.get("counts") or {},
            complete=bool(data.get("complete", False)),
            index=data.get("index"),
            precision=data.get("precision"),
            created_at=data.get("created_at", now_iso()),
            updated_at=data.get("updated_at", now_iso()),
            format_version=version,
        )


class Collection:
    """A collection directory: manifest, shards and (optionally) an index. Cheap to open."""

    def __init__(self, path: str | os.PathLike, manifest: Manifest):
        self.path = Path(path)
        self.manifest = manifest

    # ---- opening / creating -------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike) -> "Collection":
        """Open an existing collection; raises CollectionNotFoundError / CollectionError."""
        path = Path(path)
        mpath = path / MANIFEST
        if not mpath.is_file():
            raise CollectionNotFoundError(f"no collection at {path} (missing {MANIFEST})")
        try:
            data = json.loads(mpath.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise CollectionError(f"cannot read {mpath}: {exc}") from exc
        return cls(path, Manifest.from_dict(data))

    @classmethod
    def create(cls, path: str | os.PathLike, manifest: Manifest) -> "Collection":
        """Create the directory and write a first manifest (refuses to overwrite one)."""
        path = Path(path)
        if (path / MANIFEST).exists():
            raise CollectionError(f"a collection already exists at {path}")
        path.mkdir(parents=True, exist_ok=True)
        coll = cls(path, manifest)
        coll.save_manifest()
        return coll

    # ---- manifest ------------------------------------------------------------------------
    @property
    def model(self) -> ModelInfo:
        return self.manifest.model

    @property
    def dim(self) -> int:
        return self.manifest.model.dim

    def save_manifest(self) -> None:
        write_json(self.path / MANIFEST, self.manifest.to_dict())

    def update_manifest(self, **changes: Any) -> Manifest:
        """Replace fields of the manifest, stamp ``updated_at`` and write it atomically."""
        self.manifest = replace(self.manifest, updated_at=now_iso(), **changes)
        self.save_manifest()
        return self.manifest

    def check_model(self, model: ModelInfo, *, what: str = "model") -> None:
        """Refuse a model whose embedding space differs from the collection's."""
        mine = self.manifest.model
        if (model.name, model.pretrained, model.dim) != (mine.name, mine.pretrained, mine.dim):
            raise CollectionMismatchError(
                f"{what} {model.name} (pretrained={model.pretrained}, dim={model.dim}) does not match "
                f"collection {self.path}, built with {mine.name} (pretrained={mine.pretrained}, dim={mine.dim}); "
                "embeddings from different models are not comparable"
            )

    # ---- shards --------------------------------------------------------------------------
    @property
    def index_path(self) -> Path:
        return self.path / INDEX_FILE

    def has_index(self) -> bool:
        return self.manifest.index is not None and self.index_path.is_file()

    def shard_paths(self, kind: str = IMAGES_DIR) -> list[Path]:
        """Committed shard files of ``kind`` (images, captions or failures), in order."""
        folder = self.path / kind
        if not folder.is_dir():
            return []
        return sorted(p for p in folder.iterdir() if _SHARD_RE.match(p.name))

    def shard_numbers(self, kind: str = IMAGES_DIR) -> list[int]:
        return [int(_SHARD_RE.match(p.name).group(1)) for p in self.shard_paths(kind)]

    def write_shard(
        self,
        number: int,
        images: pa.Table,
        captions: pa.Table | None = None,
        failures: pa.Table | None = None,
    ) -> None:
        """Write shard ``number`` atomically; the images file is written last and commits it."""
        if captions is not None:
            _write_table(self.path / CAPTIONS_DIR / shard_name(number), captions)
        if failures is not None:
            _write_table(self.path / FAILURES_DIR / shard_name(number), failures)
        _write_table(self.path / IMAGES_DIR / shard_name(number), images)

    def remove_uncommitted(self) -> list[Path]:
        """Delete caption/failure shards and temp files left by a crash before their images shard."""
        committed = set(self.shard_numbers(IMAGES_DIR))
        removed = []
        for kind in (CAPTIONS_DIR, FAILURES_DIR, IMAGES_DIR):
            folder = self.path / kind
            if not folder.is_dir():
                continue
            for p in folder.iterdir():
                m = _SHARD_RE.match(p.name)
                orphan = m is not None and int(m.group(1)) not in committed
                if orphan or p.name.endswith(".tmp"):
                    p.unlink()
                    removed.append(p)
        return removed

    # ---- reading -------------------------------------------------------------------------
    def read_table(self, kind: str = IMAGES_DIR, columns: Sequence[str] | None = None) -> pa.Table:
        """Read all shards of ``kind`` (only ``columns``); fine for metadata, not for 1M embeddings."""
        paths = self.shard_paths(kind)
        if not paths:
            return pa.table({}) if columns is None else pa.table({c: [] for c in columns})
        return pa.concat_tables([pq.read_table(p, columns=list(columns) if columns else None) for p in paths],
                                promote_options="permissive")

    def failures(self) -> pa.Table:
        return self.read_table(FAILURES_DIR)

    def iter_embeddings(
        self, kind: str = IMAGES_DIR, batch_size: int = 65_536, id_column: str | None = None
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Stream ``(ids int64, vectors float32 (B, dim))`` over all shards with bounded memory.

        ``id_column`` defaults to ``id`` for images and ``image_id`` for captions.
        """
        id_column = id_column or ("id" if kind == IMAGES_DIR else "image_id")
        for path in self.shard_paths(kind):
            pf = pq.ParquetFile(path)
            for batch in pf.iter_batches(batch_size=batch_size, columns=[id_column, "embedding"]):
                ids = batch.column(0).to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
                yield ids, embeddings_to_numpy(batch.column(1))

    def read_embeddings(self, kind: str = IMAGES_DIR, id_column: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """All ``(ids, vectors)`` of ``kind`` in memory at once (small collections, benchmarks)."""
        parts = list(self.iter_embeddings(kind, id_column=id_column))
        if not parts:
            return np.zeros(0, np.int64), np.zeros((0, self.dim), np.float32)
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def count(self, kind: str = IMAGES_DIR) -> int:
        """Row count from Parquet footers (reads no data)."""
        return sum(pq.ParquetFile(p).metadata.num_rows for p in self.shard_paths(kind))

    def __repr__(self) -> str:
        m = self.manifest
        return f"Collection({str(self.path)!r}, model={m.model.name}, dim={m.model.dim}, images={m.counts.get('images')})"


def _write_table(path: Path, table: pa.Table) -> None:
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, row_group_size=4096, compression="zstd")
