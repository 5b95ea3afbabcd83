"""`vlsearch import`: clip-retrieval folders (written here with its exact layout) and npy + parquet folders."""

from __future__ import annotations

import json
import logging
import math
from io import BytesIO
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from indexing.importing import ImportConfig, import_clip_retrieval, import_embeddings
from indexing.importing.models import normalise_model
from indexing.importing.run import staging_path
from vlsearch.core.errors import ImportFolderError
from vlsearch.query.searcher import Searcher
from vlsearch.store.collection import Collection

DIM = 512
MODEL = "ViT-B/32"  # clip-retrieval's spelling of OpenAI's ViT-B/32: 512-d in open_clip's registry
SIZES = (40, 35, 25)
PARTITION_COUNT = 12  # clip-retrieval pads k to the digits of its partition count: 00, 01, ...


def unit_vectors(n: int, seed: int, dim: int = DIM) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)


def write_partition(out: Path, k: int, n: int, seed: int, text: bool = True, first: int = 0) -> np.ndarray:
    """Partition ``k`` as clip-retrieval 2.45's ``OutputSink.__write_batch`` writes it (rows ``first..``):
    float16 npy via np.save, metadata parquet from a DataFrame of image_path, caption and the
    json metadata flattened into columns (url, an extra column)."""
    name = str(k).zfill(int(math.log10(PARTITION_COUNT)) + 1)
    images = unit_vectors(n, seed)
    for folder in ("img_emb", "text_emb", "metadata"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    npb = BytesIO()
    np.save(npb, images)
    (out / "img_emb" / f"img_emb_{name}.npy").write_bytes(npb.getbuffer())
    rows = range(first, first + n)
    if text:
        npb = BytesIO()
        np.save(npb, unit_vectors(n, seed + 1000))
        (out / "text_emb" / f"text_emb_{name}.npy").write_bytes(npb.getbuffer())
    df = pd.DataFrame({"image_path": [f"shard{k}/{i:05d}.jpg" for i in rows],
                       **({"caption": [f"caption {k}-{i}" for i in rows]} if text else {}),
                       "metadata": [json.dumps({"url": f"https://example.com/{k}/{i}.jpg", "key": f"{k}{i:05d}",
                                                "width": 100 + i, "caption": "dropped"}) for i in rows]})
    parsed = pd.json_normalize(df["metadata"].apply(json.loads))
    parsed = parsed.drop(columns={"caption", "metadata", "image_path"} & set(parsed.keys()))
    df.join(parsed).drop(columns=["metadata"]).to_parquet(out / "metadata" / f"metadata_{name}.parquet")
    return images


def write_folder(out: Path, sizes=SIZES, text: bool = True) -> np.ndarray:
    return np.concatenate([write_partition(out, k, n, seed=k, text=text) for k, n in enumerate(sizes)])


def exact_top(vectors: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores = queries @ vectors.astype(np.float32).T
    ids = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, ids, axis=1), ids


def assert_search_equals_exact(coll_dir: Path, vectors: np.ndarray, exact: bool = False) -> None:
    queries = unit_vectors(5, seed=99).astype(np.float32)
    want_scores, want_ids = exact_top(vectors, queries, 10)
    with Searcher.open(coll_dir) as searcher:
        results = searcher.search_vector(queries, k=10, exact=exact)
    for hits, ids, scores in zip(results, want_ids, want_scores):
        assert [h.id for h in hits] == ids.tolist()
        np.testing.assert_allclose([h.score for h in hits], scores, atol=2e-3)


def config(**changes) -> ImportConfig:
    return ImportConfig(model=MODEL, shard_size=30, **changes)


def test_import_searches_equal_exact_search_over_the_npy_vectors(tmp_path):
    vectors = write_folder(tmp_path / "cr")
    report = import_clip_retrieval(tmp_path / "cr", tmp_path / "coll", config())
    assert (report.rows, report.added, report.captions, report.skipped_ids) == (100, 100, 100, [])
    assert report.index == "built"
    coll = Collection.open(tmp_path / "coll")
    assert (coll.model.name, coll.model.pretrained, coll.dim) == ("ViT-B-32", "openai", DIM)
    assert coll.manifest.complete and coll.count() == 100
    assert coll.manifest.source["partitions"] == list(SIZES)
    ids, stored = coll.read_embeddings()
    np.testing.assert_array_equal(ids, np.arange(100))
    np.testing.assert_array_equal(stored, vectors.astype(np.float32))  # fp16 in, fp16 stored: bit for bit
    table = coll.read_table().sort_by("id")
    row = table.slice(40, 1).to_pylist()[0]  # partition 1, row 0
    assert row["path"] == "shard1/00000.jpg" and row["captions"] == ["caption 1-0"]
    assert row["url"] == "https://example.com/1/0.jpg" and row["key"] == "100000" and row["width"] == 100
    captions = coll.read_table("captions")
    assert captions.num_rows == 100 and sorted(captions.column("image_id").to_pylist()) == list(range(100))
    _, text_vectors = coll.read_embeddings("captions")
    assert np.isfinite(text_vectors).all()
    assert_search_equals_exact(tmp_path / "coll", vectors)
    assert_search_equals_exact(tmp_path / "coll", vectors, exact=True)
    assert not staging_path(tmp_path / "coll").exists()


def test_regrown_folder_adds_only_the_new_rows(tmp_path):
    folder = tmp_path / "cr"
    write_folder(folder, sizes=(40, 35))
    import_clip_retrieval(folder, tmp_path / "coll", config())
    version = Collection.open(tmp_path / "coll").manifest.version
    # the last partition grows (same first 35 rows) and a new partition appears
    grown = write_partition(folder, 1, 50, seed=1)
    np.testing.assert_array_equal(grown[:35], unit_vectors(35, seed=1))
    write_partition(folder, 2, 20, seed=2)
    vectors = np.concatenate([unit_vectors(40, 0), grown, unit_vectors(20, 2)])
    report = import_clip_retrieval(folder, tmp_path / "coll", config(rows_per_version=16))
    assert (report.added, report.index) == (35, "followed")
    coll = Collection.open(tmp_path / "coll")
    assert coll.manifest.version == version + 3  # 35 new rows, 16 per version
    assert coll.manifest.source["partitions"] == [40, 50, 20]
    ids, stored = coll.read_embeddings()
    np.testing.assert_array_equal(np.sort(ids), np.arange(110))
    np.testing.assert_array_equal(stored[np.argsort(ids)], vectors.astype(np.float32))
    assert_search_equals_exact(tmp_path / "coll", vectors)
    again = import_clip_retrieval(folder, tmp_path / "coll", config())
    assert again.added == 0 and Collection.open(tmp_path / "coll").manifest.version == coll.manifest.version


def test_changed_earlier_partition_is_refused(tmp_path):
    folder = tmp_path / "cr"
    write_folder(folder)
    import_clip_retrieval(folder, tmp_path / "coll", config())
    write_partition(folder, 0, 30, seed=0)  # shrank: every later id would shift
    with pytest.raises(ImportFolderError, match="partition 0 .* held 40 rows .* now holds 30"):
        import_clip_retrieval(folder, tmp_path / "coll", config())


def test_interrupted_import_leaves_no_collection_and_resumes_without_loss_or_duplicates(tmp_path):
    vectors = write_folder(tmp_path / "cr")
    calls = []

    def interrupt(done, total, **_):
        calls.append(done)
        if len(calls) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        import_clip_retrieval(tmp_path / "cr", tmp_path / "coll", config(), progress=interrupt)
    assert not (tmp_path / "coll").exists()
    stage = Collection.open(staging_path(tmp_path / "coll"))
    assert not stage.manifest.complete and stage.count() == 60  # two shards of 30 committed
    report = import_clip_retrieval(tmp_path / "cr", tmp_path / "coll", config())
    assert report.added == 40  # only the rows after the committed shards
    ids, _ = Collection.open(tmp_path / "coll").read_embeddings()
    np.testing.assert_array_equal(ids, np.arange(100))
    assert_search_equals_exact(tmp_path / "coll", vectors)


def test_import_killed_9_resumes_without_loss_or_duplicates(tmp_path):
    import sys

    from conftest import kill_9_when

    folder, target = tmp_path / "cr", tmp_path / "coll"
    vectors = np.concatenate([write_partition(folder, k, 500, seed=k, text=False) for k in range(3)])
    stage = staging_path(target) / "images"
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r}); "
            "from indexing.importing import ImportConfig, import_clip_retrieval; "
            f"import_clip_retrieval({str(folder)!r}, {str(target)!r}, ImportConfig(model={MODEL!r}, shard_size=100))")
    kill_9_when([sys.executable, "-c", code], lambda: stage.is_dir() and len(list(stage.glob("part-*.parquet"))) >= 2,
                "two committed shards")
    assert not target.exists()
    report = import_clip_retrieval(folder, target, ImportConfig(model=MODEL, shard_size=100, index=False))
    assert 0 < report.added <= 1300
    ids, stored = Collection.open(target).read_embeddings()
    np.testing.assert_array_equal(ids, np.arange(1500))
    np.testing.assert_array_equal(stored, vectors.astype(np.float32))


