"""`vlsearch duplicates` and its API (indexing.duplicates): exact copies by content hash, near copies
through the index with exact verification, the keeper rule, output formats, the written columns."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image
from typer.testing import CliRunner

import indexing.duplicates as dup
from indexing.build import build_index
from vlsearch.app.cli import app
from vlsearch.core.errors import IndexNotBuiltError, InvalidQueryError
from vlsearch.core.modelinfo import ModelInfo
from vlsearch.query.searcher import Searcher
from vlsearch.store.arrays import embedding_array
from vlsearch.store.collection import Collection
from vlsearch.store.manifest import Manifest

DIM, N, T = 32, 300, 0.94
runner = CliRunner()


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _planted(rng):
    """Random unit vectors with planted near copies; returns (vectors, expected groups as row sets)."""
    x = _unit(rng.standard_normal((N, DIM)))
    u = rng.standard_normal(DIM)
    u = _unit(u - (u @ x[10]) * x[10])
    x[150] = _unit(x[10] + 0.2 * u)                  # cos 0.98 to row 10
    x[290] = _unit(x[10] - 0.2 * u)                  # cos 0.98 to row 10, 0.92 to row 150: linked through 10
    w = _unit(x[40] - (x[40] @ x[60]) * x[60])       # a chain 60 ~ 61 ~ 62 (cos 0.955 each step, 0.825 ends)
    x[61] = np.cos(0.3) * x[60] + np.sin(0.3) * w
    x[62] = np.cos(0.6) * x[60] + np.sin(0.6) * w
    v = _unit(x[80] - (x[80] @ x[90]) * x[90])       # a hard negative: cos 0.90 < T
    x[91] = 0.90 * x[90] + np.sqrt(1 - 0.81) * v
    return x.astype(np.float32), [{10, 150, 290}, {60, 61, 62}]


def _collection(path, index: str | None = "IVF4,Flat", taken_at: bool = False) -> tuple[Collection, np.ndarray]:
    rng = np.random.default_rng(0)
    x, _ = _planted(rng)
    ids = np.arange(N, dtype=np.int64) * 7 + 1000
    width = np.full(N, 100)
    width[150] = 400                                 # the largest of group {10, 150, 290}: its keeper
    mtime = np.arange(N, dtype=np.int64)[::-1] * 10**9  # later rows are older: 62 is the chain's keeper
    hashes = [f"h{i}" for i in range(N)]
    hashes[220] = hashes[20]                         # exact copies (whatever their vectors)
    hashes[5] = None                                 # no hash: never an exact copy
    hashes[6] = None
    coll = Collection.create(path, Manifest(model=ModelInfo("synthetic", None, DIM), shard_size=100))
    for k, s in enumerate(range(0, N, 100)):
        part = slice(s, s + 100)
        table = {"id": pa.array(ids[part]), "path": [f"img/{i}.jpg" for i in range(s, s + 100)],
                 "width": pa.array(width[part], pa.int32()), "height": pa.array(np.full(100, 80), pa.int32()),
                 "file_mtime_ns": pa.array(mtime[part]), "content_hash": hashes[part]}
        if taken_at:  # the camera's date reverses the mtime order: 60 becomes the chain's keeper
            table["taken_at"] = pa.array(np.arange(s, s + 100) * 10**9, pa.timestamp("ns", "UTC"))
        coll.write_shard(k, pa.table({**table, "embedding": embedding_array(x[part])}))
    coll.commit_version(counts={"images": N, "captions": 0, "failures": 0, "shards": k + 1}, complete=True)
    if index:
        build_index(coll.path, index, nprobe_default=4)
    return Collection.open(path), ids


def _rows_of(groups, ids):
    position = {int(i): p for p, i in enumerate(ids)}
    return [{position[i] for i in g.ids} for g in groups]


@pytest.fixture
def counted_pairs(monkeypatch):
    """Counts the pairs scored exactly on the stored vectors."""
    scored = []
    cosines = dup._Rows.cosines

    def counting(self, left, right, chunk=65_536):
        scored.append(len(left))
        return cosines(self, left, right, chunk)

    monkeypatch.setattr(dup._Rows, "cosines", counting)
    return scored


def test_groups_through_the_index_without_scoring_all_pairs(tmp_path, counted_pairs, one_faiss_thread):
    coll, ids = _collection(tmp_path / "c")
    report = dup.find_duplicates(coll, T)
    assert _rows_of(report.groups, ids) == [{10, 150, 290}, {20, 220}, {60, 61, 62}]
    assert report.method == "index range search" and report.items == N
    assert sum(counted_pairs) == report.pairs_scored < N * (N - 1) / 2 / 100  # candidates only, never all pairs
    first = report.groups[0]
    assert first.keeper == "img/150.jpg" == first.paths[0] and first.ids[0] == ids[150]
    assert first.scores[0] == 1.0 and first.scores[1] >= T > first.scores[2]  # 290 is linked through 10
    assert report.groups[2].keeper == "img/62.jpg"  # equal sizes: the oldest file
    assert report.duplicates == 5


def test_exact_only_links_content_hashes_alone(tmp_path, counted_pairs):
    coll, ids = _collection(tmp_path / "c")
    report = dup.find_duplicates(coll, T, exact_only=True)
    assert _rows_of(report.groups, ids) == [{20, 220}]
    assert report.method == "content hash" and counted_pairs == []
    assert report.groups[0].keeper == "img/220.jpg"  # same size: the older file


def test_taken_at_decides_the_age_when_the_column_exists(tmp_path):
    coll, ids = _collection(tmp_path / "c", taken_at=True)
    groups = dup.find_duplicates(coll, T).groups
    assert [g.keeper for g in groups] == ["img/150.jpg", "img/20.jpg", "img/60.jpg"]


def test_knn_with_a_radius_where_the_index_has_no_precise_range_search(tmp_path, monkeypatch):
    coll, ids = _collection(tmp_path / "c")
    monkeypatch.setattr(dup._PairSearch, "_range_is_precise", lambda self: False)
    monkeypatch.setattr(dup, "KNN_START", 2)  # a group of 3 fills k=2: those rows are searched again with k=4
    report = dup.find_duplicates(coll, T)
    assert report.method == "index k-NN"
    assert _rows_of(report.groups, ids) == [{10, 150, 290}, {20, 220}, {60, 61, 62}]


def test_compressed_codes_are_searched_knn_and_verified_exactly(tmp_path, counted_pairs):
    """4-bit fast-scan PQ scores too roughly for a radius (its range search finds nothing): k-NN."""
    coll, ids = _collection(tmp_path / "c", index="IVF4,PQ16x4fs")
    report = dup.find_duplicates(coll, T)
    assert report.method == "index k-NN"
    assert _rows_of(report.groups, ids) == [{10, 150, 290}, {20, 220}, {60, 61, 62}]
    assert sum(counted_pairs) == report.pairs_scored <= N * dup.KNN_START * 2


def test_without_an_index_small_collections_are_searched_exactly(tmp_path, monkeypatch):
    coll, ids = _collection(tmp_path / "c", index=None)
    report = dup.find_duplicates(coll, T)
    assert report.method == "exact search (no index)"
    assert _rows_of(report.groups, ids) == [{10, 150, 290}, {20, 220}, {60, 61, 62}]
    monkeypatch.setattr(dup, "EXACT_MAX_ROWS", N - 1)
    with pytest.raises(IndexNotBuiltError, match="build-index"):
        dup.find_duplicates(coll, T)
    assert len(dup.find_duplicates(coll, T, exact_only=True).groups) == 1  # needs no index


def test_removed_rows_leave_their_groups(tmp_path):
    coll, ids = _collection(tmp_path / "c")
    coll.remove([ids[150], ids[61]])
    groups = dup.find_duplicates(Collection.open(coll.path), T).groups
    assert [set(g.paths) for g in groups] == [{"img/10.jpg", "img/290.jpg"}, {"img/20.jpg", "img/220.jpg"}]


def test_the_streaming_iterator_yields_the_same_groups(tmp_path):
    coll, _ = _collection(tmp_path / "c")
    assert list(dup.iter_duplicates(coll.path, dup.DuplicateOptions(T))) == dup.find_duplicates(coll.path, T).groups


def test_a_threshold_outside_0_1_is_refused(tmp_path):
    with pytest.raises(InvalidQueryError):
        dup.DuplicateOptions(threshold=1.5)


def test_cli_json_csv_and_table(tmp_path):
    coll, ids = _collection(tmp_path / "c")
    result = runner.invoke(app, ["duplicates", str(coll.path), "--threshold", str(T), "--json"])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [set(line) for line in lines] == [{"ids", "paths", "keeper", "scores"}] * 3
    assert lines[0]["keeper"] == "img/150.jpg" and lines[0]["ids"][0] == ids[150] and len(lines[0]["scores"]) == 3
    result = runner.invoke(app, ["duplicates", str(coll.path), "-t", str(T), "--csv"])
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert len(rows) == 8 and set(rows[0]) == {"group", "id", "path", "keeper", "score"}
    assert [r["path"] for r in rows if r["keeper"] == "true"] == ["img/150.jpg", "img/220.jpg", "img/62.jpg"]
    result = runner.invoke(app, ["duplicates", str(coll.path), "-t", str(T)])
    assert result.exit_code == 0 and "3 duplicate groups, 5 copies among 300 items" in result.output
    assert "0 * 1.0000  img/150.jpg" in result.output
    assert runner.invoke(app, ["duplicates", str(coll.path), "--json", "--csv"]).exit_code != 0


def test_write_columns_then_dup_keeper_hides_the_copies(tmp_path):
    coll, ids = _collection(tmp_path / "c")
    version = coll.manifest.version
    result = runner.invoke(app, ["duplicates", str(coll.path), "-t", str(T), "--write-columns"])
    assert result.exit_code == 0, result.output
    after = Collection.open(coll.path)
    assert after.manifest.version == version + 1
    table = after.read_table(columns=["path", "dup_group", "dup_keeper"]).to_pydict()
    row = dict(zip(table["path"], zip(table["dup_group"], table["dup_keeper"])))
    assert row["img/150.jpg"] == (0, True) and row["img/10.jpg"] == (0, False) and row["img/0.jpg"] == (None, True)
    searcher = Searcher.open(coll.path)
    vector = after.read_embeddings()[1][10]
    paths = {h.path for h in searcher.search_vector(vector, k=N, exact=True, where="dup_keeper")}
    assert len(paths) == N - 5 and "img/150.jpg" in paths
    assert not {"img/10.jpg", "img/290.jpg", "img/20.jpg", "img/60.jpg", "img/61.jpg"} & paths


def test_real_files_copied_byte_for_byte_are_exact_copies(tmp_path, tiny_checkpoint):
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(6):
        Image.new("RGB", (48, 40), ((53 * i) % 256, (97 * i) % 256, (31 * i) % 256)).save(photos / f"img{i}.png")
    shutil.copy(photos / "img2.png", photos / "copy-of-img2.png")
    os.utime(photos / "copy-of-img2.png", ns=(10**18, 10**18))  # the older file: the keeper
    Image.open(photos / "img4.png").save(photos / "img4.jpg", quality=40)  # re-encoded: other bytes
    coll_dir = tmp_path / "coll"
    result = runner.invoke(app, ["index", str(photos), str(coll_dir), "--model", "vlsearch-tiny",
                                 "--pretrained", str(tiny_checkpoint), "--workers", "0"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["duplicates", str(coll_dir), "--exact-only", "--json"])
    assert result.exit_code == 0, result.output
    groups = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(groups) == 1 and groups[0]["keeper"].endswith("copy-of-img2.png")
    assert sorted(os.path.basename(p) for p in groups[0]["paths"]) == ["copy-of-img2.png", "img2.png"]
    assert groups[0]["scores"] == [1.0, 1.0]


def test_write_columns_skips_items_removed_since_they_were_grouped(tmp_path):
    coll, ids = _collection(tmp_path / "c")
    groups = dup.find_duplicates(coll, T).groups
    coll.remove([ids[150]])  # the first group's keeper
    dup.write_duplicate_columns(coll.path, groups)
    table = Collection.open(coll.path).read_table(columns=["path", "dup_group", "dup_keeper"]).to_pydict()
    row = dict(zip(table["path"], zip(table["dup_group"], table["dup_keeper"])))
    assert "img/150.jpg" not in row and row["img/10.jpg"] == (0, False) and row["img/220.jpg"] == (1, True)
