"""``Manifest``: ``manifest.json`` and ``versions/vNNNNNN.json``, read and written atomically."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

from vlsearch.core.errors import CollectionError, CollectionNotFoundError
from vlsearch.core.fsutil import write_json
from vlsearch.core.modelinfo import ModelInfo
from vlsearch.store.layout import (
    EMBEDDING_DTYPE, FORMAT_VERSION, MANIFEST, READABLE_FORMATS, VERSIONS_DIR, now_iso, version_name,
)


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
    #: Collection version: 0 while first embedding, +1 per committed change (sync, compact, build).
    version: int = 0
    #: Live image shard numbers of this version; None: every committed shard on disk (format 1,
    #: or a first embedding in progress).
    shards: tuple[int, ...] | None = None
    #: File under ``tombstones/`` listing the deleted rows of this version, or None.
    tombstones: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "version": self.version,
            "shards": None if self.shards is None else list(self.shards),
            "tombstones": self.tombstones,
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

    def next_version(self, live_shards: Sequence[int], **changes: Any) -> "Manifest":
        """The manifest of the next version: ``version + 1``, format 2, ``changes`` applied, and the
        live shard list made explicit (``live_shards`` when this manifest lists none)."""
        shards = self.shards if self.shards is not None else tuple(live_shards)
        return replace(self, updated_at=now_iso(), format_version=FORMAT_VERSION, version=self.version + 1,
                       **{"shards": shards, **changes})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Manifest":
        version = data.get("format_version")
        if version not in READABLE_FORMATS:
            raise CollectionError(
                f"collection format version {version!r} is not supported (this vlsearch reads {READABLE_FORMATS})"
            )
        shards = data.get("shards")
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
            version=int(data.get("version", 1 if data.get("complete") else 0)),
            shards=None if shards is None else tuple(int(n) for n in shards),
            tombstones=data.get("tombstones"),
        )



def manifest_path(directory: Path, version: int | None = None) -> Path:
    """``manifest.json`` (the current version) or ``versions/vNNNNNN.json``."""
    return directory / MANIFEST if version is None else directory / VERSIONS_DIR / version_name(version, ".json")


def read_manifest(directory: Path, version: int | None = None) -> Manifest:
    """The current manifest of the collection at ``directory``, or that of an earlier ``version``
    still kept; raises CollectionNotFoundError / CollectionError."""
    if not (directory / MANIFEST).is_file():
        raise CollectionNotFoundError(f"no collection at {directory} (missing {MANIFEST})")
    path = manifest_path(directory, version)
    if version is not None and not path.is_file():
        raise CollectionNotFoundError(f"collection {directory} no longer keeps version {version}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise CollectionError(f"cannot read {path}: {exc}") from exc
    return Manifest.from_dict(data)


def write_manifest(directory: Path, manifest: Manifest, version_file: bool = False) -> None:
    """Write ``manifest.json`` atomically (first ``versions/vN.json`` when ``version_file``)."""
    if version_file:
        write_json(manifest_path(directory, manifest.version), manifest.to_dict())
    write_json(directory / MANIFEST, manifest.to_dict())
