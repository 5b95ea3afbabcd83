"""indexing.build: index kinds, auto policy, sampling, reproducibility, loading, atomic rebuilds."""

from __future__ import annotations

import json
import os

import faiss
import numpy as np
import pyarrow as pa
import pytest

from indexing import build  # noqa: E402
from vlsearch.ann import faiss_index  # noqa: E402
from vlsearch.ann import plan as P  # noqa: E402
from vlsearch.core.errors import CollectionMismatchError, IndexConfigError, IndexNotBuiltError  # noqa: E402
from vlsearch.core.modelinfo import ModelInfo  # noqa: E402
from vlsearch.store.arrays import embedding_array
from vlsearch.store.collection import Collection
from vlsearch.store.manifest import Manifest

DIM = 32
SMALL = P.AutoPolicy(flat_max_n=1000, nlist_factor=1.0, min_nlist=16, fastscan_bytes=8,
                     max_bytes_per_vector=64, train_per_centroid=40, eval_queries=100)


def clustered(n: int, dim: int = DIM, centres: int = 40, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centres, dim))
    x = c[rng.integers(0, centres, n)] + 0.4 * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def make_collection(path, vectors: np.ndarray, ids: np.ndarray | None = None, shard_size: int = 1000,
                    model: ModelInfo | None = None) -> Collection:
    n, dim = vectors.shape
    ids = np.arange(n, dtype=np.int64) if ids is None else ids
    coll = Collection.create(path, Manifest(model=model or ModelInfo("synthetic", None, dim), shard_size=shard_size))
    for k, s in enumerate(range(0, n, shard_size)):
        sl = slice(s, s + shard_size)
        coll.write_shard(k, pa.table({
            "id": ids[sl], "path": [f"img/{i}.jpg" for i in ids[sl]],
            "width": pa.array(np.full(len(ids[sl]), 8, np.int32)), "height": pa.array(np.full(len(ids[sl]), 8, np.int32)),
            "captions": pa.array([[] for _ in ids[sl]], type=pa.list_(pa.string())),
            "embedding": embedding_array(vectors[sl])}))
    coll.update_manifest(counts={"images": n, "captions": 0, "failures": 0, "shards": k + 1}, complete=True)
    return Collection.open(path)


@pytest.fixture(scope="module")
def data() -> np.ndarray:
    return clustered(3000)


KINDS = ["Flat", "IVF32,Flat", "IVF32,PQ16x4fs", "IVF32,PQ16x4fs,RFlat", "IVF32,PQ8x4fs,Refine(PCA16,SQ8)",
         "PCA16,IVF32,PQ8x4fs", "PCAR32,IVF32,PQ16x4fs,Refine(SQ8)", "HNSW16"]


@pytest.mark.parametrize("factory", KINDS)
def test_every_kind_maps_ids_to_rows(tmp_path, data, factory):
    ids = np.arange(len(data), dtype=np.int64) * 7 + 1000  # not 0..N-1: ids must come from the shards
    coll = make_collection(tmp_path / "c", data, ids)
    entry = build.build_index(coll.path, factory, policy=SMALL)
    index = Collection.open(coll.path).load_index()
    assert index.ntotal == len(data) and entry["ntotal"] == len(data)
    faiss_index.set_search_params(index, nprobe=32, k_factor=10)
    q, own = data[::100], ids[::100]
    _, found = index.search(q, 50)
    assert set(found.ravel()) <= set(ids)
    # each query is a collection row: its own id is among the results (4-bit codes are lossy, so
    # not always first); a wrong id mapping would never return it
    assert np.mean([o in f for o, f in zip(own, found)]) >= 0.9
    lossless_rerank = ("Refine" in factory and "Refine(PCA" not in factory) or "RFlat" in factory
    if "PQ" not in factory or lossless_rerank:  # full-dimension re-ranking: it comes first
        assert (found[:, 0] == own).mean() >= 0.9
    assert entry["factory"] == factory and entry["model"] == coll.model.to_dict()
    manifest = Collection.open(coll.path).manifest.index
    assert manifest["bytes_per_vector"] == entry["bytes_per_vector"] and manifest["file"] == "index.faiss"


