"""Filtered search: the top-k of the rows passing a metadata filter, and filters that are data only."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from vlsearch.app.cli import app
from vlsearch.store.collection import Collection
from vlsearch.store.manifest import Manifest
from vlsearch.store.arrays import embedding_array
from vlsearch.core.errors import InvalidQueryError
from vlsearch.query.filters import FilterEngine, compile_filter
from vlsearch.core.modelinfo import ModelInfo
from vlsearch.query.plan import AnnSearch, FilterSubsets
from vlsearch.query.searcher import Searcher
from vlsearch.query.subset import Subset, SubsetPolicy, plan
from vlsearch.store.gather import row_groups

N, D, SHARD = 9000, 32, 4500  # two shards of two row groups each (row groups hold 4096 rows)
LABELS = np.array(["dog", "cat", "bird"])
runner = CliRunner()


pytestmark = pytest.mark.usefixtures("one_faiss_thread")


def _metadata(n: int, rng: np.random.Generator) -> dict[str, pa.Array]:
    captions = []
    for i in range(n):
        captions.append([] if i % 7 == 0 else [f"photo {i}", "a dog on grass" if i % 5 == 0 else "a cat"])
    score = rng.random(n)
    return {
        "width": pa.array(rng.integers(100, 2000, n).astype(np.int32)),
        "height": pa.array(rng.integers(100, 2000, n).astype(np.int32)),
        "captions": pa.array(captions, type=pa.list_(pa.string())),
        "label": pa.array(LABELS[rng.integers(0, 3, n)]),
        "score": pa.array(np.where(np.arange(n) % 11 == 0, np.nan, score), mask=np.arange(n) % 11 == 0),
    }


@pytest.fixture(scope="module")
def coll_path(tmp_path_factory) -> Path:
    """N unit vectors with sparse, unsorted ids and metadata columns; no index."""
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((N, D)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = rng.permutation(N).astype(np.int64) * 7 + 3
    meta = _metadata(N, rng)
    root = tmp_path_factory.mktemp("filters") / "coll"
    coll = Collection.create(root, Manifest(model=ModelInfo("synthetic", None, D), shard_size=SHARD))
    for s, start in enumerate(range(0, N, SHARD)):
        sl = slice(start, start + SHARD)
        coll.write_shard(s, pa.table({
            "id": ids[sl], "path": [f"img/{i:05d}.jpg" for i in range(start, start + SHARD)],
            **{k: v[start:start + SHARD] for k, v in meta.items()}, "embedding": embedding_array(vectors[sl])}))
    coll.update_manifest(counts={"images": N, "captions": 0, "failures": 0, "shards": 2}, complete=True)
    return root


def _with_index(src: Path, dest: Path, factory: str, nprobe: int) -> Path:
    shutil.copytree(src, dest)
    coll = Collection.open(dest)
    ids, vecs = coll.read_embeddings()
    index = faiss.index_factory(D, factory, faiss.METRIC_INNER_PRODUCT)
    index.train(vecs)
    index.add_with_ids(vecs, ids)
    faiss.write_index(index, str(coll.index_path))
    coll.update_manifest(index={"factory": factory, "metric": "ip", "nprobe_default": nprobe,
                                "ntotal": index.ntotal, "model": coll.model.to_dict(), "file": "index.faiss"})
    return dest


@pytest.fixture(scope="module")
def indexed(coll_path, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("filters-indexed")
    return {
        "flat": _with_index(coll_path, root / "flat", "IDMap2,Flat", 1),
        "ivf": _with_index(coll_path, root / "ivf", "IVF32,Flat", 2),
        "refine": _with_index(coll_path, root / "refine", "IDMap2,IVF32,PQ16x4fs,Refine(Flat)", 2),
    }


def _table(path: Path) -> pa.Table:
    return Collection.open(path).read_table(columns=["id", "width", "height", "label", "captions", "score"])


def _truth(path: Path, mask: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force top-k over the rows where ``mask`` holds (numpy, independent of the searcher)."""
    ids, vecs = Collection.open(path).read_embeddings()
    table_ids = _table(path).column("id").to_numpy()
    allowed = np.isin(ids, table_ids[mask])
    scores = queries @ vecs[allowed].T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, 1), ids[allowed][order]


