"""Setting metadata columns of existing rows as a new version (vlsearch.store.columns)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from indexing.build import build_index
from vlsearch.core.errors import InvalidQueryError
from vlsearch.core.modelinfo import ModelInfo
from vlsearch.query.searcher import Searcher
from vlsearch.store.arrays import embedding_array
from vlsearch.store.collection import Collection
from vlsearch.store.manifest import Manifest

DIM = 8


def _collection(path, n: int = 60, shard_size: int = 20) -> Collection:
    ids = np.arange(n, dtype=np.int64) * 7919 + 10**12
    x = np.random.default_rng(0).standard_normal((n, DIM)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    coll = Collection.create(path, Manifest(model=ModelInfo("synthetic", None, DIM), shard_size=shard_size))
    for k, s in enumerate(range(0, n, shard_size)):
        coll.write_shard(k, pa.table({"id": pa.array(ids[s:s + shard_size]),
                                      "path": [f"img/{i}.jpg" for i in ids[s:s + shard_size]],
                                      "label": ["a" if i % 2 else "b" for i in range(s, s + shard_size)],
                                      "embedding": embedding_array(x[s:s + shard_size])}))
    coll.commit_version(counts={"images": n, "captions": 0, "failures": 0, "shards": k + 1}, complete=True)
    build_index(coll.path, "IVF4,Flat", nprobe_default=4)
    return Collection.open(path)


def test_new_and_existing_columns_are_set_by_id_and_search_is_unchanged(tmp_path):
    coll = _collection(tmp_path / "c")
    ids, vectors = coll.read_embeddings()
    coll.remove(ids[:3])  # dead rows are dropped by the rewrite
    before = Searcher.open(coll.path).search_vector(vectors[5], k=5)
    version = coll.manifest.version
    values = pa.table({"id": pa.array([ids[5], ids[41], 12345], pa.int64()),
                       "tags": pa.array([["dog"], ["sea", "sky"], ["x"]], pa.list_(pa.string())),
                       "label": ["changed", "also", "none"]})
    report = coll.set_columns(values)
    assert report == {"rows_updated": 2, "ids_unmatched": 1, "shards_rewritten": 3, "version": version + 1}
    table = Collection.open(coll.path).read_table(columns=["id", "tags", "label"]).to_pydict()
    by_id = dict(zip(table["id"], zip(table["tags"], table["label"])))
    assert len(by_id) == 57 and ids[0] not in by_id
    assert by_id[ids[5]] == (["dog"], "changed") and by_id[ids[41]] == (["sea", "sky"], "also")
    assert by_id[ids[6]] == (None, "b")  # untouched rows keep their label; the new column is null
    searcher = Searcher.open(coll.path)
    after = searcher.search_vector(vectors[5], k=5, where="list_contains(tags, 'dog')")
    assert [h.id for h in after] == [int(ids[5])]
    assert [h.id for h in searcher.search_vector(vectors[5], k=5)] == [h.id for h in before]
    assert searcher.search_vector(vectors[41], k=1)[0].metadata["label"] == "also"


def test_keep_false_nulls_rows_not_named(tmp_path):
    coll = _collection(tmp_path / "c")
    ids = coll.read_embeddings()[0]
    coll.set_columns(pa.table({"id": pa.array([ids[0]]), "label": ["only"]}), keep=False)
    labels = Collection.open(coll.path).read_table(columns=["label"]).column("label").to_pylist()
    assert labels.count("only") == 1 and labels.count(None) == len(ids) - 1


@pytest.mark.parametrize("values, message", [
    (pa.table({"tags": [["x"]]}), "`id` column"),
    (pa.table({"id": [1], "embedding": [1.0]}), "cannot be set"),
    (pa.table({"id": [1, 1], "t": ["a", "b"]}), "more than once"),
    (pa.table({"id": [1]}), "no column"),
])
def test_bad_values_are_refused_before_any_write(tmp_path, values, message):
    coll = _collection(tmp_path / "c")
    version = coll.manifest.version
    with pytest.raises(InvalidQueryError, match=message):
        coll.set_columns(values)
    assert Collection.open(coll.path).manifest.version == version


def test_a_type_that_cannot_hold_the_old_values_is_refused(tmp_path):
    coll = _collection(tmp_path / "c")
    ids = coll.read_embeddings()[0]
    with pytest.raises(InvalidQueryError, match="label"):
        coll.set_columns(pa.table({"id": pa.array([ids[0]]), "label": pa.array([1.5])}))


def test_folder_is_filled_from_the_path_for_shards_written_before_it(tmp_path):
    """Shards written before the photo columns have no `folder`; after a sync adds shards that have
    it, filters and shaping still see every row's folder (one table, filled from the path)."""
    coll = _collection(tmp_path / "c")  # paths img/<id>.jpg, no folder column
    ids, vectors = coll.read_embeddings()
    x = vectors[:2] * -1
    coll.add(pa.table({"id": pa.array([1, 2], pa.int64()), "path": ["trips/a.jpg", "b.jpg"],
                       "folder": ["trips", ""], "embedding": embedding_array(x)}))
    searcher = Searcher.open(coll.path)
    old = searcher.search_vector(vectors[0], k=100, exact=True, where="folder = 'img'")
    assert len(old) == len(ids)
    assert [h.id for h in searcher.search_vector(x[0], k=5, exact=True, where="folder LIKE 'trip%'")] == [1]
    grouped = searcher.search_vector(vectors[0], k=10, exact=True, group_by="folder", facets=["folder"])
    assert grouped.facets["folder"] == {"img": len(ids), "trips": 1, "": 1}
    assert sorted(h.path.rpartition("/")[0] for h in grouped) == ["", "img", "trips"]