def test_auto_flat_for_small_ivf_pq_above_threshold(tmp_path, data):
    small = make_collection(tmp_path / "small", data[:800])
    assert build.build_index(small.path, policy=SMALL)["factory"] == "Flat"
    big = make_collection(tmp_path / "big", data)
    entry = build.build_index(big.path, policy=SMALL)
    assert entry["factory"].startswith("IVF") and "x4fs" in entry["factory"] and "Refine(" in entry["factory"]
    assert entry["nlist"] >= 16 and entry["bytes_per_vector"] <= 64
    assert entry["recall_at_10"] >= 0.95 and entry["nprobe_default"] >= 1
    index = Collection.open(big.path).load_index()
    assert faiss_index.find_ivf(index).nprobe == entry["nprobe_default"]  # stored in the file too
    assert any("flat_max_n" in r for r in entry["reasons"])


def test_auto_respects_memory_budget():
    plan = P.choose_index(2_000_000, 512, P.parse_memory("30MB"))
    # 30 MB / 2M vectors leaves no room for a refine code in RAM: the shortlist is re-scored from disk
    assert plan.factory == "IVF4096,PQ2x4fs,Refine(disk)" and plan.disk_refine
    assert P.choose_index(1_000_000, 512, P.parse_memory("4GB")).factory == "IVF4096,PQ64x4fs,Refine(SQ8)"
    # a tighter budget: 80% of 100 MiB over 1M vectors -> 83 bytes each, less ids and centroids -> 64-byte codes
    assert P.choose_index(1_000_000, 512, P.parse_memory("100MB")).factory == "IVF4096,PQ128x4fs,Refine(disk)"
    assert P.choose_index(10_000_000, 512, P.parse_memory("4GB")).factory == "IVF16384,PQ128x4fs,Refine(disk)"
    # 80 - 8 (id) - 9 (centroids of 4096 lists) leaves 63 bytes: 32-byte codes (d=512 divisors); 2048 lists
    # (5 bytes of centroids) leave room for 64-byte codes, which shortlist far better: half the lists
    compact = P.AutoPolicy(max_bytes_per_vector=80)
    plan = P.choose_index(1_000_000, 512, P.parse_memory("4GB"), policy=compact)
    assert plan.factory == "IVF2048,PQ128x4fs,Refine(disk)" and plan.nlist == 2048
    assert any("nlist=2048: half the lists" in r for r in plan.reasons)
    assert P.choose_index(1000, 512, P.parse_memory("1MB")).factory != "Flat"  # Flat would not fit


def test_training_sample_is_uniform_not_first_rows(tmp_path):
    # first shard: one tight cluster; the rest: the real spread. A first-N sample would only see shard 0.
    rng = np.random.default_rng(1)
    first = np.tile(clustered(1, seed=5), (1000, 1)) + 0.001 * rng.standard_normal((1000, DIM)).astype(np.float32)
    rest = clustered(3000, seed=2)
    coll = make_collection(tmp_path / "c", np.concatenate([first, rest]))
    train, held = build.sample_positions(4000, 1200, 100, seed=0)
    assert len(set(train) & set(held)) == 0
    assert 0.15 < (train < 1000).mean() < 0.35  # ~25 % from the first shard, not 100 %
    xt, xq = build.gather_rows(coll, [train, held], batch_size=512)
    assert np.allclose(xt, coll.read_embeddings()[1][train])
    entry = build.build_index(coll.path, "IVF32,Flat", train_size=1200, policy=SMALL)
    assert entry["train_size"] == 1200
    # centroids cover the spread of the whole collection, so lists are not all in one cell
    index = Collection.open(coll.path).load_index()  # keep a reference: find_ivf returns a view into it
    ivf = faiss_index.find_ivf(index)
    sizes = np.array([ivf.invlists.list_size(i) for i in range(ivf.nlist)])
    assert sizes.max() < 0.5 * ivf.ntotal


