"""Version leases: a reader (in any process) that holds version N keeps N's files through any number
of syncs and compactions; once it lets go, or dies, the next writer's GC reclaims them."""

from __future__ import annotations

import signal
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
from process_support import wait_for_line
from test_live import _collection, _rows, _vectors

from vlsearch.core.errors import CollectionNotFoundError
from vlsearch.store import gc
from vlsearch.store.collection import Collection
from vlsearch.store.layout import IMAGES_DIR
from vlsearch.store.lease import lease_path, lease_version, leased_versions

#: A reader process: leases the collection's current version, says which, then on "read" reads
#: every row of that version (ids and vectors, shard by shard) and prints how many, their id sum
#: and a checksum of the vectors; it exits on "exit" or end of input.
READER = """
import sys
import numpy as np
from vlsearch.store.collection import Collection
coll = Collection.open(sys.argv[1], lease=True)
print("leased", coll.manifest.version, flush=True)
for line in sys.stdin:
    if line.strip() != "read":
        break
    ids, vectors = coll.read_embeddings()
    print("rows", len(ids), int(ids.sum()), f"{float(vectors.sum()):.3f}", flush=True)
"""


def _churn(coll: Collection, seed: int) -> None:
    """Three syncs' worth of changes (adds and deletes, each a new version) and a compaction."""
    for step in range(3):
        ids = coll.read_embeddings()[0]
        new = np.arange(5, dtype=np.int64) + 10 ** 6 * (seed + step + 1)
        coll.add(_rows(new, _vectors(5, seed + step)))
        coll.remove(ids[step * 40: step * 40 + 40])
    coll.compact()


def _files_of(coll: Collection) -> set:
    """The files on disk that the version ``coll`` has open reads."""
    return {p for p in gc.version_files(coll.path, coll.manifest) if p.is_file()}


