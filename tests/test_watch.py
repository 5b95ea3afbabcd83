"""``indexing.watch``: a watcher keeps a collection in step with a folder as files arrive (some
slowly), vanish or cannot be read; polling, the fallback to it, a failed round, and ``vlsearch watch``."""

from __future__ import annotations

import io
import logging
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pytest
from PIL import Image

import indexing.watch as watch_module
from indexing.build import build_index
from indexing.embed import embed
from indexing.watch import FolderWatcher, WatchConfig
from process_support import wait_for_line
from test_embed import _config, _folder, _jpeg
from vlsearch.core.errors import CollectionLockedError, CollectionMismatchError, SourceError
from vlsearch.data.sources import stable_id
from vlsearch.models.factory import TINY_MODEL
from vlsearch.query.searcher import Searcher
from vlsearch.store.collection import Collection

#: the issue's bound: a change is searchable within 10 s
WAIT = 10.0
FAST = WatchConfig(quiet=0.3, max_delay=2.0, settle=0.3)


@pytest.fixture
def built(tmp_path, tiny_encoder) -> tuple[Path, Path]:
    """A folder of 4 images and its finished, indexed collection."""
    src = _folder(tmp_path / "src", 4)
    coll = embed(src, tmp_path / "coll", _config(), encoder=tiny_encoder)
    build_index(coll.path, "Flat")
    return src, coll.path


def _served(coll: Path) -> set[str]:
    """The paths a freshly opened Searcher returns (every image: a Flat index, k > count)."""
    searcher = Searcher.open(coll)
    return {h.path for h in searcher.search_vector(np.ones(searcher.dim, np.float32), k=searcher.collection.count() + 5)}


def _until(condition, what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout:g} s")
        time.sleep(0.1)


@contextmanager
def _watching(watcher: FolderWatcher):
    """The watcher running in its thread; yields (reports, errors) as they come; stopped after."""
    reports, errors = [], []
    running = watcher.start(on_sync=reports.append, on_error=errors.append)
    try:
        _until(lambda: reports or errors, "the first round")
        yield reports, errors
    finally:
        assert running.stop(timeout=30), "the watcher did not stop"


def _big_jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def test_new_files_appear_deleted_ones_vanish_and_unreadable_ones_are_failures(built, tiny_encoder):
    src, coll = built
    watcher = FolderWatcher(src, coll, FAST, _config(), encoder=tiny_encoder)
    with _watching(watcher) as (reports, errors):
        assert reports[0].changes() == "+0 new, ~0 changed, -0 deleted"  # caught up: nothing to do
        (src / "img100.jpg").write_bytes(_jpeg(100))
        (src / "img101.jpg").write_bytes(_jpeg(101))
        (src / "img101.txt").write_text("a new caption\n")
        (src / "broken.jpg").write_bytes(b"not a jpeg at all" * 50)
        (src / "img001.jpg").unlink()
        expected = {"img000.jpg", "img002.jpg", "img003.jpg", "img100.jpg", "img101.jpg"}
        _until(lambda: _served(coll) == expected, "new files served, the deleted one gone")
        assert "broken.jpg" in Collection.open(coll).failures().column("path").to_pylist()
        (src / "img102.jpg").write_bytes(_jpeg(102))  # the watcher goes on after the unreadable file
        _until(lambda: "img102.jpg" in _served(coll), "a later file served")
    assert errors == [] and sum(r.failures for r in reports) == 1
    assert "a new caption" in Collection.open(coll).read_table("captions", ["caption"]).column(0).to_pylist()


