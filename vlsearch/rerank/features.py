"""Candidate image features for re-ranking: stored in the collection, or recomputed from the files.

The ITM head (:mod:`vlsearch.rerank.model`) needs each candidate's projected image tokens (keys/values,
``GRID*GRID x width``), and a re-ranker with a hubness bank each candidate's hubness offset (one
float). Two ways to get them, chosen per :class:`CandidateFeatures` ``mode``:

* **stored** (opt-in, ``vlsearch embed --rerank-features`` or ``vlsearch rerank-features``):
  written once per image shard, in the collection's own ``rerank/`` folder::

      rerank/features.json     {"format": 1, "reranker": digest, "towers": {...}, "tokens": 49,
                                "width": 256, "dtype": "float16", "hub": true,
                                "shards": {"3": {"rows": 10000, "ids_sha1": "..."}}}
      rerank/part-00003.npy    (rows, tokens, width) float16, row i = row i of images/part-00003.parquet
      rerank/hub.part-00003.npy  (rows,) float32 hubness offsets, from the shard's own embeddings

  25.1 KB per image at 49 x 256 fp16 (vlsearch-small's shipped re-ranker; 12.8 KB at a 5 x 5
  grid); memory-mapped, so a query reads only its K candidates.
  The manifest and the image shards are untouched (readers that know nothing of re-ranking work
  as before). A shard whose ids no longer match (rewritten by a sync) counts as missing.
* **recomputed**: the candidate images are decoded from their source files (the source root
  recorded in the manifest) and run through the image trunk at query time (which also gives the
  image vectors the hubness offsets come from).

``mode="auto"`` uses stored features where they exist and recomputes the rest.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import pyarrow.parquet as pq
import torch

from vlsearch.store.layout import IMAGES_DIR, shard_number
from vlsearch.store.collection import Collection
from vlsearch.store.arrays import embeddings_to_numpy
from vlsearch.core.errors import DecodeError, RerankFeaturesError, RerankerMismatchError
from vlsearch.core.fsutil import atomic_path, write_json
from vlsearch.core.progress import Progress
from vlsearch.rerank.model import Reranker, image_tokens

__all__ = ["RERANK_DIR", "FEATURES_FILE", "MODES", "CandidateFeatures", "store_rerank_features", "stored_info",
           "image_file"]

RERANK_DIR = "rerank"
FEATURES_FILE = "features.json"
FEATURES_FORMAT = 1
MODES = ("auto", "stored", "recompute")
_HOW = ("store them with `vlsearch rerank-features {path}` (or embed with --rerank-features)")


def stored_info(collection: Collection) -> dict[str, Any] | None:
    """The ``rerank/features.json`` of a collection (None when it stores no re-rank features)."""
    path = collection.path / RERANK_DIR / FEATURES_FILE
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise RerankFeaturesError(f"cannot read {path}: {exc}") from exc
    if info.get("format") != FEATURES_FORMAT:
        raise RerankFeaturesError(f"{path} has format {info.get('format')!r}; this vlsearch reads {FEATURES_FORMAT}")
    return info


def _ids_sha1(ids: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(ids, dtype=np.int64).tobytes()).hexdigest()


def image_file(source: dict[str, Any], rel: str) -> str:
    """The file of a record's ``path`` under the collection's source (folder or manifest source);
    a path that resolves outside the source root is refused."""
    kind, root = source.get("type"), source.get("path")
    if kind not in ("folder", "manifest") or not root or not rel:
        raise RerankFeaturesError(
            f"the collection's source ({kind or 'unknown'}) gives no image files to recompute re-rank features from")
    base = os.path.realpath(root if kind == "folder" else os.path.dirname(root))
    path = os.path.realpath(os.path.join(base, rel))
    if os.path.commonpath([path, base]) != base:
        raise RerankFeaturesError(f"image {rel!r} lies outside the collection's source {base}")
    return path


def store_rerank_features(collection: Collection, reranker: Reranker, encoder: Any, batch_size: int = 64,
                          progress: Optional[Progress] = None) -> dict[str, Any]:
    """Compute and store the projected image tokens of every live image shard lacking them (for
    this re-ranker), decoding the images from the source. Rows whose image cannot be read now
    (it was readable when embedded) are stored as zeros, and re-ranked from those zeros if they
    become candidates. Returns the written ``features.json``. Holds the collection's writer lock."""
    reranker.check_model(collection.model)
    folder = collection.path / RERANK_DIR
    with collection.lock():
        info = stored_info(collection)
        hub = reranker.bank is not None
        if info is None or info.get("reranker") != reranker.digest:
            info = {"format": FEATURES_FORMAT, "reranker": reranker.digest, "towers": reranker.towers,
                    "tokens": reranker.tokens, "width": reranker.width, "dtype": "float16", "hub": hub,
                    "shards": {}}
        paths = collection.shard_paths(IMAGES_DIR)
        for done, path in enumerate(paths):
            table = pq.read_table(path, columns=["id", "path"])
            ids = table.column("id").to_numpy().astype(np.int64)
            entry = {"rows": len(ids), "ids_sha1": _ids_sha1(ids)}
            key = str(shard_number(path))
            if info["shards"].get(key) != entry or not all(f.is_file() for f in _shard_files(folder, path, hub)):
                kv = _project_files(collection, reranker, encoder, table.column("path").to_pylist(), batch_size)
                arrays = [kv]
                if hub:
                    # read only for shards being (re)written: embeddings are most of a shard's bytes
                    vectors = embeddings_to_numpy(pq.read_table(path, columns=["embedding"]).column(0))
                    arrays.append(reranker.hub_offsets(vectors))
                for file, array in zip(_shard_files(folder, path, hub), arrays):
                    with atomic_path(file) as tmp:
                        with open(tmp, "wb") as fh:
                            np.save(fh, array)
                info["shards"][key] = entry
                write_json(folder / FEATURES_FILE, info)
            if progress is not None:
                progress(done + 1, len(paths), stage="rerank-features")
        write_json(folder / FEATURES_FILE, info)
    return info


