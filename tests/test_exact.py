"""exact_search: chunked brute force must equal a full numpy argsort, for every database form."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from vlsearch.store.collection import Collection
from vlsearch.store.manifest import Manifest
from vlsearch.store.arrays import embedding_array
from vlsearch.core.errors import InvalidQueryError
from vlsearch.query.exact import MISSING_SCORE, exact_search
from vlsearch.models.factory import ModelInfo


def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _reference(q: np.ndarray, xb: np.ndarray, k: int, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    sims = q @ xb.T
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, order, axis=1), ids[order]


@pytest.mark.parametrize("chunk_size", [7, 64, 10_000])
def test_array_matches_numpy_reference_for_any_chunk_size(chunk_size):
    rng = np.random.default_rng(0)
    xb, q = _unit(rng, 300, 16), _unit(rng, 5, 16)
    ids = rng.permutation(10_000)[:300].astype(np.int64)
    scores, got = exact_search(q, xb, k=10, ids=ids, chunk_size=chunk_size)
    ref_scores, ref_ids = _reference(q, xb, 10, ids)
    assert scores.dtype == np.float32 and got.dtype == np.int64 and got.shape == (5, 10)
    np.testing.assert_array_equal(got, ref_ids)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-6)


def test_single_query_vector_and_default_row_ids():
    rng = np.random.default_rng(1)
    xb = _unit(rng, 50, 8)
    scores, ids = exact_search(xb[17], xb, k=3, chunk_size=10)
    assert ids.shape == (1, 3) and ids[0, 0] == 17
    assert scores[0, 0] == pytest.approx(1.0, abs=1e-5)


def test_k_larger_than_database_pads_with_minus_one():
    rng = np.random.default_rng(2)
    xb, q = _unit(rng, 4, 8), _unit(rng, 2, 8)
    scores, ids = exact_search(q, xb, k=6, chunk_size=3)
    assert sorted(ids[0, :4].tolist()) == [0, 1, 2, 3]
    assert (ids[:, 4:] == -1).all() and (scores[:, 4:] == MISSING_SCORE).all()


def test_l2_metric_ranks_nearest_first():
    rng = np.random.default_rng(3)
    xb = rng.standard_normal((40, 4)).astype(np.float32)
    scores, ids = exact_search(xb[:2] + 1e-3, xb, k=1, metric="l2", chunk_size=16)
    assert ids[:, 0].tolist() == [0, 1] and (scores < 1e-3).all()


def test_collection_and_batch_iterator_give_the_same_results(tmp_path):
    rng = np.random.default_rng(4)
    d = 16
    coll = Collection.create(tmp_path / "c", Manifest(model=ModelInfo("m", None, d), shard_size=100))
    all_ids, all_vecs = [], []
    for shard in range(3):
        ids = np.arange(shard * 100, shard * 100 + 80, dtype=np.int64) * 3 + 1  # non-contiguous ids
        vecs = _unit(rng, 80, d)
        coll.write_shard(shard, pa.table({"id": ids, "path": [f"{i}.jpg" for i in ids], "embedding": embedding_array(vecs)}))
        all_ids.append(ids)
        all_vecs.append(vecs.astype(np.float16).astype(np.float32))  # what the shards store
    xb, ids = np.concatenate(all_vecs), np.concatenate(all_ids)
    q = _unit(rng, 4, d)
    ref_scores, ref_ids = _reference(q, xb, 5, ids)
    seen: list[int] = []
    s1, i1 = exact_search(q, coll, k=5, chunk_size=32, progress=seen.append)
    s2, i2 = exact_search(q, coll.iter_embeddings(batch_size=50), k=5, chunk_size=32)
    np.testing.assert_array_equal(i1, ref_ids)
    np.testing.assert_array_equal(i2, ref_ids)
    np.testing.assert_allclose(s1, ref_scores, rtol=1e-5, atol=1e-6)
    assert seen[-1] == 240 and seen == sorted(seen)


@pytest.mark.parametrize(
    "queries, k",
    [
        (np.zeros((2, 5), np.float32), 3),  # wrong dimension
        (np.zeros((2, 8), np.float32), 0),  # k <= 0
        (np.zeros((2, 8), np.float32), -1),
        (np.zeros((0, 8), np.float32), 3),  # no queries
        (np.full((1, 8), np.nan, np.float32), 3),
        (np.array([["a"] * 8]), 3),
    ],
)
def test_bad_queries_raise_invalid_query(queries, k):
    xb = np.ones((10, 8), np.float32)
    with pytest.raises(InvalidQueryError):
        exact_search(queries, xb, k=k)


def test_ids_with_collection_is_refused(tmp_path):
    coll = Collection.create(tmp_path / "c", Manifest(model=ModelInfo("m", None, 4)))
    with pytest.raises(ValueError, match="ids"):
        exact_search(np.ones((1, 4), np.float32), coll, k=1, ids=np.arange(3))