def write_autofaiss_index(folder: Path, vectors: np.ndarray, order: np.ndarray | None = None) -> None:
    """An autofaiss-style image.index: index_factory over the npy vectors in row order (ids = positions)."""
    import faiss

    x = np.ascontiguousarray(vectors.astype(np.float32)[order if order is not None else slice(None)])
    index = faiss.index_factory(DIM, "IVF4,Flat", faiss.METRIC_INNER_PRODUCT)
    index.train(x)
    index.add(x)
    (folder / "index").mkdir()
    faiss.write_index(index, str(folder / "index" / "image.index"))
    (folder / "index" / "image.json").write_text(json.dumps({"index_key": "IVF4,Flat",
                                                             "index_param": "nprobe=4,efSearch=8,ht=2048"}))


def test_matching_autofaiss_index_is_adopted(tmp_path):
    vectors = write_folder(tmp_path / "cr")
    write_autofaiss_index(tmp_path / "cr", vectors)
    report = import_clip_retrieval(tmp_path / "cr", tmp_path / "coll", config())
    assert report.index == "adopted"
    entry = Collection.open(tmp_path / "coll").manifest.index
    assert (entry["factory"], entry["engine"], entry["nprobe_default"], entry["ntotal"]) == ("IVF4,Flat", "adopted",
                                                                                            4, 100)
    assert (tmp_path / "coll" / entry["file"]).read_bytes() == (tmp_path / "cr" / "index" / "image.index").read_bytes()
    with Searcher.open(tmp_path / "coll") as searcher:
        assert searcher.index.ntotal == 100 and searcher.nprobe_default == 4
    assert_search_equals_exact(tmp_path / "coll", vectors)