def test_reproducible_with_seed(tmp_path, data):
    coll = make_collection(tmp_path / "c", data)
    factory = "PCA16,IVF32,PQ8x4fs,Refine(SQ8)"
    build.build_index(coll.path, factory, seed=3, policy=SMALL)
    first = coll.index_path.read_bytes()
    d1, i1 = Collection.open(coll.path).load_index().search(data[:50], 10)
    build.build_index(coll.path, factory, seed=3, policy=SMALL)
    assert coll.index_path.read_bytes() == first
    d2, i2 = Collection.open(coll.path).load_index().search(data[:50], 10)
    assert np.array_equal(i1, i2) and np.array_equal(d1, d2)
    build.build_index(coll.path, factory, seed=4, policy=SMALL)
    assert coll.index_path.read_bytes() != first


def test_refuses_mismatched_model_or_dim(tmp_path, data):
    coll = make_collection(tmp_path / "c", data[:500])
    build.build_index(coll.path, "Flat")
    coll = Collection.open(coll.path)
    coll.update_manifest(model=ModelInfo("synthetic", None, 64))
    with pytest.raises(CollectionMismatchError, match="dim=32"):
        Collection.open(coll.path).load_index()
    # manifest says the right model but the file holds another dimension
    coll.update_manifest(model=ModelInfo("synthetic", None, DIM))
    faiss.write_index(faiss.IndexFlatIP(16), str(coll.index_path))
    with pytest.raises(CollectionMismatchError, match="dimension 16"):
        Collection.open(coll.path).load_index()


def test_missing_index(tmp_path, data):
    coll = make_collection(tmp_path / "c", data[:100])
    with pytest.raises(IndexNotBuiltError):
        Collection.open(coll.path).load_index()


def test_memory_mapped_load(tmp_path, data):
    coll = make_collection(tmp_path / "c", data)
    for factory in ("Flat", "IVF32,PQ16x4fs"):
        build.build_index(coll.path, factory, policy=SMALL)
        a = Collection.open(coll.path).load_index().search(data[:20], 5)
        b = Collection.open(coll.path).load_index(mmap=True).search(data[:20], 5)
        assert np.array_equal(a[1], b[1]) and np.allclose(a[0], b[0])


