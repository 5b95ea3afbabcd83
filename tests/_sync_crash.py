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

import vlsearch.store.collection as collection
import vlsearch.store.manifest as manifest
import vlsearch.store.update as update

POINT, MARKER = sys.argv[1], Path(sys.argv[2])
del sys.argv[1:3]


def stop() -> None:
    MARKER.write_text("reached")
    time.sleep(600)


def after(owner, name, point, when=lambda *a, **k: True):
    real = getattr(owner, name)

    def wrapper(*args, **kwargs):
        result = real(*args, **kwargs)
        if POINT == point and when(*args, **kwargs):
            stop()
        return result

    setattr(owner, name, wrapper)


after(collection.Collection, "write_shard", "shard")
after(update, "_write_tombstones", "tombstones")
after(faiss, "write_index", "index")
after(manifest, "write_json", "versions", when=lambda path, data: Path(path).parent.name == "versions")
_gc = collection.Collection.collect_garbage


def _collect(self):
    if POINT == "committed" and self.manifest.version > _start_version:
        stop()
    return _gc(self)


collection.Collection.collect_garbage = _collect
_start_version = collection.Collection.open(sys.argv[3]).manifest.version  # argv: embed SOURCE COLLECTION ...

if __name__ == "__main__":
    from vlsearch.app.cli import app

    app(prog_name="vlsearch")
