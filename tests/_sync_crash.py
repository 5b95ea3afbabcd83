"""Run the ``vlsearch`` CLI but stop dead at one point of a sync, so a test can ``kill -9`` it there.

Usage: ``python tests/_sync_crash.py POINT MARKER embed SOURCE COLLECTION ...``. When the sync reaches
POINT the process creates the file MARKER and sleeps; the test then kills it. Points, in the order a
sync reaches them:

* ``shard``: the first new shard is written (no version references it yet);
* ``tombstones``: the new version's tombstone file is written;
* ``index``: the new version's index file is written;
* ``versions``: ``versions/vN.json`` is written, ``manifest.json`` is not yet renamed;
* ``committed``: ``manifest.json`` is renamed (version N+1 committed), before garbage collection.
"""

import sys
import time
from pathlib import Path

import faiss

import vlsearch.store.gc as gc
import vlsearch.store.manifest as manifest
import vlsearch.store.shards as shards
import vlsearch.store.tombstones as tombstones
from vlsearch.store.collection import Collection

POINT, MARKER = sys.argv[1], Path(sys.argv[2])
del sys.argv[1:3]
_start_version = Collection.open(sys.argv[3]).manifest.version  # argv: embed SOURCE COLLECTION ...


def stop() -> None:
    MARKER.write_text("reached")
    time.sleep(600)


def hook(owner, name, point, when=lambda *a, **k: True, before=False):
    """Stop in ``owner.name`` (before or after the real call) when POINT is ``point`` and ``when`` holds.
    Callers must look ``name`` up on ``owner`` at call time; a hook on a function nobody calls any more
    never stops, so the test's process finishes and the test fails."""
    real = getattr(owner, name)

    def wrapper(*args, **kwargs):
        reached = POINT == point and when(*args, **kwargs)
        if reached and before:
            stop()
        result = real(*args, **kwargs)
        if reached:
            stop()
        return result

    setattr(owner, name, wrapper)


hook(shards.ShardFiles, "write_shard", "shard")
hook(tombstones, "write_tombstones", "tombstones")
hook(faiss, "write_index", "index")
hook(manifest, "write_json", "versions", when=lambda path, data: Path(path).parent.name == "versions")
hook(gc, "collect_garbage", "committed", when=lambda directory, m: m.version > _start_version, before=True)

if __name__ == "__main__":
    from vlsearch.app.cli import app

    app(prog_name="vlsearch")
