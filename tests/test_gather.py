"""The filtered gather (issue 36): stored vectors by id from the index's vector rows file, or from
the shards' pages when there is none; the file follows versions and GC keeps it for leased readers."""

from __future__ import annotations

import numpy as np
import pytest

import vlsearch.store.gather as gather
from indexing.build import build_index
from tests.test_live import _collection, _rows, _vectors
from vlsearch.ann.refine import VectorRows
from vlsearch.query.exact import exact_search
from vlsearch.query.searcher import Searcher
from vlsearch.store.collection import Collection
from vlsearch.store.gather import StoredVectors, open_rows
from vlsearch.store.rows import RowLocator
from vlsearch.store.update import compact


def _truth(coll: Collection) -> dict[int, np.ndarray]:
    """Every live id's stored vector, read whole from the shards."""
    ids, vectors = coll.read_embeddings()
    return dict(zip(ids.tolist(), vectors))


def _stored(coll: Collection, rows: bool = True) -> StoredVectors:
    locator = RowLocator(coll.shard_paths(), coll)
    return StoredVectors(locator, coll.dim, open_rows(coll.path, coll.manifest.index) if rows else None)


def _check_gather(coll: Collection, rng: np.random.Generator, absent: np.ndarray = np.zeros(0, np.int64)) -> None:
    truth = _truth(coll)
    live = np.fromiter(truth, np.int64)
    for with_rows in (True, False):
        stored = _stored(coll, with_rows)
        for size in (1, 7, 60, len(live)):
            ids = rng.choice(live, size, replace=False)
            again = ids[:3]
            asked = np.concatenate([ids, again, absent])  # repeats and dead / unknown ids
            got = stored.get(asked)
            assert np.array_equal(got[:size], np.stack([truth[i] for i in ids.tolist()]))
            assert np.array_equal(got[size:size + len(again)], got[:len(again)])
            assert not got[size + len(again):].any()
            streamed = {i: v for batch in stored.batches(np.sort(asked)) for i, v in zip(*batch)}
            assert sorted(streamed) == sorted(set(ids.tolist()))
            assert all(np.array_equal(v, truth[i]) for i, v in streamed.items())


def test_gathered_vectors_equal_the_shards_with_and_without_the_rows_file(tmp_path):
    coll = _collection(tmp_path / "c")
    entry = coll.manifest.index
    assert entry["rows_file"] and not entry.get("refine_file")  # every build writes it; no on-disk refine
    assert len(VectorRows.from_entry(coll.path, entry).vectors) == 400
    _check_gather(coll, np.random.default_rng(0), absent=np.array([-1, 5, 10**15]))


@pytest.mark.parametrize("factory", ["IVF8,Flat", "IVF8,PQ4x4fs,Refine(SQ8)"])  # the second keeps dead entries
def test_the_rows_file_follows_adds_removes_replacements_and_compact_and_gc_keeps_it_for_leases(tmp_path, factory):
    coll = _collection(tmp_path / "c", factory=factory)
    first = coll.manifest.index["rows_file"]
    ids, vectors = coll.read_embeddings()
    extra_ids = np.arange(20, dtype=np.int64) + 5 * 10**12
    replaced = _vectors(1, 9)
    reader = Collection.open(coll.path, lease=True)
    with coll.update() as u:
        u.remove(ids[:10])
        u.add(_rows(np.r_[extra_ids, ids[5]], np.concatenate([_vectors(20, 7), replaced])))  # id 5 re-added anew
    coll = Collection.open(coll.path)
    second = coll.manifest.index["rows_file"]
    assert second != first and (coll.path / first).is_file()  # the leased version's file stays
    rows = VectorRows.from_entry(coll.path, coll.manifest.index)
    assert not rows.rows(np.r_[ids[:5], ids[6:10]])[1].any() and rows.rows(extra_ids)[1].all()
    assert np.array_equal(_stored(coll).get(ids[5:6])[0], replaced[0])
    assert np.array_equal(_stored(reader).get(ids[5:6])[0], vectors[5])  # the old version reads its own file
    _check_gather(coll, np.random.default_rng(1), absent=ids[:5])
    reader.release()
    compact(Collection.open(coll.path))
    coll = Collection.open(coll.path)
    dead = factory != "IVF8,Flat"
    assert (coll.manifest.index["rows_file"] != second) == dead  # a new file with the rewritten index
    # either way the file holds exactly the live rows
    assert len(VectorRows.from_entry(coll.path, coll.manifest.index).vectors) == len(_truth(coll)) == 400 - 9 + 20
    assert not (coll.path / first).exists()  # no reader needs it any more
    _check_gather(coll, np.random.default_rng(2), absent=ids[:5])