def test_mismatched_index_is_refused_then_rebuilt_with_rebuild_index(tmp_path):
    vectors = write_folder(tmp_path / "cr")
    write_autofaiss_index(tmp_path / "cr", vectors, order=np.random.default_rng(0).permutation(100))
    with pytest.raises(ImportFolderError, match="not index the folder's vectors by row position.*--rebuild-index"):
        import_clip_retrieval(tmp_path / "cr", tmp_path / "coll", config())
    assert not (tmp_path / "coll").exists() and not staging_path(tmp_path / "coll").exists()
    report = import_clip_retrieval(tmp_path / "cr", tmp_path / "coll", config(rebuild_index=True))
    assert report.index == "built"
    assert Collection.open(tmp_path / "coll").manifest.index["engine"] == "local"
    assert_search_equals_exact(tmp_path / "coll", vectors)


def _rows_differ(folder: Path) -> None:
    pq.write_table(pq.read_table(folder / "metadata" / "metadata_01.parquet").slice(0, 30),
                   folder / "metadata" / "metadata_01.parquet")


def _gap(folder: Path) -> None:
    for kind, ext in (("img_emb", "npy"), ("text_emb", "npy"), ("metadata", "parquet")):
        (folder / kind / f"{kind}_01.{ext}").unlink()


@pytest.mark.parametrize("damage, message", [
    (_rows_differ, "metadata_01.parquet has 30 rows but .*img_emb_01.npy has 35 vectors"),
    (_gap, "partition 1 is missing"),
    (lambda folder: (folder / "metadata" / "metadata_02.parquet").unlink(), "partition 2 has no metadata file"),
])
def test_bad_folders_fail_clearly_and_write_nothing(tmp_path, damage, message):
    write_folder(tmp_path / "cr")
    damage(tmp_path / "cr")
    with pytest.raises(ImportFolderError, match=message):
        import_clip_retrieval(tmp_path / "cr", tmp_path / "coll", config())
    assert not (tmp_path / "coll").exists() and not staging_path(tmp_path / "coll").exists()


def test_dimension_that_does_not_match_the_model_fails_clearly(tmp_path):
    write_folder(tmp_path / "cr")
    with pytest.raises(ImportFolderError, match="512-d but model ViT-L/14 .*768-d"):
        import_clip_retrieval(tmp_path / "cr", tmp_path / "coll", ImportConfig(model="ViT-L/14"))
    assert not (tmp_path / "coll").exists() and not staging_path(tmp_path / "coll").exists()


