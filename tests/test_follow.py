"""Searchers and servers follow the collection: ``Searcher.refresh()`` / ``follow=True`` move to each
version a writer commits, prepared before the switch; calls in flight and snapshots finish on their
version (its lease keeps its files); the replaced version's lease goes as soon as nobody reads it;
``vlsearch serve`` follows syncs and compactions with no failed request, or stays put with
``--pin-version``."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import threading
import time
import weakref
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from process_support import wait_for_line
from test_embed import _config, _folder, _jpeg
from test_live import _collection, _rows, _vectors
from test_rerank import TINY_FUSION

import vlsearch.query.version as version_module
from indexing.build import build_index
from indexing.embed import embed
from indexing.sync import sync
from vlsearch import Client
from vlsearch.core.errors import CollectionError
from vlsearch.query.plan import KnnPlan
from vlsearch.query.searcher import Searcher
from vlsearch.rerank.model import FusionITM, Reranker, tower_identity
from vlsearch.store.collection import Collection
from vlsearch.store.lease import leased_versions

NEW_IDS = np.arange(20, dtype=np.int64) + 5 * 10**12
PORT_LINE = r"Uvicorn running on http://127\.0\.0\.1:(\d+)"


def _churn(coll: Collection, seed: int = 9) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Add 20 rows, delete 100 (all of shard 0 and 30 more), compact: ``(new vectors, deleted ids, old vectors)``."""
    ids, vectors = coll.read_embeddings()
    new = _vectors(20, seed)
    coll.add(_rows(NEW_IDS, new))
    gone = np.concatenate([ids[:100], ids[150:180]])
    coll.remove(gone)
    coll.compact()
    return new, gone, vectors


