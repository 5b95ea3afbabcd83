"""Garbage collection: remove the files that neither the current version nor any version a reader
leases (:mod:`vlsearch.store.lease`) references: shards and indexes of a crashed or superseded
write, old version manifests, temp files. Call these only while holding the collection's writer lock."""

from __future__ import annotations

import shutil
from pathlib import Path

from vlsearch.store.layout import (
    CAPTIONS_DIR, FAILURES_DIR, IMAGES_DIR, INDEX_FILE, LEASES_DIR, MANIFEST, SHARD_FILE_RE, TOMBSTONES_DIR, VERSIONS_DIR,
    shard_name, version_name,
)
from vlsearch.store.keyword.index import KEYWORD_DIR, keyword_path
from vlsearch.store.lease import FreeVersion, claim_if_free, leased_versions
from vlsearch.store.manifest import Manifest, manifest_path, read_manifest
from vlsearch.store.shards import ShardFiles

SHARD_KINDS = (IMAGES_DIR, CAPTIONS_DIR, FAILURES_DIR)
#: index entry fields naming files beside the index file itself
INDEX_FILE_FIELDS = ("rows_file", "rows_ids_file", "refine_file", "refine_ids_file", "ivfdata")


def version_files(directory: Path, manifest: Manifest) -> set[Path]:
    """The files version ``manifest`` of the collection at ``directory`` reads."""
    keep = {directory / VERSIONS_DIR / version_name(manifest.version, ".json")}
    for n in manifest.shards or ():
        keep.update(directory / kind / shard_name(n) for kind in SHARD_KINDS)
        keyword = keyword_path(directory, n)  # a directory: it and the files in it
        keep.add(keyword)
        if keyword.is_dir():
            keep.update(keyword.iterdir())
    if manifest.tombstones:
        keep.add(directory / TOMBSTONES_DIR / manifest.tombstones)
    entry = manifest.index or {}
    keep.add(directory / (entry.get("file") or INDEX_FILE))
    keep.update(directory / entry[f] for f in INDEX_FILE_FIELDS if entry.get(f))
    return keep


def referenced_files(directory: Path, manifest: Manifest) -> set[Path]:
    """Files version ``manifest`` and every version a reader leases now need (shards, tombstones,
    index, manifests)."""
    keep = {directory / MANIFEST, *version_files(directory, manifest)}
    for version in leased_versions(directory):
        if version != manifest.version and manifest_path(directory, version).is_file():
            keep |= version_files(directory, read_manifest(directory, version))
    return keep


def collect_garbage(directory: Path, manifest: Manifest) -> list[Path]:
    """Delete what neither ``manifest`` nor any leased version references; the removed paths.

    Each older version no reader leases is claimed (an exclusive lock on its lease file) while
    its files go: its ``versions/vN.json`` first, so that a GC cut short never leaves a version
    that looks whole, then the files no kept version references, then its lease file."""
    if manifest.shards is None:
        return remove_uncommitted(directory, manifest)
    keep = {directory / MANIFEST, *version_files(directory, manifest)}
    claims: list[FreeVersion] = []
    try:
        for version in _other_versions(directory, manifest.version):
            claim = claim_if_free(directory, version)
            if claim is not None:
                claims.append(claim)
            elif manifest_path(directory, version).is_file():
                keep |= version_files(directory, read_manifest(directory, version))
        removed = [manifest_path(directory, c.version) for c in claims if manifest_path(directory, c.version).is_file()]
        for p in removed:
            p.unlink()
        removed += _remove_unkept(directory, keep)
    finally:
        for claim in claims:
            claim.drop()
    return removed


def _other_versions(directory: Path, current: int) -> list[int]:
    """Versions other than ``current`` with a manifest under ``versions/`` or a lease file."""
    found = {int(p.stem[1:]) for folder, pattern in ((VERSIONS_DIR, "v*.json"), (LEASES_DIR, "v*.lease"))
             if (directory / folder).is_dir() for p in (directory / folder).glob(pattern) if p.stem[1:].isdigit()}
    return sorted(found - {current})


def _remove_unkept(directory: Path, keep: set[Path]) -> list[Path]:
    candidates = [p for kind in (*SHARD_KINDS, TOMBSTONES_DIR, VERSIONS_DIR)
                  if (directory / kind).is_dir() for p in (directory / kind).iterdir()]
    candidates += [p for p in directory.iterdir()
                   if p.suffix in (".faiss", ".ivfdata") or p.name.endswith(".tmp") or p.name.startswith("vectors-")]
    removed = [p for p in candidates if p.is_file() and p not in keep]
    for p in removed:
        p.unlink()
    return removed + _remove_keyword_dirs(directory, keep)


def _remove_keyword_dirs(directory: Path, keep: set[Path] | None = None,
                         committed: set[int] | None = None) -> list[Path]:
    """Remove the keyword index directories (:mod:`vlsearch.store.keyword`) not in ``keep`` (or whose
    shard is not in ``committed``), and temporary ones a crash left."""
    folder = directory / KEYWORD_DIR
    if not folder.is_dir():
        return []
    removed = []
    for p in folder.iterdir():
        number = p.name[5:] if p.name.startswith("part-") else ""
        if keep is not None:
            stale = p not in keep
        else:
            stale = not number.isdigit() or int(number) not in (committed or set())
        if stale or p.name.endswith(".tmp"):
            shutil.rmtree(p) if p.is_dir() else p.unlink()
            removed.append(p)
    return removed


def remove_uncommitted(directory: Path, manifest: Manifest) -> list[Path]:
    """Delete caption/failure shards and temp files left by a crash before their images shard."""
    committed = set(ShardFiles(directory, manifest).shard_numbers(IMAGES_DIR))
    removed = []
    for kind in (CAPTIONS_DIR, FAILURES_DIR, IMAGES_DIR):
        folder = directory / kind
        if not folder.is_dir():
            continue
        for p in folder.iterdir():
            m = SHARD_FILE_RE.match(p.name)
            orphan = m is not None and int(m.group(1)) not in committed
            if orphan or p.name.endswith(".tmp"):
                p.unlink()
                removed.append(p)
    return removed + _remove_keyword_dirs(directory, committed=committed)
