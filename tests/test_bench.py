"""vlsearch bench on a small synthetic captioned collection with planted vectors."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
from typer.testing import CliRunner

from vlsearch.eval.bench import BenchConfig, format_table, run_benchmark
from vlsearch.app.cli import app
from vlsearch.store.collection import Collection
from vlsearch.store.manifest import Manifest
from vlsearch.store.arrays import embedding_array
from vlsearch.core.errors import CollectionError
from vlsearch.models.factory import TINY_MODEL, ModelInfo

DIM = 64
N_IMAGES, N_GOOD = 40, 30  # images 0..29: captions equal their image; 30..39: captions opposite to it
ID_OFFSET = 1000           # collection ids 1000..1039 (not row numbers)
runner = CliRunner()


def _vectors() -> np.ndarray:
    rng = np.random.default_rng(0)
    v = rng.standard_normal((N_IMAGES, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _make_collection(path, with_captions: bool = True, bad_caption_id: bool = False) -> Collection:
    images = _vectors()
    coll = Collection.create(path, Manifest(model=ModelInfo(TINY_MODEL, None, DIM), shard_size=20))
    for shard in range(2):  # two shards of 20 images, 2 captions each
        rows = np.arange(shard * 20, shard * 20 + 20)
        ids = rows + ID_OFFSET
        sign = np.where(rows < N_GOOD, 1.0, -1.0).astype(np.float32)[:, None]
        cap_vecs = np.repeat(images[rows] * sign, 2, axis=0)
        cap_ids = np.repeat(ids, 2)
        if bad_caption_id and shard == 1:
            cap_ids[-1] = 99
        img_table = pa.table({
            "id": pa.array(ids, pa.int64()),
            "path": [f"img{i}.jpg" for i in rows],
            "width": pa.array([8] * 20, pa.int32()),
            "height": pa.array([8] * 20, pa.int32()),
            "captions": [[f"caption a {i}", f"caption b {i}"] for i in rows],
            "embedding": embedding_array(images[rows]),
        })
        cap_table = pa.table({
            "image_id": pa.array(cap_ids, pa.int64()),
            "caption": [f"caption {c} {i}" for i in rows for c in "ab"],
            "embedding": embedding_array(cap_vecs),
        }) if with_captions else None
        coll.write_shard(shard, img_table, cap_table)
    coll.update_manifest(counts={"images": 40, "captions": 80 if with_captions else 0, "failures": 0, "shards": 2},
                         complete=True)
    return coll


def _add_index(coll: Collection, factory: str, nlist: int | None) -> None:
    import faiss

    ids, vecs = coll.read_embeddings()
    index = faiss.index_factory(DIM, factory, faiss.METRIC_INNER_PRODUCT)
    index.train(vecs)
    if factory.startswith("IVF"):
        index.add_with_ids(vecs, ids)
    else:
        index = faiss.IndexIDMap2(index)
        index.add_with_ids(vecs, ids)
    faiss.write_index(index, str(coll.index_path))
    coll.update_manifest(index={
        "factory": factory, "metric": "ip", "nlist": nlist, "nprobe_default": 1 if nlist else None,
        "code_size": DIM * 4, "bytes_per_vector": DIM * 4, "ntotal": int(index.ntotal), "train_size": len(ids),
        "build_seconds": 0.0, "peak_rss_mb": 0.0, "reasons": ["test"], "built_at": "2026-01-01T00:00:00+00:00",
        "model": coll.model.to_dict(), "file": "index.faiss",
    })


# Hand computation for the planted collection (80 captions, 40 images):
# t2i: 60 captions equal their image (score 1, every other image < 1) -> rank 1;
#      20 captions are the opposite of their image (score -1, every other image > -1) -> rank 40.
#      R@1 = R@5 = R@10 = 60/80 = 0.75; MRR = (60 + 20/40)/80 = 0.75625; median rank 1;
#      mean rank (60 + 20*40)/80 = 10.75.
# i2t: images 0..29 -> rank 1; images 30..39: their 2 captions score -1, the 78 others more -> rank 79.
#      R@K = 30/40 = 0.75; MRR = (30 + 10/79)/40; median 1; mean (30 + 790)/40 = 20.5.
# MRR@10 drops the ranks > 10: t2i 60/80 = 0.75, i2t 30/40 = 0.75.
EXPECTED_T2I = {"R@1": 0.75, "R@5": 0.75, "R@10": 0.75, "mrr": 0.75625, "mrr@10": 0.75, "median_rank": 1.0,
                "mean_rank": 10.75, "n_queries": 80}
EXPECTED_I2T = {"R@1": 0.75, "R@5": 0.75, "R@10": 0.75, "mrr": (30 + 10 / 79) / 40, "mrr@10": 0.75,
                "median_rank": 1.0, "mean_rank": 20.5, "n_queries": 40}


def test_exact_only_without_index(tmp_path):
    coll = _make_collection(tmp_path / "c")
    result = run_benchmark(coll.path, BenchConfig(latency_queries=5))
    assert result["exact"]["t2i"] == pytest.approx(EXPECTED_T2I)
    assert result["exact"]["i2t"] == pytest.approx(EXPECTED_I2T)
    assert result["ann"] == [] and result["index"] is None
    assert any("no index" in n for n in result["notes"])
    assert result["n_images"] == 40 and result["n_captions"] == 80 and result["k"] == 10
    lat = result["exact"]["latency_ms"]
    assert result["exact"]["qps"] > 0 and lat["n"] == 5 and 0 < lat["p50"] <= lat["p99"]
    json.dumps(result, allow_nan=False)  # strictly JSON-serialisable
    table = format_table(result)
    assert "exact" in table and "75.0" in table and "no index" in table


def test_ivf_index_rows_per_nprobe(tmp_path):
    coll = _make_collection(tmp_path / "c")
    _add_index(coll, "IVF4,Flat", nlist=4)
    result = run_benchmark(coll.path, BenchConfig(ks=(1, 5), nprobes=(1, 2, 4, 8), latency_queries=3))
    assert [a["nprobe"] for a in result["ann"]] == [1, 2, 4]
    assert any("nprobe [8] > nlist=4" in n for n in result["notes"])
    full = result["ann"][-1]  # nprobe = nlist: exhaustive, so identical to exact search
    assert full["ann_recall"] == {"k": 5, "recall": 1.0}
    # depth k=5: the 20 reversed captions (exact rank 40) are never found -> MRR@5 = 60/80, median 1,
    # full MRR and mean rank unknown
    assert full["t2i"]["R@1"] == 0.75 and full["t2i"]["R@5"] == 0.75 and full["t2i"]["mrr@5"] == 0.75
    assert full["t2i"]["mrr@5"] == result["exact"]["t2i"]["mrr@5"]
    assert full["t2i"]["median_rank"] == 1.0 and full["t2i"]["mean_rank"] is None and full["t2i"]["mrr"] is None
    recalls = [a["ann_recall"]["recall"] for a in result["ann"]]
    assert recalls == sorted(recalls) and recalls[0] < 1.0  # one list of 4 misses neighbours
    for a in result["ann"]:
        assert a["qps"] > 0 and a["latency_ms"]["n"] == 3
    json.dumps(result, allow_nan=False)


def test_flat_index_has_one_row(tmp_path):
    coll = _make_collection(tmp_path / "c")
    _add_index(coll, "Flat", nlist=None)
    result = run_benchmark(coll.path, BenchConfig(latency_queries=0))
    assert len(result["ann"]) == 1 and result["ann"][0]["nprobe"] is None
    assert result["ann"][0]["ann_recall"]["recall"] == 1.0
    assert result["ann"][0]["t2i"]["R@10"] == 0.75
    assert result["exact"]["latency_ms"]["p50"] is None


def test_max_queries_subsets_queries_not_galleries(tmp_path):
    coll = _make_collection(tmp_path / "c")
    result = run_benchmark(coll.path, BenchConfig(max_queries=10, latency_queries=2))
    assert result["exact"]["t2i"]["n_queries"] == 10 and result["exact"]["i2t"]["n_queries"] == 10
    # a subset still sees the full gallery: a reversed caption ranks 40th, not <= 10th
    assert result["exact"]["t2i"]["mean_rank"] in {1 + 39 * r / 10 for r in range(11)}
    assert any("subset" in n for n in result["notes"])


def test_cli_bench_table_json_plot(tmp_path):
    coll = _make_collection(tmp_path / "c")
    _add_index(coll, "IVF4,Flat", nlist=4)
    out, plot = tmp_path / "r.json", tmp_path / "r.png"
    res = runner.invoke(app, ["bench", str(coll.path), "--k", "1,5", "--nprobe", "1,4",
                              "--out", str(out), "--plot", str(plot), "--latency-queries", "2"])
    assert res.exit_code == 0, res.output
    assert "R@5" in res.output and "exact" in res.output and "i2t" in res.output and "ann" in res.output
    data = json.loads(out.read_text())
    assert data["ks"] == [1, 5] and [a["nprobe"] for a in data["ann"]] == [1, 4]
    assert data["exact"]["t2i"]["R@1"] == 0.75 and {"qps", "latency_ms"} <= set(data["ann"][0])
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 1000


def test_cli_bench_errors(tmp_path):
    coll = _make_collection(tmp_path / "nocap", with_captions=False)
    res = runner.invoke(app, ["bench", str(coll.path)])
    assert res.exit_code == 1 and "no captions" in res.output and "Traceback" not in res.output
    res = runner.invoke(app, ["bench", str(coll.path), "--k", "1,x"])
    assert res.exit_code == 2 and "--k" in res.output
    res = runner.invoke(app, ["bench", str(tmp_path / "missing")])
    assert res.exit_code == 1 and "no collection" in res.output


def test_caption_of_unknown_image_is_an_error(tmp_path):
    coll = _make_collection(tmp_path / "c", bad_caption_id=True)
    with pytest.raises(CollectionError, match="1 captions .* not in the collection .*99"):
        run_benchmark(coll.path)


def test_bad_config():
    with pytest.raises(ValueError, match="nprobes"):
        BenchConfig(nprobes=(0,))
    with pytest.raises(ValueError, match="ks"):
        BenchConfig(ks=())
