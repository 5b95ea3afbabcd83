"""On-disk refine: fp16 rows file + id map, exact re-score of the shortlist, auto choice, Searcher, rebuilds."""

from __future__ import annotations

import numpy as np
import pytest

from indexing import build as B  # noqa: E402
from tests.test_build import SMALL, clustered, make_collection  # noqa: E402
from vlsearch.ann.faiss_index import search_parameters  # noqa: E402
from vlsearch.ann.refine import DiskRefine, new_vectors_stem, refine_fields, vectors_writer  # noqa: E402
from vlsearch.core.errors import IndexConfigError  # noqa: E402
from vlsearch.query.searcher import Searcher  # noqa: E402
from vlsearch.store.collection import Collection  # noqa: E402

DISK = "IVF32,PQ8x4fs,Refine(disk)"


@pytest.fixture(scope="module")
def data() -> np.ndarray:
    return clustered(3200)


def full_precision_rescore(coll: Collection, q: np.ndarray, shortlist: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Reference: the shortlist re-scored in float64 against the collection's stored embeddings."""
    ids, vecs = coll.read_embeddings()
    row = {int(i): r for r, i in enumerate(ids)}
    out_s, out_i = [], []
    for qi, cand in zip(q, shortlist):
        cand = cand[cand >= 0]
        scores = vecs[[row[int(c)] for c in cand]].astype(np.float64) @ qi.astype(np.float64)
        top = np.argsort(-scores, kind="stable")[:k]
        out_s.append(scores[top])
        out_i.append(cand[top])
    return np.array(out_s), np.array(out_i)


@pytest.mark.parametrize("sparse_ids", [False, True])
def test_results_equal_full_precision_rescore_of_the_shortlist(tmp_path, data, sparse_ids):
    base, fresh = data[:3000], data[3000:]
    ids = np.arange(3000, dtype=np.int64) * 7 + 1000 if sparse_ids else None
    coll = make_collection(tmp_path / "c", base, ids)
    entry = B.build_index(coll.path, DISK, policy=SMALL)
    assert entry["refine"] == "disk-fp16" and entry["factory"] == DISK
    assert (entry["refine_ids_file"] is not None) == sparse_ids  # id -> row map only when ids are not 0..N-1
    rows = np.load(coll.path / entry["refine_file"], mmap_mode="r")
    assert rows.dtype == np.float16 and rows.shape == (3000, 32)
    if not sparse_ids:  # row = id, and the rows are the stored fp16 embeddings bit for bit
        assert np.array_equal(rows[:], Collection.open(coll.path).read_embeddings()[1].astype(np.float16))

    s = Searcher.open(coll.path)
    nprobe, kf = entry["nprobe_default"], entry["k_factor_default"]
    scores, found = s.knn(fresh, k=10)  # the defaults, through the on-disk refine
    _, shortlist = s.index.search(fresh, int(np.ceil(10 * kf)), params=search_parameters(s.index, nprobe))
    ref_s, ref_i = full_precision_rescore(Collection.open(coll.path), fresh, shortlist, 10)
    assert np.allclose(scores, ref_s, atol=1e-5)
    assert (found == ref_i).mean() > 0.99  # equal up to exact score ties
    assert set(found.ravel()) <= set(Collection.open(coll.path).read_embeddings()[0])


def test_auto_chooses_disk_refine_when_sq8_does_not_fit_and_records_it(tmp_path, data):
    coll = make_collection(tmp_path / "c", data[:3000])
    entry = B.build_index(coll.path, policy=SMALL, max_bytes_per_vector=24)  # SQ8 alone needs 32 bytes
    assert entry["factory"].endswith(",Refine(disk)") and entry["refine"] == "disk-fp16"
    assert any("Refine(disk)" in r and "does not fit" in r for r in entry["reasons"])
    assert entry["bytes_per_vector"] <= 24 and entry["disk_bytes_per_vector"] == 64
    assert entry["target_met"] and entry["recall_at_10"] >= 0.95
    roomy = B.build_index(coll.path, policy=SMALL, max_bytes_per_vector=64)
    assert roomy["refine"] == "ram" and "Refine(SQ8)" in roomy["factory"]
    # the on-disk build's files went with it; the new build wrote its own vector rows file
    assert [p.name for p in coll.path.glob("vectors-*")] == [roomy["rows_file"]] and not roomy.get("refine_file")


def test_rebuild_replaces_vector_files_and_keeps_searching(tmp_path, data):
    coll = make_collection(tmp_path / "c", data[:3000])
    first = B.build_index(coll.path, DISK, policy=SMALL)
    s_old = Searcher.open(coll.path)
    second = B.build_index(coll.path, DISK, policy=SMALL)  # same seed: same index, new files
    assert first["refine_file"] != second["refine_file"]
    # the open searcher leases the first build's version: GC keeps its file until it lets go
    assert sorted(p.name for p in coll.path.glob("vectors-*")) == sorted([first["refine_file"], second["refine_file"]])
    s_new = Searcher.open(coll.path)
    _, a = s_new.knn(data[3000:3010], k=5)
    _, b = s_old.knn(data[3000:3010], k=5)
    assert np.array_equal(a, b)
    s_old.close()
    third = B.build_index(coll.path, DISK, policy=SMALL)
    s_new.close()
    assert first["refine_file"] not in [p.name for p in coll.path.glob("vectors-*")]
    assert third["refine_file"] in [p.name for p in coll.path.glob("vectors-*")]


def test_rescore_pads_and_skips_missing_ids(tmp_path):
    vecs = np.eye(4, dtype=np.float32)
    coll = make_collection(tmp_path / "c", vecs, ids=np.array([3, 5, 8, 9]), shard_size=4)
    with vectors_writer(coll.path, new_vectors_stem(), np.array([3, 5, 8, 9]), 4) as add:
        for ids, v in Collection.open(coll.path).iter_embeddings():
            add(ids, v)
    r = DiskRefine.from_entry(coll.path, refine_fields(add.fields))
    d, i = r.rescore(np.array([[0, 1, 0, 0]], np.float32), np.array([[3, -1, 5, 42]]), 3)
    assert i.tolist() == [[5, 3, -1]] and d[0, 0] == 1.0 and d[0, 2] == -np.inf
    d, i = r.rescore(np.array([[0, 0, 1, 0]], np.float32), np.array([[8]]), 2)
    assert i.tolist() == [[8, -1]]


def test_disk_refine_needs_an_ivf(tmp_path, data):
    coll = make_collection(tmp_path / "c", data[:500])
    with pytest.raises(IndexConfigError, match="Refine\\(disk\\)"):
        B.build_index(coll.path, "Flat,Refine(disk)", policy=SMALL)
    with pytest.raises(IndexConfigError, match="Refine\\(disk\\)"):
        B.build_index(coll.path, "IVF16,PQ8x4fs,RFlat,Refine(disk)", policy=SMALL)


def test_cli_max_bytes_per_vector_builds_the_disk_plan_and_searches(tmp_path, data):
    from typer.testing import CliRunner

    from vlsearch.app.cli import app

    coll = make_collection(tmp_path / "c", data[:3000])
    runner = CliRunner()
    # auto's Flat threshold is 100k: force IVF with a small explicit factory to keep the test fast
    out = runner.invoke(app, ["build-index", str(coll.path), "-t", DISK, "--max-bytes-per-vector", "24"])
    assert out.exit_code == 0, out.output
    assert "Refine(disk)" in out.output and "B/vector on disk" in out.output
    out = runner.invoke(app, ["info", str(coll.path), "--json"])
    assert out.exit_code == 0 and "Refine(disk)" in out.output


def test_rescore_l2_ranks_by_exact_squared_distance(tmp_path):
    rng = np.random.default_rng(0)
    vecs = rng.normal(size=(50, 8)).astype(np.float16).astype(np.float32)
    coll = make_collection(tmp_path / "c", vecs, shard_size=50)
    with vectors_writer(coll.path, new_vectors_stem(), np.arange(50), 8) as add:
        for ids, v in Collection.open(coll.path).iter_embeddings():
            add(ids, v)
    r = DiskRefine.from_entry(coll.path, {**refine_fields(add.fields), "metric": "l2"})
    q = rng.normal(size=(3, 8)).astype(np.float32)
    cand = rng.permutation(50)[None, :20].repeat(3, 0)
    d, i = r.rescore(q, cand, 5)
    want = ((vecs[cand] - q[:, None, :]) ** 2).sum(-1)
    order = np.argsort(want, axis=1)[:, :5]
    assert np.array_equal(i, np.take_along_axis(cand, order, 1))
    assert np.allclose(d, np.take_along_axis(want, order, 1), rtol=1e-5)
