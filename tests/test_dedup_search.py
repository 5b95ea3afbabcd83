"""Query-time ``dedup``: near-duplicate hits (connected components of cosine >= T over the
candidates' stored vectors) collapse into their best-ranked member, and the list is fetched deeper
until k distinct hits are found; the same through the Searcher, HTTP, the Client and the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from collection_support import copy_with_flat_index
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from vlsearch import Client
from vlsearch.ann.duplicates import DEFAULT_DUPLICATE_THRESHOLD
from vlsearch.app.cli import app as cli_app
from vlsearch.app.serve import ServeConfig, background_server, create_app
from vlsearch.core.errors import InvalidQueryError
from vlsearch.core.modelinfo import ModelInfo
from vlsearch.query.searcher import Searcher
from vlsearch.query.shaping import ShapedHits, distinct_positions
from vlsearch.store.arrays import embedding_array
from vlsearch.store.collection import Collection
from vlsearch.store.manifest import Manifest

D, GROUPS, COPIES, SPREAD, SHARD = 32, 40, 4, 400, 256

pytestmark = pytest.mark.usefixtures("one_faiss_thread")


def _data():
    """GROUPS bursts near axis 0 (an original and COPIES near-copies each: cosine ~0.97 to it, the
    groups ~0.3 apart), then SPREAD random items; rows are shuffled, ids are large and sparse."""
    rng = np.random.default_rng(11)
    axis = np.zeros(D, np.float32)
    axis[0] = 1.0
    bases = axis + 0.25 * rng.standard_normal((GROUPS, D)).astype(np.float32)
    bases /= np.linalg.norm(bases, axis=1, keepdims=True)
    burst = np.repeat(bases, COPIES + 1, axis=0)
    burst[np.arange(len(burst)) % (COPIES + 1) != 0] += 0.04 * rng.standard_normal(
        (GROUPS * COPIES, D)).astype(np.float32)
    spread = rng.standard_normal((SPREAD, D)).astype(np.float32)
    vectors = np.concatenate([burst, spread])
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    group = np.concatenate([np.repeat(np.arange(GROUPS), COPIES + 1), GROUPS + np.arange(SPREAD)])
    order = rng.permutation(len(vectors))
    vectors, group = vectors[order], group[order]
    ids = (rng.permutation(len(vectors)).astype(np.int64) + 1) * 7919 + (1 << 40)
    label = np.where(rng.random(len(vectors)) < 0.5, "a", "b")
    return vectors, ids, group, label


@pytest.fixture(scope="module")
def data():
    return _data()


@pytest.fixture(scope="module")
def coll_path(tmp_path_factory, data) -> Path:
    vectors, ids, _, label = data
    root = tmp_path_factory.mktemp("dedup") / "coll"
    coll = Collection.create(root, Manifest(model=ModelInfo("synthetic", None, D), shard_size=SHARD))
    n = len(ids)
    for s, start in enumerate(range(0, n, SHARD)):
        sl = slice(start, start + SHARD)
        coll.write_shard(s, pa.table({"id": ids[sl], "path": [f"{i}.jpg" for i in ids[sl]], "label": label[sl],
                                      "taken": np.arange(n, dtype=np.int64)[sl][::-1].copy(),
                                      "embedding": embedding_array(vectors[sl])}))
    shards = (n + SHARD - 1) // SHARD
    coll.update_manifest(counts={"images": n, "captions": 0, "failures": 0, "shards": shards}, complete=True)
    return root


@pytest.fixture(scope="module")
def searcher(coll_path):
    with Searcher.open(coll_path) as s:
        yield s


def _query() -> np.ndarray:
    q = np.zeros(D, np.float32)
    q[0] = 1.0
    return q


def _ids(hits) -> list[int]:
    return [int(h["id"]) if isinstance(h, dict) else h.id for h in hits]


def _expected(data, q, k, mask=None, exclude=()) -> list[int]:
    """The first k of the exact ranking keeping one item per planted group (the groups are far apart,
    so this is what components over any deep enough candidate list give)."""
    vectors, ids, group, _ = data
    scores = vectors @ q
    seen, out = set(), []
    for row in np.argsort(-scores, kind="stable"):
        if (mask is not None and not mask[row]) or int(ids[row]) in exclude or group[row] in seen:
            continue
        seen.add(group[row])
        out.append(int(ids[row]))
        if len(out) == k:
            break
    return out


def test_distinct_positions_keeps_the_first_of_each_component_across_blocks(monkeypatch):
    import vlsearch.ann.duplicates as duplicates

    monkeypatch.setattr(duplicates, "BLOCK_ROWS", 2)  # the chain's links fall in different blocks
    v = np.array([[1, 0, 0], [0, 1, 0], [0.97, 0.243, 0], [0.9, 0.436, 0], [0, 0, 1]], np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    # 0 ~ 2 ~ 3 (a chain: 0 and 3 are 0.90 apart), 1 and 4 alone
    assert distinct_positions(v, 0.94).tolist() == [0, 1, 4]
    assert distinct_positions(v, 0.999).tolist() == [0, 1, 2, 3, 4]
    assert distinct_positions(np.zeros((0, 3), np.float32), 0.9).tolist() == []


def test_plain_top_k_is_full_of_copies_and_dedup_returns_k_distinct(searcher, data):
    q = _query()
    group = dict(zip(data[1].tolist(), data[2].tolist()))
    plain = searcher.search_vector(q, k=10, exact=True)
    assert len({group[i] for i in _ids(plain)}) < 5  # the planted bursts crowd the top 10
    hits = searcher.search_vector(q, k=10, exact=True, dedup=True)
    assert isinstance(hits, ShapedHits) and len(hits) == 10
    assert _ids(hits) == _expected(data, q, 10)
    assert hits.depth > 10  # fetched deeper than k to find 10 distinct ones
    assert [h.rank for h in hits] == list(range(1, 11))
    assert hits[0].id == plain[0].id and hits[0].score == pytest.approx(plain[0].score)


def test_the_threshold_decides_what_is_a_copy(searcher, data):
    q = _query()
    # the copies sit ~0.97 from their original: 0.99 keeps them apart, the default (0.90) collapses them
    assert _ids(searcher.search_vector(q, k=10, exact=True, dedup=True)) == \
        _ids(searcher.search_vector(q, k=10, exact=True, dedup=DEFAULT_DUPLICATE_THRESHOLD))
    assert _ids(searcher.search_vector(q, k=10, exact=True, dedup=0.99)) == \
        _ids(searcher.search_vector(q, k=10, exact=True))
    assert _ids(searcher.search_vector(q, k=10, exact=True, dedup=0.94)) == _expected(data, q, 10)
    assert _ids(searcher.search_vector(q, k=10, exact=True, dedup=False)) == \
        _ids(searcher.search_vector(q, k=10, exact=True))


def test_dedup_returns_fewer_only_when_the_collection_has_no_more_distinct_items(searcher, data):
    q = _query()
    hits = searcher.search_vector(q, k=1000, exact=True, dedup=True)
    assert len(hits) == GROUPS + SPREAD  # every group once, every other item once
    assert len(set(_ids(hits))) == len(hits)


def test_dedup_with_a_filter_with_the_ann_index_and_with_examples(tmp_path, coll_path, searcher, data):
    q = _query()
    mask = data[3] == "a"
    hits = searcher.search_vector(q, k=8, exact=True, where="label = 'a'", dedup=True)
    assert _ids(hits) == _expected(data, q, 8, mask=mask)
    dest = copy_with_flat_index(coll_path, tmp_path / "indexed")
    with Searcher.open(dest) as s:
        assert s.has_index
        assert _ids(s.search_vector(q, k=8, dedup=True)) == _expected(data, q, 8)
        assert _ids(s.search_vector(q, k=8, where="label = 'a'", dedup=True)) == _expected(data, q, 8, mask=mask)
    top = int(data[1][np.argmax(data[0] @ q)])
    liked = searcher.more_like([top], k=6, exact=True, dedup=True)
    like_q = searcher.item_vector(top)
    assert _ids(liked) == _expected(data, like_q / np.linalg.norm(like_q), 6, exclude={top})


def test_dedup_composes_with_order_by_and_facets(searcher, data):
    q = _query()
    hits = searcher.search_vector(q, k=5, exact=True, dedup=True, depth=50, order_by="taken DESC",
                                  facets=["label"])
    distinct = _expected(data, q, 50)
    candidates = searcher.search_vector(q, k=50, exact=True)
    kept = [i for i in _ids(candidates) if i in set(distinct)]
    taken = {h.id: h.metadata["taken"] for h in candidates}
    assert _ids(hits) == sorted(kept, key=lambda i: -taken[i])[:5]
    assert sum(hits.facets["label"].values()) == len(kept)  # counted among the distinct ones


@pytest.mark.parametrize("value", [0, 1.5, -0.2, float("nan"), "yes", [0.9]])
def test_bad_dedup_values_are_typed_errors(searcher, value):
    with pytest.raises(InvalidQueryError, match="dedup"):
        searcher.search_vector(_query(), k=3, exact=True, dedup=value)


@pytest.fixture(scope="module")
def served(searcher):
    return create_app({"dup": searcher}, ServeConfig(log_level="warning"))


def test_http_and_client_dedup_as_the_searcher(served, searcher):
    q = _query()
    local = searcher.search_vector(q, k=7, exact=True, dedup=True)
    with TestClient(served) as http:
        body = http.post("/api/collections/dup/search", json={"vector": q.tolist(), "k": 7, "exact": True,
                                                              "dedup": True})
        assert body.status_code == 200, body.text
        assert _ids(body.json()["hits"]) == _ids(local)
        second = http.post("/api/collections/dup/search", json={"vector": q.tolist(), "k": 4, "offset": 3,
                                                                "exact": True, "dedup": 0.94}).json()
        assert _ids(second["hits"]) == _ids(local)[3:7]
        bad = http.post("/api/collections/dup/search", json={"vector": q.tolist(), "k": 7, "dedup": 2.0})
        assert bad.status_code == 400 and "dedup" in bad.json()["error"]
    with background_server(served) as url, Client(url, collection="dup") as client:
        assert _ids(client.search_vector(q, k=7, exact=True, dedup=True)) == _ids(local)
        assert _ids(client.more_like([local[0].id], k=5, exact=True, dedup=0.94)) == \
            _ids(searcher.more_like([local[0].id], k=5, exact=True, dedup=0.94))


def test_cli_dedup_flags(coll_path, searcher):
    top = searcher.search_vector(_query(), k=1, exact=True)[0].id
    runner = CliRunner()
    args = ["search", str(coll_path), "--like", str(top), "-k", "6", "--exact", "--json"]
    plain = runner.invoke(cli_app, args)
    dedup = runner.invoke(cli_app, [*args, "--dedup"])
    loose = runner.invoke(cli_app, [*args, "--dedup", "--dedup-threshold", "0.999"])
    assert plain.exit_code == dedup.exit_code == loose.exit_code == 0, dedup.output
    ids = [[json.loads(line)["id"] for line in r.output.splitlines() if line.startswith("{")]
           for r in (plain, dedup, loose)]
    assert [int(i) for i in ids[1]] == _ids(searcher.more_like([top], k=6, exact=True, dedup=True))
    assert ids[0] == ids[2] != ids[1]
    alone = runner.invoke(cli_app, [*args, "--dedup-threshold", "0.9"])
    assert alone.exit_code != 0 and "--dedup" in alone.output


def test_candidate_vectors_come_from_the_refine_rows_file_where_the_index_has_one(tmp_path, coll_path, data,
                                                                                  monkeypatch):
    import vlsearch.query.shaped as shaped
    import vlsearch.store.gather as gather
    from indexing.build import build_index

    dest = tmp_path / "refined"
    shutil.copytree(coll_path, dest)
    build_index(dest, index_type="IVF4,PQ8x4fs,Refine(disk)", nprobe_default=4)
    ids = data[1][:50]
    with Searcher.open(dest) as s:
        version = s.snapshot()._current
        assert version.plan.ann.disk_refine is not None
        assert version.plan.stored.rows is version.plan.ann.disk_refine  # one mapping of the rows file
        by_id = dict(kv for batch in gather.shard_vectors(version.row_locator, ids) for kv in zip(*batch))
        from_shards = np.stack([by_id[i] for i in ids])
        read = []
        monkeypatch.setattr(gather, "shard_vectors", lambda locator, wanted: read.append(wanted) or iter(()))
        got = shaped.stored_vectors(version)(ids)
        assert read == [] and np.array_equal(got, from_shards)  # the same fp16 values, no shard read
        monkeypatch.undo()
        q = _query()
        assert _ids(s.search_vector(q, k=8, exact=True, dedup=True)) == _expected(data, q, 8)


def test_candidate_vectors_read_from_the_shards_are_kept_by_shard_file_and_row(searcher, data, monkeypatch):
    import vlsearch.query.shaped as shaped
    import vlsearch.store.gather as gather

    monkeypatch.setattr(gather, "_SHARD_ROWS", gather.ByteLRU(1 << 20))
    reads: list[int] = []
    read = gather.shard_vectors
    monkeypatch.setattr(gather, "shard_vectors", lambda locator, ids: reads.append(len(ids)) or read(locator, ids))
    version = searcher.snapshot()._current
    assert version.plan.stored.rows is None  # no index: no rows file
    ids = data[1][[3, 300, 599]]
    first = shaped.stored_vectors(version)(ids)
    again = shaped.stored_vectors(version)(data[1][[599, 3, 9]])
    assert reads == [3, 1]  # only the new id is read the second time
    assert np.array_equal(again[:2], first[[2, 0]])
    assert np.allclose(first, data[0][[3, 300, 599]], atol=2e-3)  # fp16 of the stored vectors


@pytest.mark.parametrize("kind", ["Flat", "HNSW32"])
def test_dedup_reads_a_flat_index_s_own_vectors_not_the_shards(tmp_path, data, monkeypatch, kind):
    """A bare Flat / HNSW,Flat index (an adopted autofaiss ``HNSW32``) holds the stored vectors under
    the item ids: dedup compares those, without decoding a shard row group per candidate."""
    import faiss

    import vlsearch.store.gather as gather

    vectors, _, group, label = data
    positional = (vectors, np.arange(len(vectors), dtype=np.int64), group, label)
    coll = Collection.create(tmp_path / "coll", Manifest(model=ModelInfo("synthetic", None, D), shard_size=SHARD))
    for s, start in enumerate(range(0, len(vectors), SHARD)):
        ids = positional[1][start:start + SHARD]
        coll.write_shard(s, pa.table({"id": ids, "path": [f"{i}.jpg" for i in ids],
                                      "embedding": embedding_array(vectors[start:start + SHARD])}))
    coll.update_manifest(counts={"images": len(vectors), "captions": 0, "failures": 0,
                                 "shards": (len(vectors) + SHARD - 1) // SHARD}, complete=True)
    index = faiss.index_factory(D, kind, faiss.METRIC_INNER_PRODUCT)
    index.add(coll.read_embeddings()[1])
    faiss.write_index(index, str(coll.index_path))
    coll.update_manifest(index={"factory": kind, "metric": "ip", "ntotal": index.ntotal,
                                "model": coll.model.to_dict(), "file": "index.faiss"})

    def no_shard_reads(*_):
        raise AssertionError("dedup decoded shard row groups")

    monkeypatch.setattr(gather, "shard_vectors", no_shard_reads)
    q = _query()
    with Searcher.open(coll.path) as s:
        assert s.has_index
        assert _ids(s.search_vector(q, k=8, dedup=True)) == _expected(positional, q, 8)