def _masks(t: pa.Table) -> dict[str, np.ndarray]:
    """Filters and the rows they select, computed with numpy."""
    w, h = t.column("width").to_numpy(), t.column("height").to_numpy()
    label = np.asarray(t.column("label").to_pylist())
    caps = t.column("captions").to_pylist()
    score = t.column("score").to_numpy(zero_copy_only=False)
    ids = t.column("id").to_numpy()
    return {
        "width >= 1000 AND label = 'dog'": (w >= 1000) & (label == "dog"),
        "label IN ('cat', 'bird') OR width * height < 250000": np.isin(label, ["cat", "bird"]) | (w * h < 250000),
        "width BETWEEN 500 AND 520": (w >= 500) & (w <= 520),
        "caption ILIKE '%DOG%'": np.array([any("dog" in c.lower() for c in cs) for cs in caps]),
        "len(captions) = 0 AND NOT label = 'cat'": np.array([len(c) == 0 for c in caps]) & (label != "cat"),
        "score IS NULL AND width > 1500": np.isnan(score) & (w > 1500),
        f"id IN ({ids[5]}, {ids[17]}, {ids[4000]})": np.isin(ids, ids[[5, 17, 4000]]),
        "width > 5000": np.zeros(len(w), bool),
    }


@pytest.fixture(scope="module")
def queries() -> np.ndarray:
    q = np.random.default_rng(1).standard_normal((6, D)).astype(np.float32)
    return q / np.linalg.norm(q, axis=1, keepdims=True)


# ---- results equal exact filtered search ----------------------------------------------------

def _check_equal(searcher: Searcher, path: Path, queries: np.ndarray, k: int, **options) -> None:
    for where, mask in _masks(_table(path)).items():
        scores, ids = searcher.knn(queries, k=k, where=where, **options)
        t_scores, t_ids = _truth(path, mask, queries, k)
        n = min(k, int(mask.sum()))
        assert (ids[:, :n] >= 0).all() and (ids[:, n:] == -1).all(), where  # k hits whenever k rows pass
        assert np.array_equal(ids[:, :n], t_ids[:, :n]), where
        np.testing.assert_allclose(scores[:, :n], t_scores[:, :n], atol=1e-5)


def test_exact_filtered_search_equals_brute_force_without_an_index(coll_path, queries):
    _check_equal(Searcher.open(coll_path), coll_path, queries, k=10)


@pytest.mark.parametrize("name", ["flat", "ivf"])
@pytest.mark.parametrize("exact_max_rows", [0, 10**9])  # selector path / exact-subset path
def test_filtered_search_equals_exact_on_flat_and_full_probe_ivf(indexed, queries, name, exact_max_rows):
    s = Searcher.open(indexed[name], subset_policy=SubsetPolicy(exact_max_rows=exact_max_rows))
    _check_equal(s, indexed[name], queries, k=10, nprobe=32 if name == "ivf" else None)


def test_pq_refine_with_idmap_returns_complete_lists_of_passing_rows(indexed, queries):
    path = indexed["refine"]
    s = Searcher.open(path, subset_policy=SubsetPolicy(exact_max_rows=0))
    for where, mask in _masks(_table(path)).items():
        _, ids = s.knn(queries, k=10, where=where, nprobe=32, k_factor=50)  # all lists: only PQ approximates
        allowed = set(_table(path).column("id").to_numpy()[mask].tolist())
        n = min(10, len(allowed))
        assert (ids[:, :n] >= 0).all() and (ids[:, n:] == -1).all(), where
        assert set(ids[ids >= 0].tolist()) <= allowed, where
        _, t_ids = _truth(path, mask, queries, 10)
        recall = np.mean([len(set(a[:n]) & set(b[:n])) / n for a, b in zip(ids, t_ids)]) if n else 1.0
        assert recall >= 0.9, (where, recall)