def test_rebuild_is_atomic(tmp_path, data, monkeypatch):
    coll = make_collection(tmp_path / "c", data)
    old = build.build_index(coll.path, "IVF32,Flat", policy=SMALL)
    old_bytes = coll.index_path.read_bytes()
    real_write = faiss.write_index

    def crash(index, path):
        real_write(index, path)
        with open(path, "r+b") as fh:  # half-written file, then the process dies
            fh.truncate(os.path.getsize(path) // 2)
        raise KeyboardInterrupt

    monkeypatch.setattr(faiss, "write_index", crash)
    with pytest.raises(KeyboardInterrupt):
        build.build_index(coll.path, "IVF64,PQ8x4fs", policy=SMALL)
    monkeypatch.undo()
    assert coll.index_path.read_bytes() == old_bytes
    assert not [p for p in coll.path.iterdir() if p.name.endswith(".tmp")]
    reopened = Collection.open(coll.path)
    assert reopened.manifest.index["factory"] == old["factory"]
    assert reopened.load_index().ntotal == len(data)


def test_bad_inputs(tmp_path, data):
    coll = make_collection(tmp_path / "c", data[:500])
    with pytest.raises(IndexConfigError, match="IVF32,PQ7x4fs"):
        build.build_index(coll.path, "IVF32,PQ7x4fs")
    with pytest.raises(IndexConfigError, match="could not parse"):
        build.build_index(coll.path, "NotAnIndex")
    with pytest.raises(IndexConfigError, match="memory"):
        build.build_index(coll.path, max_memory="lots")
    with pytest.raises(IndexConfigError, match="metric"):
        build.build_index(coll.path, metric="cosine")
    assert not coll.index_path.exists()
    assert P.parse_memory("4GB") == 4 * 2**30 and P.parse_memory("512MiB") == 512 * 2**20
    assert P.parse_memory(1000) == 1000


def test_explicit_nprobe_is_recorded(tmp_path, data):
    coll = make_collection(tmp_path / "c", data)
    entry = build.build_index(coll.path, "IVF32,Flat", nprobe_default=3, policy=SMALL)
    index = Collection.open(coll.path).load_index()
    assert entry["nprobe_default"] == 3 and faiss_index.find_ivf(index).nprobe == 3
    assert 0 <= entry["recall_at_10"] <= 1


def test_progress_reports_add(tmp_path, data):
    coll = make_collection(tmp_path / "c", data[:1500])
    calls = []
    build.build_index(coll.path, "IVF16,Flat", progress=lambda done, total=None, **kw: calls.append((done, total, kw)))
    adds = [c for c in calls if c[2].get("stage") == "add"]
    assert adds[-1][:2] == (1500, 1500)


def test_gpu_plan_without_gpu():
    p = P.gpu_plan("IVF4096,PQ64x4fs,Refine(PQ64)", 512)
    assert p.factory == "IVF4096,PQ32,Refine(PQ64)" and not p.use_float16_lookup_tables
    p = P.gpu_plan("OPQ64_512,IVF1024,PQ128x4fs", 512)
    assert p.factory == "OPQ64_512,IVF1024,PQ64" and p.use_float16_lookup_tables
    p = P.gpu_plan("IVF1024,PQ128", 512)  # 128 bytes is not a GPU code size: largest supported below
    assert p.factory == "IVF1024,PQ96" if 512 % 96 == 0 else p.factory == "IVF1024,PQ64"
    assert P.gpu_plan("IVF256,Flat", 512).factory == "IVF256,Flat"
    plan = P.choose_index(1_000_000, 512, P.parse_memory("4GB"), gpu=True)
    assert "x4fs" not in plan.factory and plan.factory.split(",")[1].startswith("PQ")
    assert int(plan.factory.split(",")[1][2:]) in P.GPU_PQ_M


def test_manifest_entry_fields(tmp_path, data):
    coll = make_collection(tmp_path / "c", data)
    build.build_index(coll.path, "IVF32,PQ8x4fs", policy=SMALL)
    entry = json.loads((coll.path / "manifest.json").read_text())["index"]
    for key in ("factory", "metric", "nlist", "nprobe_default", "code_size", "bytes_per_vector", "ntotal",
                "train_size", "build_seconds", "peak_rss_mb", "reasons", "built_at", "model", "file"):
        assert key in entry, key
    assert entry["code_size"] == 4 and entry["bytes_per_vector"] == 4 + 8 and entry["nlist"] == 32


def test_a_selector_keeps_what_the_search_parameters_already_referenced(data, monkeypatch):
    """An IDMap's translated selector is appended to the parameters' ``referenced_objects``: the
    sub-objects already there stay alive. (faiss versions that keep the keyword arguments of
    ``SearchParameters`` alive only in that list are simulated here; replacing the list would
    free the refine's base parameters while the C++ object still points at them.)"""
    import gc

    kept = []
    real = faiss.IndexRefineSearchParameters

    def keeping_keywords(**kwargs):
        params = real(**kwargs)
        params.referenced_objects = [v for v in kwargs.values() if hasattr(v, "this")]
        kept.extend(params.referenced_objects)
        return params

    monkeypatch.setattr(faiss, "IndexRefineSearchParameters", keeping_keywords)
    ids = np.arange(len(data), dtype=np.int64) * 7 + 1000
    index = faiss.IndexIDMap(faiss_index.make_index("IVF16,Flat,RFlat", DIM))
    index.train(data)
    index.add_with_ids(data, ids)
    sel = faiss.IDSelectorBatch(ids[:100])
    params = faiss_index.search_parameters(index, nprobe=16, k_factor=2, sel=sel)
    assert len(kept) == 1 and any(obj is kept[0] for obj in params.referenced_objects)
    assert any(obj is sel for obj in params.referenced_objects)
    del kept[:], sel
    gc.collect()
    _, found = index.search(data[:100:10], 5, params=params)
    assert np.isin(found, ids[:100]).all()