def _shard_files(folder: Path, shard: Path, hub: bool) -> list[Path]:
    """The stored files of an image shard: keys/values, and hubness offsets when ``hub``."""
    return [folder / f"{shard.stem}.npy"] + ([folder / f"hub.{shard.stem}.npy"] if hub else [])


def _project_files(collection: Collection, reranker: Reranker, encoder: Any, rels: Sequence[str],
                   batch_size: int) -> np.ndarray:
    out = np.zeros((len(rels), reranker.tokens, reranker.width), np.float16)
    source = collection.manifest.source
    for start in range(0, len(rels), batch_size):
        files = [image_file(source, r) for r in rels[start: start + batch_size]]
        try:
            out[start: start + len(files)] = reranker.image_kv(image_tokens(encoder, files, reranker.grid)).numpy()
        except (DecodeError, OSError):  # one bad file: do this batch one by one
            for j, f in enumerate(files):
                try:
                    out[start + j] = reranker.image_kv(image_tokens(encoder, [f], reranker.grid)).numpy()[0]
                except (DecodeError, OSError):
                    pass
    return out


class CandidateFeatures:
    """Projected image tokens of candidate ids for one searcher (thread-safe).

    ``locate(ids) -> (shard index, row, found)`` and ``records(shards, rows) -> [record]`` come
    from the searcher's row map and metadata reader; ``paths`` are its live image shards."""

    def __init__(self, collection: Collection, reranker: Reranker, encoder: Callable[[], Any],
                 paths: Sequence[Path], locate: Callable, records: Callable, mode: str = "auto"):
        if mode not in MODES:
            raise ValueError(f"rerank features mode must be one of {MODES}, not {mode!r}")
        self.collection, self.reranker, self._encoder = collection, reranker, encoder
        self._locate, self._records, self.mode = locate, records, mode
        self._lock = threading.Lock()
        self._stored: list[np.ndarray | None] = [None] * len(paths)
        self._hub: list[np.ndarray | None] = [None] * len(paths)
        if mode != "recompute":
            self._open_stored(paths)
        if mode == "stored" and any(s is None for s in self._stored):
            missing = sum(s is None for s in self._stored)
            raise RerankFeaturesError(
                f"collection {collection.path} has no stored re-rank features for {missing} of its {len(paths)} "
                f"shard(s) (for this re-ranker): " + _HOW.format(path=collection.path))

    def _open_stored(self, paths: Sequence[Path]) -> None:
        info = stored_info(self.collection)
        if info is None:
            return
        if info.get("reranker") != self.reranker.digest:
            if self.mode == "stored":
                raise RerankerMismatchError(
                    f"the re-rank features stored in {self.collection.path} were made by another re-ranker "
                    f"({info.get('reranker')}, not {self.reranker.digest}): " + _HOW.format(path=self.collection.path))
            return
        hub = self.reranker.bank is not None
        for i, path in enumerate(paths):
            entry = info["shards"].get(str(shard_number(path)))
            files = _shard_files(self.collection.path / RERANK_DIR, path, hub)
            if entry is None or not all(f.is_file() for f in files):
                continue
            ids = pq.read_table(path, columns=["id"]).column("id").to_numpy().astype(np.int64)
            if entry == {"rows": len(ids), "ids_sha1": _ids_sha1(ids)}:
                self._stored[i] = np.load(files[0], mmap_mode="r")
                self._hub[i] = np.load(files[1]) if hub else None

    @property
    def stored_shards(self) -> int:
        return sum(s is not None for s in self._stored)

    def candidates(self, ids: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
        """Keys/values ``(len(ids), tokens, width)`` float16 and hubness offsets ``(len(ids),)``
        float32 (zeros when the re-ranker has no bank) of these (live) image ids."""
        shard, row, found = self._locate(np.asarray(ids, np.int64))
        if not found.all():
            raise RerankFeaturesError(f"image id {int(np.asarray(ids)[~found][0])} is not in the collection")
        out = np.empty((len(ids), self.reranker.tokens, self.reranker.width), np.float16)
        hub = np.zeros(len(ids), np.float32)
        todo = []
        for j, (s, r) in enumerate(zip(shard, row)):
            stored = self._stored[s]
            if stored is None:
                todo.append(j)
            else:
                out[j] = stored[r]
                if self._hub[s] is not None:
                    hub[j] = self._hub[s][r]
        if todo:
            out[todo], hub[todo] = self._recompute(shard[todo], row[todo], np.asarray(ids)[todo])
        return torch.from_numpy(out), hub

    def _recompute(self, shard: np.ndarray, row: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.mode == "stored":  # pragma: no cover - refused at construction
            raise RerankFeaturesError("stored re-rank features are missing: " + _HOW.format(path=self.collection.path))
        records = self._records(shard, row)
        try:
            files = [image_file(self.collection.manifest.source, rec.get("path")) for rec in records]
            tokens, emb = image_tokens(self._encoder(), files, self.reranker.grid, with_embeddings=True)
            return self.reranker.image_kv(tokens).numpy(), self.reranker.hub_offsets(emb)
        except (DecodeError, OSError) as exc:
            raise RerankFeaturesError(
                f"cannot recompute re-rank features of image {int(ids[0])}.. from its source file ({exc}): "
                + _HOW.format(path=self.collection.path)) from exc