def test_filtered_ann_reranks_more_candidates_unless_the_call_says(indexed, queries, monkeypatch):
    s = Searcher.open(indexed["refine"], subset_policy=SubsetPolicy(exact_max_rows=0, min_k_factor=40))
    seen = []
    real = AnnSearch.search
    monkeypatch.setattr(AnnSearch, "search", lambda self, q, k, nprobe, k_factor, sel=None: (
        seen.append(k_factor), real(self, q, k, nprobe, k_factor, sel))[1])
    s.knn(queries, k=5, where="label = 'dog'")
    s.knn(queries, k=5, where="label = 'dog'", k_factor=3)
    assert seen == [40, 3]


@pytest.mark.parametrize("nlist_known", [True, False])
def test_a_probe_that_finds_too_few_rows_is_redone_so_lists_are_never_short(indexed, queries, nlist_known,
                                                                            monkeypatch):
    """nprobe=1 with ~0.5 % of rows passing: most lists hold none, the first ANN lists come back
    short; they are redone probing every list (or exactly when nlist is unknown)."""
    path = indexed["ivf"]
    s = Searcher.open(path, subset_policy=SubsetPolicy(exact_max_rows=0, nprobe_exponent=0.0))
    if not nlist_known:
        monkeypatch.setattr("vlsearch.query.plan.find_ivf", lambda index: None)
    where = "width BETWEEN 500 AND 520"
    mask = _masks(_table(path))[where]
    scores, ids = s.knn(queries, k=10, nprobe=1, where=where)
    _, t_ids = _truth(path, mask, queries, 10)
    assert np.array_equal(ids, t_ids)


def test_search_vector_hits_carry_metadata_that_passes_the_filter(coll_path, queries):
    hits = Searcher.open(coll_path).search_vector(queries[0], k=5, where="label = 'bird' AND width < 800")
    assert len(hits) == 5 and [h.rank for h in hits] == [1, 2, 3, 4, 5]
    assert all(h.metadata["label"] == "bird" and h.metadata["width"] < 800 for h in hits)


def test_plan_switches_to_exact_for_small_subsets_and_widens_the_probe_for_large_ones():
    policy = SubsetPolicy(exact_max_rows=100, nprobe_exponent=0.5)
    assert plan(50, 10_000, 8, 64, False, True, policy) == ("exact", None)
    assert plan(5_000, 10_000, 8, 64, True, True, policy) == ("exact", None)
    assert plan(5_000, 10_000, 8, 64, False, False, policy) == ("exact", None)
    assert plan(2_500, 10_000, 8, 64, False, True, policy) == ("ann", 16)  # 8 * 0.25 ** -0.5
    assert plan(101, 10_000, 8, 64, False, True, policy) == ("ann", 64)  # capped at nlist
    # small but scattered over many row groups and not gathered yet: a cold gather would cost more
    assert plan(50, 10_000, 8, 64, False, True, policy, cheap_gather=lambda: False) == ("ann", 64)


def test_a_gather_counts_the_row_groups_it_reads(coll_path):
    s = Searcher.open(coll_path)
    ids = Collection.open(coll_path).read_table(columns=["id"]).column("id").to_numpy()
    # rows 0 and 1 share shard 0's first row group; row 4100 is in its second; row 4600 in shard 1
    assert row_groups(s.row_locator, ids[[0, 1]]) == 1
    assert row_groups(s.row_locator, ids[[0, 1, 4100, 4600]]) == 3