def test_a_rebuild_keeps_the_rows_file_a_leased_version_reads(tmp_path):
    coll = _collection(tmp_path / "c")
    first = coll.manifest.index["rows_file"]
    reader = Collection.open(coll.path, lease=True)
    build_index(coll.path, "IVF8,Flat", nprobe_default=2)
    assert (coll.path / first).is_file() and Collection.open(coll.path).manifest.index["rows_file"] != first
    assert np.array_equal(_stored(reader).get(reader.read_embeddings()[0][:5]), reader.read_embeddings()[1][:5])
    reader.release()
    build_index(coll.path, "IVF8,Flat", nprobe_default=2)
    assert not (coll.path / first).exists()


@pytest.mark.parametrize("how", ["not built", "deleted"])
def test_without_the_rows_file_the_shards_are_read_and_results_are_unchanged(tmp_path, how, monkeypatch):
    coll = _collection(tmp_path / "c")
    where = "path LIKE 'img/1000000%'"
    q = _vectors(5, 3)
    with Searcher.open(coll.path) as s:
        with_rows = s.knn(q, k=5, exact=True, where=where)
        allowed = s.filter_ids(where)
    if how == "not built":
        build_index(coll.path, "IVF8,Flat", nprobe_default=2, vector_rows=False)
        assert not Collection.open(coll.path).manifest.index.get("rows_file")
    else:
        (coll.path / coll.manifest.index["rows_file"]).unlink()
    reads: list[int] = []
    read = gather.shard_vectors
    monkeypatch.setattr(gather, "shard_vectors", lambda locator, ids: reads.append(len(ids)) or read(locator, ids))
    with Searcher.open(coll.path) as s:
        assert s.snapshot()._current.plan.stored.rows is None
        without = s.knn(q, k=5, exact=True, where=where)
    assert reads and np.array_equal(with_rows[1], without[1]) and np.allclose(with_rows[0], without[0])
    truth = _truth(Collection.open(coll.path))
    assert 0 < len(allowed) < len(truth)
    expected = exact_search(q, np.stack([truth[i] for i in allowed.tolist()]), 5, ids=allowed)[1]
    assert np.array_equal(without[1], expected)


def test_filtered_exact_search_reads_the_rows_file_not_the_shards(tmp_path, monkeypatch):
    coll = _collection(tmp_path / "c")
    monkeypatch.setattr(gather, "shard_vectors", lambda locator, ids: pytest.fail("a shard was read"))
    where = "path LIKE 'img/1000000%'"
    with Searcher.open(coll.path) as s:
        scores, found = s.knn(_vectors(4, 5), k=5, exact=True, where=where)
    truth = _truth(coll)
    keep = np.array([i for i in truth if str(i).startswith("1000000")])
    expected = exact_search(_vectors(4, 5), np.stack([truth[i] for i in keep.tolist()]), 5, ids=keep)
    assert np.array_equal(found, expected[1]) and np.allclose(scores, expected[0], atol=1e-4)


@pytest.mark.parametrize("step", [1, 3, 15, 17, 40])  # dense spans (read in chunks) and scattered rows (mapped)
def test_rows_read_equal_the_file_across_chunk_boundaries_in_any_order(tmp_path, step):
    from vlsearch.ann import refine
    from vlsearch.ann.refine import new_vectors_stem, vectors_writer

    n, dim = 3 * refine.SPAN_CHUNK + 123, 2
    vecs = np.random.default_rng(step).standard_normal((n, dim)).astype(np.float16)
    with vectors_writer(tmp_path, new_vectors_stem(), np.arange(n), dim) as add:
        add(np.arange(n), vecs)
    rows = VectorRows(tmp_path / add.fields["rows_file"], None)
    wanted = np.arange(5, n, step)
    np.testing.assert_array_equal(rows.read(wanted), vecs[wanted].astype(np.float32))
    shuffled = np.random.default_rng(0).permutation(wanted)  # callers may ask in any order, with repeats
    asked = np.concatenate([shuffled, shuffled[:7]])
    np.testing.assert_array_equal(rows.read(asked), vecs[asked].astype(np.float32))