def test_unknown_model_is_recorded_with_the_vectors_dimension(tmp_path):
    write_folder(tmp_path / "cr", sizes=(10,))
    report = import_clip_retrieval(tmp_path / "cr", tmp_path / "coll", ImportConfig(model="hf_clip:org/model"))
    assert (report.model.name, report.model.dim) == ("hf_clip:org/model", DIM)


def test_non_finite_vectors_are_skipped_counted_and_logged(tmp_path, caplog):
    folder = tmp_path / "cr"
    vectors = write_folder(folder)
    bad = np.load(folder / "img_emb" / "img_emb_01.npy")
    bad[3, 7], bad[10, 0] = np.nan, np.inf
    np.save(folder / "img_emb" / "img_emb_01.npy", bad)
    with caplog.at_level(logging.WARNING, logger="indexing.importing"):
        report = import_clip_retrieval(folder, tmp_path / "coll", config())
    assert report.skipped_ids == [43, 50] and report.added == 98
    assert "2 rows skipped" in caplog.text and "43" in caplog.text
    coll = Collection.open(tmp_path / "coll")
    ids, _ = coll.read_embeddings()
    assert coll.count() == 98 and 43 not in ids and 50 not in ids
    assert sorted(coll.read_table("captions").column("image_id").to_pylist()) == sorted(ids.tolist())
    keep = np.setdiff1d(np.arange(100), [43, 50])
    queries = unit_vectors(3, seed=5).astype(np.float32)
    _, want = exact_top(vectors[keep], queries, 10)
    with Searcher.open(tmp_path / "coll") as searcher:
        got = searcher.search_vector(queries, k=10, exact=True)
    assert [[h.id for h in hits] for hits in got] == keep[want].tolist()


def test_plain_npy_and_parquet_folder_imports(tmp_path):
    folder = tmp_path / "emb"
    folder.mkdir()
    parts = [unit_vectors(n, seed) for seed, n in enumerate((20, 15))]
    for k, part in enumerate(parts):
        np.save(folder / f"part_{k}.npy", part)
        pd.DataFrame({"url": [f"https://x/{k}/{i}" for i in range(len(part))], "score": np.arange(len(part))}
                     ).to_parquet(folder / f"part_{k}.parquet")
    report = import_embeddings(folder, tmp_path / "coll", ImportConfig(model="open_clip:ViT-B-32/laion2b_s34b_b79k"))
    assert (report.layout, report.added) == ("embeddings", 35)
    coll = Collection.open(tmp_path / "coll")
    assert (coll.model.name, coll.model.pretrained) == ("ViT-B-32", "laion2b_s34b_b79k")
    assert coll.read_table().sort_by("id").column("path").to_pylist()[20] == "https://x/1/0"
    assert_search_equals_exact(tmp_path / "coll", np.concatenate(parts))


@pytest.mark.parametrize("spec, expected", [
    ("open_clip:ViT-B-32/laion2b_s34b_b79k", ("ViT-B-32", "laion2b_s34b_b79k")),
    ("ViT-B/32", ("ViT-B-32", "openai")),
    ("ViT-L/14@336px", ("ViT-L-14-336", "openai")),
    ("RN50", ("RN50", "openai")),
    ("ViT-B-16", ("ViT-B-16", None)),
])
def test_clip_retrieval_model_spellings_are_normalised(spec, expected):
    assert normalise_model(spec) == expected


def test_cli_imports_and_reports_bad_input(tmp_path):
    from typer.testing import CliRunner

    from vlsearch.app.cli import app

    write_folder(tmp_path / "cr", sizes=(12, 8))
    runner = CliRunner()
    result = runner.invoke(app, ["import", "clip-retrieval", str(tmp_path / "cr"), str(tmp_path / "coll"),
                                 "--model", "open_clip:ViT-B-32/laion2b_s34b_b79k"])
    assert result.exit_code == 0, result.output
    assert "20 rows added (20 captions)" in result.output and "index: built" in result.output
    (tmp_path / "cr" / "img_emb" / "img_emb_00.npy").unlink()
    result = runner.invoke(app, ["import", "clip-retrieval", str(tmp_path / "cr"), str(tmp_path / "other"),
                                 "--model", "ViT-B/32"])
    assert result.exit_code == 1 and "partition 0 is missing" in result.output