def test_a_slowly_written_file_is_embedded_from_its_complete_bytes(built, tiny_encoder):
    src, coll = built
    data = _big_jpeg(7)
    chunks = [data[i * len(data) // 4:(i + 1) * len(data) // 4] for i in range(4)]
    # quiet (0.3 s) < the pause between chunks (0.4 s): a watcher without settling would sync the
    # file half-written after the first chunk; settle (1 s) > the pause holds it back.
    config = WatchConfig(quiet=0.3, max_delay=2.0, settle=1.0)
    with _watching(FolderWatcher(src, coll, config, _config(), encoder=tiny_encoder)) as (reports, errors):
        with open(src / "slow.jpg", "wb") as fh:
            for chunk in chunks:
                fh.write(chunk)
                fh.flush()
                time.sleep(0.4)
        _until(lambda: "slow.jpg" in _served(coll), "the slowly written file served")
    assert errors == []
    assert [r.new for r in reports if r.has_changes] == [["slow.jpg"]]  # embedded once, never half, then again
    assert any("slow.jpg" in r.deferred for r in reports)  # it was seen while being written, and held back
    assert "slow.jpg" not in Collection.open(coll).failures().column("path").to_pylist()
    ids, vectors = Collection.open(coll).read_embeddings()
    stored = vectors[ids.tolist().index(stable_id(b"slow.jpg"))]
    complete = tiny_encoder.encode_images([src / "slow.jpg"])[0]  # the query side, from the whole file
    assert np.allclose(stored, complete, atol=2e-3)


def test_a_watched_manifest_follows_its_rows(tmp_path, tiny_encoder):
    (tmp_path / "img").mkdir()
    for i in range(4):
        (tmp_path / "img" / f"{i}.jpg").write_bytes(_jpeg(i))

    def write(rows):
        pcsv.write_csv(pa.table({"image": [f"img/{i}.jpg" for i in rows], "caption": [f"caption {i}" for i in rows]}),
                       tmp_path / "captions.csv")

    write([0, 1, 2])
    coll = embed(tmp_path / "captions.csv", tmp_path / "coll", _config(), encoder=tiny_encoder).path
    build_index(coll, "Flat")
    watcher = FolderWatcher(tmp_path / "captions.csv", coll, FAST, _config(), encoder=tiny_encoder)
    with _watching(watcher) as (_, errors):
        write([0, 2, 3])
        _until(lambda: _served(coll) == {"img/0.jpg", "img/2.jpg", "img/3.jpg"}, "the manifest's rows served")
    assert errors == []


@pytest.mark.parametrize("mode", ["forced", "fallback"])
def test_polling_forced_or_when_native_events_fail(built, tiny_encoder, monkeypatch, caplog, mode):
    src, coll = built
    real = watch_module.watchfiles.watch
    polled = []

    def watch(*args, force_polling=None, **kwargs):
        if mode == "fallback" and force_polling is not True:
            raise OSError("OS file watch limit reached")
        polled.append(force_polling)
        return real(*args, force_polling=force_polling, **kwargs)

    monkeypatch.setattr(watch_module.watchfiles, "watch", watch)
    config = WatchConfig(quiet=0.2, max_delay=2.0, settle=0.3, poll_interval=0.1,
                         force_polling=True if mode == "forced" else None)
    with caplog.at_level(logging.WARNING, logger="indexing.watch"):
        with _watching(FolderWatcher(src, coll, config, _config(), encoder=tiny_encoder)) as (_, errors):
            (src / "img100.jpg").write_bytes(_jpeg(100))
            (src / "img002.jpg").unlink()
            _until(lambda: _served(coll) == {"img000.jpg", "img001.jpg", "img003.jpg", "img100.jpg"}, "polled")
    assert polled == [True] and errors == []
    assert ("polling every 0.1 s" in caplog.text) == (mode == "fallback")


def test_a_failed_round_is_reported_and_retried(built, tiny_encoder, monkeypatch):
    src, coll = built
    real, calls = watch_module.sync, []

    def sync(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # another writer holds the lock
            raise CollectionLockedError("collection is locked by pid 1")
        return real(*args, **kwargs)

    monkeypatch.setattr(watch_module, "sync", sync)
    config = WatchConfig(quiet=0.2, max_delay=0.5, settle=0.2)
    with _watching(FolderWatcher(src, coll, config, _config(), encoder=tiny_encoder)) as (reports, errors):
        (src / "img100.jpg").write_bytes(_jpeg(100))
        _until(lambda: "img100.jpg" in _served(coll), "synced after the failed round")
    assert [type(e) for e in errors] == [CollectionLockedError]
    assert [r.new for r in reports if r.has_changes] == [["img100.jpg"]]


def test_what_cannot_be_watched_is_refused(built, tmp_path):
    src, coll = built
    for source in ("memory://photos", str(tmp_path / "missing")):
        with pytest.raises(SourceError, match="cannot watch"):
            FolderWatcher(source, coll)
    with pytest.raises(CollectionMismatchError, match="built with"):
        FolderWatcher(src, coll, embed_config=_config(model="ViT-B-32"))
    with pytest.raises(ValueError, match="max_delay"):
        WatchConfig(quiet=5, max_delay=1)


def test_vlsearch_watch_creates_the_collection_then_follows_the_folder(tmp_path, tiny_checkpoint):
    src = _folder(tmp_path / "src", 3)
    coll = tmp_path / "coll"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "HF_HUB_OFFLINE": "1"}
    args = ["watch", str(src), str(coll), "--quiet", "0.3", "--settle", "0.3", "--max-delay", "2",
            "--model", TINY_MODEL, "--pretrained", str(tiny_checkpoint), "--device", "cpu", "--workers", "0"]
    proc = subprocess.Popen([sys.executable, "-m", "vlsearch.app.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, bufsize=0)
    try:
        wait_for_line(proc, r"\+3 new, ~0 changed, -0 deleted -> version \d+", timeout=300)  # created
        (src / "img100.jpg").write_bytes(_jpeg(100))
        wait_for_line(proc, r"^\d\d:\d\d:\d\d \+1 new, ~0 changed, -0 deleted -> version \d+$", timeout=120)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
        proc.wait()
    assert _served(coll) == {"img000.jpg", "img001.jpg", "img002.jpg", "img100.jpg"}