def test_sparse_ids_use_a_hash_set_selector_and_dense_ids_a_bitmap():
    assert isinstance(Subset(np.array([5, 1, 9])).selector(), faiss.IDSelectorBitmap)
    big = Subset(np.array([3, 2**40]))
    sel = big.selector()
    assert isinstance(sel, faiss.IDSelectorBatch) and sel.is_member(2**40) and not sel.is_member(4)


# ---- caching and what is read ---------------------------------------------------------------

def test_filter_results_and_gathered_vectors_are_cached(coll_path, queries, monkeypatch):
    s = Searcher.open(coll_path)
    where = "width BETWEEN 500 AND 520"
    first = s.knn(queries, k=5, where=where)
    calls = {"sql": 0, "groups": 0}
    engine = s.filter_engine
    original = FilterEngine.matching_ids
    monkeypatch.setattr(FilterEngine, "matching_ids", lambda self, c: (calls.__setitem__("sql", calls["sql"] + 1),
                                                                      original(self, c))[1])
    read_group = pq.ParquetFile.read_row_group
    monkeypatch.setattr(pq.ParquetFile, "read_row_group", lambda self, *a, **k: (
        calls.__setitem__("groups", calls["groups"] + 1), read_group(self, *a, **k))[1])
    second = s.knn(queries, k=5, where=where)
    assert calls == {"sql": 0, "groups": 0} and engine is s.filter_engine
    assert np.array_equal(first[1], second[1])
    s.knn(queries, k=5, where="width BETWEEN 500 AND 521")  # another filter: evaluated once more
    assert calls["sql"] == 1


def test_filter_results_are_kept_only_within_the_filter_cache_budget(coll_path, monkeypatch):
    evaluated = []
    original = FilterEngine.matching_ids
    monkeypatch.setattr(FilterEngine, "matching_ids", lambda self, c: evaluated.append(c.sql) or original(self, c))
    where = "width BETWEEN 500 AND 520"
    for s, evaluations in ((Searcher.open(coll_path), 1), (Searcher.open(coll_path, filter_cache_mb=0), 2)):
        evaluated.clear()
        assert np.array_equal(s.filter_ids(where), s.filter_ids(where))
        assert len(evaluated) == evaluations
        assert s.filter_engine.compile(where) is s.filter_engine.compile(where)  # checked once per text


def test_filters_only_allow_rows_the_searcher_can_return(coll_path):
    """Rows missing from the searcher's row map (e.g. deleted in its collection version) never pass."""
    from vlsearch.store.rows import RowLocator

    coll = Collection.open(coll_path)
    first_shard = coll.shard_paths()[:1]
    filters = FilterSubsets(RowLocator(first_shard), coll, cache_bytes=1 << 20)
    filters.engine = Searcher.open(coll_path).filter_engine  # every shard's metadata
    ids = filters.subset("label = 'dog'").ids
    shard0 = pq.read_table(first_shard[0], columns=["id", "label"]).to_pydict()
    assert sorted(ids.tolist()) == sorted(i for i, lab in zip(shard0["id"], shard0["label"]) if lab == "dog")


def test_filtering_never_reads_the_embedding_column(coll_path, monkeypatch):
    seen = []
    read = pq.ParquetFile.read
    monkeypatch.setattr(pq.ParquetFile, "read", lambda self, columns=None, **k: (seen.append(columns),
                                                                                 read(self, columns=columns, **k))[1])
    ids = Searcher.open(coll_path).filter_ids("label = 'dog'")
    assert seen and all(cols is not None and "embedding" not in cols for cols in seen)
    assert len(ids) > 0 and np.all(ids[1:] > ids[:-1])


# ---- a filter is data, never code -----------------------------------------------------------

SCHEMA = ["id", "path", "width", "height", "captions", "label"]