def _reader(path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", READER, str(path)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0)


@pytest.mark.parametrize("end", ["exit", "kill -9"])
def test_a_reader_process_keeps_its_version_through_syncs_and_compact_until_it_is_gone(tmp_path, end):
    coll = _collection(tmp_path / "c", factory="IVF8,Flat")
    ids, vectors = coll.read_embeddings()
    proc = _reader(coll.path)
    try:
        version = int(wait_for_line(proc, r"^leased (\d+)", 60).group(1))
        assert version == coll.manifest.version and leased_versions(coll.path) == [version]
        old_files = _files_of(coll)
        _churn(coll, seed=1)
        assert Collection.open(coll.path).manifest.version == version + 7
        assert all(p.is_file() for p in old_files)
        only_old = old_files - _files_of(Collection.open(coll.path))
        assert any(p.parent.name == IMAGES_DIR for p in only_old)  # compact rewrote shards N reads

        proc.stdin.write(b"read\n")
        m = wait_for_line(proc, r"^rows (\d+) (-?\d+) (\S+)", 60)
        assert (int(m.group(1)), int(m.group(2))) == (len(ids), int(ids.sum()))  # every row of version N
        assert m.group(3) == f"{float(vectors.sum()):.3f}"
        versions_between = [v for v in range(version + 1, version + 7)]
        assert not any(lease_path(coll.path, v).exists() for v in versions_between)  # nobody leased those: gone
        with pytest.raises(CollectionNotFoundError):
            Collection.open(coll.path, version=version + 1)
    finally:
        if end == "exit":
            proc.stdin.close()
        else:
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    assert leased_versions(coll.path) == []
    coll.remove(coll.read_embeddings()[0][:1])  # the next writer's GC
    assert not any(p.exists() for p in only_old)
    assert not lease_path(coll.path, version).exists()
    with pytest.raises(CollectionNotFoundError, match=f"no longer keeps version {version}"):
        Collection.open(coll.path, version=version)


def test_gc_keeps_the_current_and_leased_versions_only(tmp_path):
    coll = _collection(tmp_path / "c", factory=None)
    first = coll.manifest.version
    held = Collection.open(coll.path, lease=True)
    coll.remove(coll.read_embeddings()[0][:10])
    middle = coll.manifest.version
    coll.remove(coll.read_embeddings()[0][:10])
    coll.compact()
    # the held version stays whole; the unleased middle version (not "the previous one") is gone
    assert held.read_embeddings()[0].shape == (400,)
    with pytest.raises(CollectionNotFoundError):
        Collection.open(coll.path, version=middle)
    pinned = Collection.open(coll.path, version=first, lease=True)  # an older version, leased by version
    held.release()
    assert held.lease.held is False and leased_versions(coll.path) == [first]
    coll.remove(coll.read_embeddings()[0][:1])
    assert pinned.read_embeddings()[0].shape == (400,)  # still held through the second lease
    pinned.release()
    coll.remove(coll.read_embeddings()[0][:1])
    with pytest.raises(CollectionNotFoundError):
        Collection.open(coll.path, version=first)
    assert sorted(p.name for p in (coll.path / "versions").iterdir()) == [f"v{coll.manifest.version:06d}.json"]


def test_a_lease_dropped_without_release_is_freed_by_garbage_collection_of_its_holder(tmp_path):
    import gc as python_gc

    coll = _collection(tmp_path / "c", factory=None)
    version = coll.manifest.version
    reader = Collection.open(coll.path, lease=True)
    assert leased_versions(coll.path) == [version]
    del reader
    python_gc.collect()
    assert leased_versions(coll.path) == []


def test_leasing_a_version_that_a_gc_removed_meanwhile_moves_to_the_current_one(tmp_path, monkeypatch):
    """The race the protocol closes: a reader reads manifest.json (version N), a writer commits N+1
    and collects N before the reader's lock lands; the reader must not come back with N."""
    import vlsearch.store.lease as lease_module

    coll = _collection(tmp_path / "c", factory=None)
    stale = coll.manifest.version
    real_read = lease_module.read_manifest
    calls = []

    def read_then_write(directory, version=None):
        manifest = real_read(directory, version)
        if not calls:  # the first read is overtaken by a write and its GC
            calls.append(manifest.version)
            Collection.open(directory).remove(coll.read_embeddings()[0][:5])
        return manifest

    monkeypatch.setattr(lease_module, "read_manifest", read_then_write)
    manifest, lease = lease_version(coll.path)
    assert calls == [stale] and manifest.version == stale + 1 and lease.version == stale + 1
    lease.release()


def test_a_read_only_collection_is_read_without_a_lease(tmp_path, monkeypatch):
    """Where the lease file cannot be created (a read-only mount, another user's collection),
    reading still works: nobody can garbage-collect such a collection either."""
    import errno
    import os

    import vlsearch.store.lease as lease_module

    coll = _collection(tmp_path / "c", factory=None)
    real_open = os.open

    def read_only(path, flags, *args):
        if str(path).endswith(".lease"):
            raise PermissionError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(lease_module.os, "open", read_only)
    reader = Collection.open(coll.path, lease=True)
    assert reader.lease is not None and not reader.lease.held
    assert reader.read_embeddings()[0].shape == (400,)


def test_shards_of_unleased_versions_go_at_once(tmp_path):
    coll = _collection(tmp_path / "c", factory=None)
    before = {p.name for p in (coll.path / IMAGES_DIR).iterdir()}
    coll.remove(coll.read_embeddings()[0][:100])  # shard 0 is all dead
    coll.compact()
    after = {p.name for p in (coll.path / IMAGES_DIR).iterdir()}
    live = {p.name for p in Collection.open(coll.path).shard_paths()}
    assert after == live and before != after  # no "previous version" kept when nobody reads it
    assert sum(pq.ParquetFile(coll.path / IMAGES_DIR / n).metadata.num_rows for n in live) == 300