def _wait_for(condition, what: str, timeout: float = 10.0):
    """Poll ``condition()`` until it returns something true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout:g} s")
        time.sleep(0.02)
    return value


def test_refresh_moves_to_the_newest_version_after_add_remove_and_compact(tmp_path):
    coll = _collection(tmp_path / "c", factory="IVF8,Flat")
    ids = coll.read_embeddings()[0]
    s = Searcher.open(coll.path)
    first = s.version
    assert s.refresh() is False and s.version == first  # nothing committed yet
    new, gone, vectors = _churn(coll)
    assert s.version == first and s.knn(vectors[:1], k=1)[1][0, 0] == ids[0]  # not before refresh()
    assert s.refresh() is True
    assert s.version == Collection.open(coll.path).manifest.version == first + 3
    assert s.refresh() is False  # a second refresh finds nothing newer
    assert len(s.row_locator) == 400 - len(gone) + 20 and s.index.ntotal == 290
    for exact in (False, True):
        _, found = s.knn(new, k=1, exact=exact, nprobe=8)
        assert found[:, 0].tolist() == NEW_IDS.tolist()
        _, found = s.knn(vectors, k=10, exact=exact, nprobe=8)
        assert (found >= 0).all() and not np.isin(found, gone).any()
    filtered = s.search_vector(vectors[:50], k=10, where="path LIKE 'img/%'")
    assert all(len(hits) == 10 and not np.isin([h.id for h in hits], gone).any() for hits in filtered)
    assert s.search_vector(new[0], k=1, where="path LIKE 'img/%'")[0].id == NEW_IDS[0]
    assert not np.isin(s.filter_ids("path LIKE 'img/%'"), gone).any()
    assert leased_versions(coll.path) == [s.version]


def test_a_snapshot_and_a_call_in_flight_finish_on_their_version(tmp_path, monkeypatch):
    coll = _collection(tmp_path / "c", factory="IVF8,Flat")
    ids, vectors = coll.read_embeddings()
    s = Searcher.open(coll.path)
    snap = s.snapshot()  # nothing of version N was read yet: its row groups are read below, after compact
    old_plan, started, go, out = weakref.ref(s.plan), threading.Event(), threading.Event(), {}
    real_knn = KnnPlan.knn

    def slow_knn(plan, *args, **kwargs):
        if plan is old_plan():  # the call in flight: paused between its start and its k-NN
            started.set()
            go.wait(30)
        return real_knn(plan, *args, **kwargs)

    monkeypatch.setattr(KnnPlan, "knn", slow_knn)
    call = threading.Thread(target=lambda: out.update(hits=s.search_vector(vectors[:3], k=1)))
    call.start()
    assert started.wait(30)
    new, gone, _ = _churn(coll)
    assert "part-00000.parquet" not in [p.name for p in Collection.open(coll.path).shard_paths()]
    assert (coll.path / "images" / "part-00000.parquet").is_file()  # compacted away, kept for version N
    assert s.refresh() is True
    go.set()
    call.join(30)
    assert [h[0].id for h in out["hits"]] == ids[:3].tolist()  # begun on version N: its rows, removed since
    assert [h.id for h in s.search_vector(vectors[0], k=3)][0] not in gone  # new calls: the new version
    # the snapshot reads version N whole: rows of shards that compact dropped from the current version
    hits = snap.search_vector(vectors[:3], k=1)
    assert [h[0].id for h in hits] == ids[:3].tolist() and hits[0][0].path == f"img/{ids[0]}.jpg"
    assert len(snap.filter_ids("path LIKE 'img/%'")) == 400  # its first filtered query reads every shard
    assert snap.refresh() is False and snap.version == s.version - 3  # a snapshot never moves
    assert leased_versions(coll.path) == [snap.version, s.version]
    del snap, hits
    assert leased_versions(coll.path) == [s.version]


def test_the_new_version_is_prepared_before_the_switch(tmp_path, monkeypatch):
    coll = _collection(tmp_path / "c", factory="IVF8,Flat")
    warm, cold = Searcher.open(coll.path), Searcher.open(coll.path)
    _, vectors = coll.read_embeddings()
    warm.knn(vectors[:1], k=1, exact=True)
    warm.filter_ids("path LIKE 'img/%'")
    assert warm.plan.exact.warm and warm.plan.filters.built and not cold.plan.exact.warm
    new, gone, _ = _churn(coll)
    assert warm.refresh() and cold.refresh()
    assert warm.index is not None and warm.index.ntotal == cold.index.ntotal == 290  # loaded, not on first use
    assert warm.plan.exact.warm and warm.plan.filters.built  # warmed because the old version was
    assert not cold.plan.exact.warm and not cold.plan.filters.built  # nothing warmed that was not warm
    monkeypatch.setattr(Collection, "read_embeddings", lambda *a, **kw: pytest.fail("exact cache read after the switch"))
    _, found = warm.knn(new, k=1, exact=True)
    assert found[:, 0].tolist() == NEW_IDS.tolist()


def test_concurrent_refreshes_build_the_new_version_once(tmp_path, monkeypatch):
    coll = _collection(tmp_path / "c", factory="Flat")
    s = Searcher.open(coll.path)
    coll.add(_rows(NEW_IDS[:3], _vectors(3, 4)))
    loads, real_load = [], version_module.SharedParts.load

    def slow_load(shared, collection):
        loads.append(collection.manifest.version)
        time.sleep(0.2)  # long enough for the other callers to arrive while it builds
        return real_load(shared, collection)

    monkeypatch.setattr(version_module.SharedParts, "load", slow_load)
    barrier = threading.Barrier(4)
    results: list[bool] = []
    threads = [threading.Thread(target=lambda: (barrier.wait(), results.append(s.refresh()))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(results) == [False, False, False, True] and loads == [s.version]


def _commit(path: Path, index_file: str) -> int:
    """Commit a new version whose index entry names ``index_file``; the new version."""
    coll = Collection.open(path)
    with coll.lock():
        coll.manifest = replace(coll.manifest, index={**coll.manifest.index, "file": index_file})
        return coll.commit_version().version


def test_a_failing_refresh_keeps_the_current_version_and_follow_reports_it(tmp_path):
    coll = _collection(tmp_path / "c", factory="IVF8,Flat")
    ids, vectors = coll.read_embeddings()
    errors: list[Exception] = []
    s = Searcher.open(coll.path, follow=0.05, on_refresh_error=errors.append)
    first, index_file = s.version, coll.index_path.name
    assert _commit(coll.path, "index-missing.faiss") == first + 1  # a half-broken version: its index is missing
    _wait_for(lambda: errors, "the follow thread reports the broken version")
    assert isinstance(errors[0], CollectionError) and "still read" in str(errors[0])
    assert isinstance(s.last_refresh_error, CollectionError) and s.following
    with pytest.raises(CollectionError, match=f"cannot read version {first + 1}"):
        s.refresh()
    assert s.version == first and leased_versions(coll.path) == [first]  # the failed version's lease is gone
    assert s.search_vector(vectors[0], k=1)[0].id == ids[0]  # still serving
    assert _commit(coll.path, index_file) == first + 2  # whole again
    _wait_for(lambda: s.version == first + 2, "the follow thread moves once a version is whole")
    _wait_for(lambda: s.last_refresh_error is None, "the error is cleared by a refresh that works")
    s.close()


def test_follow_finds_new_rows_and_close_stops_it(tmp_path):
    coll = _collection(tmp_path / "c", factory="IVF8,Flat")
    errors: list[Exception] = []
    with Searcher.open(coll.path, follow=True, on_refresh_error=errors.append) as s:
        assert s.following
        new = _vectors(20, 3)
        coll.add(_rows(NEW_IDS, new))  # another writer commits
        _wait_for(lambda: s.search_vector(new[0], k=1, nprobe=8)[0].id == NEW_IDS[0], "the new rows are found")
        assert s.version == coll.manifest.version and errors == [] and s.last_refresh_error is None
    assert not s.following and not [t for t in threading.enumerate() if t.name == "vlsearch-follow-c"]
    assert leased_versions(coll.path) == []
    # a following Searcher dropped without close() is collected; its thread ends by itself
    dropped = Searcher.open(coll.path, follow=0.05)
    del dropped
    gc.collect()
    _wait_for(lambda: not [t for t in threading.enumerate() if t.name == "vlsearch-follow-c"], "the thread ends")
    assert leased_versions(coll.path) == []


def test_the_replaced_version_is_let_go_at_once_by_reference_counting(tmp_path):
    coll = _collection(tmp_path / "c", factory="IVF8,Flat")
    _, vectors = coll.read_embeddings()
    gc.disable()  # no cycle collector: only reference counting may free the old version
    try:
        s = Searcher.open(coll.path)
        s.search_vector(vectors[:2], k=3)  # every part of the version in use: ANN, exact, filter, rows
        s.search_vector(vectors[:2], k=3, exact=True)
        s.search_vector(vectors[:2], k=3, where="path LIKE 'img/%'")
        assert leased_versions(coll.path) == [s.version]
        coll.add(_rows(NEW_IDS[:3], _vectors(3, 4)))
        assert s.refresh()
        assert leased_versions(coll.path) == [s.version]
        snap = s.snapshot()
        coll.remove(NEW_IDS[:1])
        assert s.refresh() and leased_versions(coll.path) == [snap.version, s.version]
        del snap
        assert leased_versions(coll.path) == [s.version]
        s.close()
        assert leased_versions(coll.path) == []
    finally:
        gc.enable()


def test_rerank_features_are_warmed_and_the_models_shared(tmp_path, tiny_encoder, one_torch_thread):
    src = _folder(tmp_path / "src", 12)
    coll = embed(src, tmp_path / "c", _config(), encoder=tiny_encoder)
    build_index(coll.path, "Flat")
    torch.manual_seed(0)
    rr = Reranker(FusionITM(TINY_FUSION), tower_identity(tiny_encoder.info), 0.5)
    warm, cold = (Searcher.open(coll.path, encoder=tiny_encoder, reranker=rr, rerank_features="recompute")
                  for _ in range(2))
    warm.search_text("picture", k=3, rerank=5)
    assert warm.reranking.loaded and not cold.reranking.loaded
    _edit(src, 1)
    sync(src, coll.path, _config(), encoder=tiny_encoder)
    assert warm.refresh() and cold.refresh()
    assert warm.reranking.loaded and not cold.reranking.loaded  # warmed before the switch where it was warm
    assert warm.reranker is rr and warm.encoder is tiny_encoder  # one model for every version
    hits = warm.search_text("picture", k=16, rerank=16, exact=True)
    assert {h.id for h in hits} == set(Collection.open(coll.path).read_embeddings()[0].tolist())


# ---- the server, in its own process ------------------------------------------------------------

def _serve(path: Path, *flags: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.Popen([sys.executable, "-m", "vlsearch.app.cli", "serve", f"c={path}", "--port", "0", *flags],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, bufsize=0)


def _edit(src: Path, step: int) -> str:
    """A sync's worth of source changes: 5 new images, one deleted; the deleted file's name."""
    for i in range(5):
        (src / f"new{step}-{i}.jpg").write_bytes(_jpeg(100 + 10 * step + i))
    gone = f"img{step:03d}.jpg"
    (src / gone).unlink()
    (src / gone).with_suffix(".txt").unlink(missing_ok=True)
    return gone


class Hammer:
    """A client thread searching the server without pause (ANN, exact, filtered) while it runs,
    counting the answers that are not 200."""

    def __init__(self, url: str):
        import httpx

        self.http, self.stop, self.calls, self.failed = httpx.Client(base_url=url, timeout=60), threading.Event(), 0, []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        bodies = [{"text": "picture", "k": 10}, {"text": "picture", "k": 50, "exact": True},
                  {"text": "another caption", "k": 5, "where": "path LIKE 'img%'"}]
        while not self.stop.is_set():
            r = self.http.post("/api/collections/c/search", json=bodies[self.calls % len(bodies)])
            self.calls += 1
            if r.status_code != 200:
                self.failed.append((r.status_code, r.text[:300]))

    def finish(self) -> None:
        self.stop.set()
        self.thread.join(60)
        self.http.close()


def test_vlsearch_serve_follows_syncs_and_compaction_or_stays_pinned(tmp_path, tiny_encoder, one_torch_thread):
    src = _folder(tmp_path / "src", 30)
    coll = embed(src, tmp_path / "c", _config(), encoder=tiny_encoder)
    build_index(coll.path, "Flat")
    start = Collection.open(coll.path)
    paths = dict(zip(*[start.read_table(columns=["path", "id"]).column(n).to_pylist() for n in ("path", "id")]))
    following, pinned = _serve(coll.path), _serve(coll.path, "--pin-version")
    try:
        urls = [f"http://127.0.0.1:{wait_for_line(p, PORT_LINE, 300).group(1)}" for p in (following, pinned)]
        with Client(urls[0], collection="c") as client, Client(urls[1], collection="c") as pinned_client:
            assert [c["version"] for c in client.collections() + pinned_client.collections()] == [start.manifest.version] * 2
            hammer = Hammer(urls[0])
            try:
                deleted = [paths[_edit(src, 1)]]
                sync(src, coll.path, _config(), encoder=tiny_encoder)
                deleted.append(paths[_edit(src, 2)])
                sync(src, coll.path, _config(), encoder=tiny_encoder)
                Collection.open(coll.path).compact()
                final = Collection.open(coll.path)
                _wait_for(lambda: client.collections()[0]["version"] == final.manifest.version, "the new version served")
                calls = hammer.calls
                _wait_for(lambda: hammer.calls > calls + 3, "searches on the new version")
            finally:
                hammer.finish()
            assert hammer.failed == [] and hammer.calls > 10
            _check_served(client, urls[0], final, deleted, set(paths.values()))
            _check_pinned(pinned_client, urls[1], start, deleted)
    finally:
        for proc in (following, pinned):
            proc.terminate()
            proc.wait(timeout=30)


def _check_served(client: Client, url: str, final: Collection, deleted: list[int], first_ids: set[int]) -> None:
    import httpx

    info = client.collections()[0]
    health = httpx.get(f"{url}/health").json()
    assert health["versions"]["c"] == {"version": final.manifest.version, "loaded_at": info["loaded_at"]}
    live = set(final.read_embeddings()[0].tolist())
    assert info["images"] == len(live) == 38  # 30 - 2 deleted + 2 x 5 new
    for exact in (True, False):
        found = {h.id for h in client.search_text("picture", k=100, exact=exact)}
        assert found == live and not found & set(deleted) and len(found - first_ids) == 10


def _check_pinned(client: Client, url: str, start: Collection, deleted: list[int]) -> None:
    import httpx

    info = client.collections()[0]
    assert info["version"] == start.manifest.version and info["images"] == 30
    hits = client.search_text("picture", k=100, exact=True, where="path LIKE '%.jpg'")  # every row, shards compacted away
    assert {h.id for h in hits} == set(start.read_embeddings()[0].tolist()) and set(deleted) <= {h.id for h in hits}
    assert all(h.path for h in hits)
    assert client.item(deleted[0])["path"] == "img001.jpg"
    assert httpx.get(f"{url}/health").json()["versions"]["c"]["version"] == start.manifest.version