@pytest.mark.parametrize("where, message", [
    ("read_csv('/etc/passwd') IS NOT NULL", "read_csv"),
    ("width > 1; DROP TABLE images", "statements"),
    ("width > 1; COPY images TO '/tmp/vlsearch-leak.csv'", "statements"),
    ("id IN (SELECT id FROM images)", "subquery"),
    ("EXISTS (SELECT 1)", "subquery"),
    ("width > (SELECT max(width) FROM images)", "subquery"),
    ("colour = 'red'", "unknown column 'colour'"),
    ("label = 'dog", "unterminated"),
    ("getenv('HOME') = '/root'", "getenv"),
    ("width > 1 /* hidden */ ; ATTACH '/tmp/x.db' AS x", "statements"),
    ("width > 1; SET enable_external_access = true", "statements"),
    ("width > 1; PRAGMA threads = 64", "statements"),
    ("read_parquet('/work/shared/data/x.parquet') IS NULL", "read_parquet"),
    ("current_setting('threads') = '1'", "current_setting"),
    ("width > 1 UNION SELECT 1", "only a condition"),
    ("width > 1 ORDER BY 1", "only a condition"),
    ("list_filter(captions, x -> x = 'a') = []", "list_filter"),
    ("images.width > 1", "qualified name"),
    ("id = $1", "parameter"),
    ("COLUMNS('.*') IS NULL", "COLUMNS"),
    ("", "empty filter"),
    ("width >", "syntax error"),
])
def test_unsafe_or_bad_filters_raise_invalid_query_naming_the_problem(where, message):
    with pytest.raises(InvalidQueryError, match=None) as info:
        compile_filter(where, SCHEMA)
    assert message.lower() in str(info.value).lower()


def test_what_runs_is_the_checked_tree_not_the_text():
    c = compile_filter("width > 1 -- ; DROP TABLE images", SCHEMA)
    assert c.sql == "SELECT id FROM images WHERE (width > 1)" and c.columns == ("width",)
    assert compile_filter("caption LIKE '%dog%'", SCHEMA).per_caption


def test_engine_is_locked_down_even_for_sql_that_skipped_the_checks(tmp_path):
    import duckdb

    engine = FilterEngine(pa.table({"id": pa.array([1, 2], pa.int64())}))
    target = tmp_path / "leak.csv"
    for sql in ["SELECT * FROM read_csv('/etc/passwd')", f"COPY images TO '{target}'",
                "SET enable_external_access = true", f"ATTACH '{tmp_path / 'x.db'}'", "INSTALL httpfs",
                "LOAD httpfs"]:
        with pytest.raises(duckdb.Error):
            engine._con.execute(sql)
    assert not target.exists()


def test_a_type_error_is_reported_as_invalid_query(coll_path):
    with pytest.raises(InvalidQueryError, match="cannot be evaluated"):
        Searcher.open(coll_path).filter_ids("label > 5")


def test_cli_search_where(coll_path, tmp_path, tiny_encoder):
    """``vlsearch search COLL TEXT --where``: needs the collection's model, so use the tiny one."""
    dest = tmp_path / "tiny"
    coll = Collection.open(coll_path)
    ids, _ = coll.read_embeddings()
    shutil.copytree(coll_path, dest)
    c = Collection.open(dest)
    for p in c.shard_paths():
        t = pq.read_table(p)
        vecs = np.random.default_rng(0).standard_normal((t.num_rows, tiny_encoder.dim)).astype(np.float32)
        t = t.set_column(t.schema.get_field_index("embedding"), "embedding", embedding_array(vecs))
        pq.write_table(t, p, row_group_size=4096)
    c.update_manifest(model=tiny_encoder.info)
    result = runner.invoke(app, ["search", str(dest), "a dog", "-k", "3", "--where", "label = 'cat' AND width > 1500",
                                 "--json", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.output.strip().splitlines()]
    assert len(rows) == 3 and all(r["metadata"]["label"] == "cat" and r["metadata"]["width"] > 1500 for r in rows)
    result = runner.invoke(app, ["search", str(dest), "a dog", "--where", "colour = 'red'", "--device", "cpu"])
    assert result.exit_code == 1 and "unknown column 'colour'" in result.output
