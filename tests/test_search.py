"""Searcher: planted-vector collections where the right answer is known, with and without indexes."""

from __future__ import annotations

import copy
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from vlsearch.app.cli import app
from vlsearch.store.collection import Collection
from vlsearch.store.manifest import Manifest
from vlsearch.store.arrays import embedding_array
from vlsearch.core.errors import CollectionMismatchError, IndexNotBuiltError, InvalidQueryError
from vlsearch.models.factory import ModelInfo
from vlsearch.ann.faiss_index import search_parameters
from vlsearch.query.searcher import Hit, Hits, Results, Searcher, SearcherOptions

TEXTS = ["a red car parked on the street", "two cats sleeping on a sofa", "a dog running on the beach",
         "a bowl of hot soup", "snowy mountains at dawn"]
N_DISTRACTORS = 1200
SHARD = 500


pytestmark = pytest.mark.usefixtures("one_faiss_thread")


def _images(folder: Path) -> list[Path]:
    """Four visually distinct query images."""
    folder.mkdir(parents=True, exist_ok=True)
    x = np.linspace(0, 255, 64, dtype=np.uint8)
    arrays = [
        np.dstack([np.full((64, 64), 230, np.uint8), np.zeros((64, 64), np.uint8), np.zeros((64, 64), np.uint8)]),
        np.dstack([np.zeros((64, 64), np.uint8), np.zeros((64, 64), np.uint8), np.full((64, 64), 200, np.uint8)]),
        np.dstack([np.tile(x, (64, 1))] * 3),
        ((np.indices((64, 64)).sum(0) // 8) % 2 * 255).astype(np.uint8)[..., None].repeat(3, 2),
    ]
    paths = []
    for i, arr in enumerate(arrays):
        p = folder / f"query-{i}.png"
        Image.fromarray(arr).save(p)
        paths.append(p)
    return paths


def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def planted(tmp_path_factory, tiny_encoder):
    """Text embeddings and image embeddings planted among random distractors, in 3 shards with
    unsorted, non-contiguous ids. Returns (collection path, {query: id}, image paths)."""
    root = tmp_path_factory.mktemp("search")
    image_paths = _images(root / "queries")
    text_vecs = tiny_encoder.encode_texts(TEXTS)
    image_vecs = tiny_encoder.encode_images(image_paths)
    rng = np.random.default_rng(0)
    d = tiny_encoder.dim
    vectors = np.concatenate([text_vecs, image_vecs, _unit(rng, N_DISTRACTORS, d)])
    n = len(vectors)
    ids = (rng.permutation(n).astype(np.int64) * 1_000_003 + 17)  # unsorted, sparse
    paths = [f"text-{i}.jpg" for i in range(len(TEXTS))] + [str(p) for p in image_paths]
    paths += [f"distractor-{i}.jpg" for i in range(N_DISTRACTORS)]
    captions = [[t, "second caption"] for t in TEXTS] + [[f"image {i}"] for i in range(len(image_paths))]
    captions += [[] for _ in range(N_DISTRACTORS)]
    coll = Collection.create(root / "coll", Manifest(model=tiny_encoder.info, shard_size=SHARD))
    for s, start in enumerate(range(0, n, SHARD)):
        sl = slice(start, start + SHARD)
        coll.write_shard(s, pa.table({
            "id": ids[sl], "path": paths[sl],
            "width": pa.array(np.full(len(ids[sl]), 64, np.int32)),
            "height": pa.array(np.full(len(ids[sl]), 48, np.int32)),
            "captions": pa.array(captions[sl], type=pa.list_(pa.string())),
            "label": [f"label-{i}" for i in range(start, min(n, start + SHARD))],
            "embedding": embedding_array(vectors[sl]),
        }))
    coll.update_manifest(counts={"images": n, "captions": 0, "failures": 0, "shards": s + 1}, complete=True)
    expected = {t: int(ids[i]) for i, t in enumerate(TEXTS)}
    expected.update({str(p): int(ids[len(TEXTS) + i]) for i, p in enumerate(image_paths)})
    return coll.path, expected, image_paths


def _with_index(src: Path, dest: Path, factory: str, metric: int = faiss.METRIC_INNER_PRODUCT,
                nprobe_default: int | None = 4) -> Path:
    """Copy a collection and build a FAISS index for it, described in manifest['index']."""
    import shutil

    shutil.copytree(src, dest)
    coll = Collection.open(dest)
    ids, vecs = coll.read_embeddings()
    index = faiss.index_factory(coll.dim, factory, metric)
    index.train(vecs)
    index.add_with_ids(vecs, ids)
    faiss.write_index(index, str(coll.index_path))
    coll.update_manifest(index={
        "factory": factory, "metric": "ip" if metric == faiss.METRIC_INNER_PRODUCT else "l2",
        "nlist": 16 if "IVF16" in factory else 0, "nprobe_default": nprobe_default, "ntotal": index.ntotal,
        "model": coll.model.to_dict(), "file": "index.faiss"})
    return dest


@pytest.fixture(scope="module")
def indexed(planted, tmp_path_factory):
    """{name: collection path} for a Flat (IDMap2), an IVF and an IVF-PQ + refine index."""
    root = tmp_path_factory.mktemp("indexed")
    src = planted[0]
    return {
        "flat": _with_index(src, root / "flat", "IDMap2,Flat"),
        "ivf": _with_index(src, root / "ivf", "IVF16,Flat"),
        "refine": _with_index(src, root / "refine", "IDMap,IVF16,PQ16x4,RFlat"),
        "l2": _with_index(src, root / "l2", "IDMap2,Flat", metric=faiss.METRIC_L2),
    }


# ---- expected image first ------------------------------------------------------------------

def test_text_queries_return_their_planted_image_first_with_a_lazily_loaded_model(planted, indexed):
    path, expected, _ = planted
    s = Searcher.open(indexed["flat"])
    assert not s.embedder.loaded  # the model loads on the first text query, not on open
    for text in TEXTS:
        hits = s.search_text(text, k=5)
        assert isinstance(hits, list) and len(hits) == 5 and all(isinstance(h, Hit) for h in hits)
        top = hits[0]
        assert top.id == expected[text] and top.rank == 1 and top.caption == text
        assert top.path.startswith("text-") and top.score == pytest.approx(1.0, abs=2e-3)
        assert top.metadata == {"width": 64, "height": 48, "label": top.metadata["label"]}
        assert [h.rank for h in hits] == [1, 2, 3, 4, 5]
        assert all(a.score >= b.score for a, b in zip(hits, hits[1:]))
    assert s.encoder.info == Collection.open(path).model


def test_concurrent_text_queries_share_text_tower_passes_and_get_their_own_hits(planted, tiny_encoder, monkeypatch):
    """Queries arriving while the text tower runs are encoded together in the next pass (the
    server's throughput under load); each still gets its own planted image first."""
    import threading
    import time

    path, expected, _ = planted
    s = Searcher.open(path, encoder=tiny_encoder)
    real, gate, sizes = tiny_encoder.encode_texts, threading.Event(), []

    def held(texts):  # the first pass waits until every query has been sent
        sizes.append(len(texts))
        gate.wait(10)
        return real(texts)

    monkeypatch.setattr(tiny_encoder, "encode_texts", held)
    with ThreadPoolExecutor(len(TEXTS)) as pool:
        futures = {t: pool.submit(s.search_text, t, k=3, exact=True) for t in TEXTS}
        time.sleep(0.5)
        gate.set()
        tops = {t: f.result(timeout=30)[0].id for t, f in futures.items()}
    assert tops == {t: expected[t] for t in TEXTS}
    assert sum(sizes) == len(TEXTS) and len(sizes) < len(TEXTS)  # merged into fewer passes


def test_image_query_by_path_pil_or_bytes_returns_that_image_first(planted, tiny_encoder):
    path, expected, image_paths = planted
    s = Searcher.open(path, encoder=tiny_encoder)
    for p in image_paths:
        want = expected[str(p)]
        with Image.open(p) as im:
            pil = im.copy()
        for query in (p, str(p), pil, p.read_bytes()):
            hits = s.search_image(query, k=3, exact=True)
            assert hits[0].id == want and hits[0].path == str(p), query


def test_batches_return_one_list_per_query_and_convert_to_tables(planted, tiny_encoder):
    path, expected, image_paths = planted
    s = Searcher.open(path, encoder=tiny_encoder)
    batch = s.search_text(TEXTS[:3], k=4, exact=True)
    assert isinstance(batch, Results) and len(batch) == 3 and all(isinstance(h, Hits) and len(h) == 4 for h in batch)
    assert [hits[0].id for hits in batch] == [expected[t] for t in TEXTS[:3]]
    images = s.search_image([image_paths[1], image_paths[0]], k=2, exact=True)
    assert [h[0].id for h in images] == [expected[str(image_paths[1])], expected[str(image_paths[0])]]
    single_row = s.search_vector(np.ones((1, 64), np.float32), k=2, exact=True)
    assert isinstance(single_row, Results) and len(single_row) == 1  # (1, d) is a batch of one

    table = batch.to_arrow()
    assert table.column_names[:6] == ["query", "rank", "id", "score", "path", "caption"]
    assert {"width", "height", "label"} <= set(table.column_names) and table.num_rows == 12
    assert table.schema.field("id").type == pa.int64() and table.schema.field("score").type == pa.float32()
    df = batch.to_pandas()
    assert df["query"].tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert df.loc[df["rank"] == 1, "caption"].tolist() == TEXTS[:3]
    one = batch[0].to_pandas()
    assert "query" not in one.columns and one["id"].iloc[0] == expected[TEXTS[0]]
    assert Results([Hits()]).to_arrow().num_rows == 0


# ---- ANN vs exact, parameters, threads -----------------------------------------------------

def test_ann_on_flat_and_full_probe_ivf_agree_with_exact(planted, indexed):
    rng = np.random.default_rng(1)
    queries = _unit(rng, 20, 64)
    exact = Searcher.open(planted[0]).search_vector(queries, k=10, exact=True)
    for name, nprobe in (("flat", None), ("ivf", 16)):
        ann = Searcher.open(indexed[name], mmap=(name == "ivf")).search_vector(queries, k=10, nprobe=nprobe)
        for a, e in zip(ann, exact):
            assert [h.id for h in a] == [h.id for h in e], name
            np.testing.assert_allclose([h.score for h in a], [h.score for h in e], atol=1e-4)
            assert [h.path for h in a] == [h.path for h in e]
    # an L2 index ranks by distance; its scores come back as cosines (1 - d/2). The stored
    # float16 vectors are not exactly unit-norm, so near-ties may swap: compare scores per rank.
    l2 = Searcher.open(indexed["l2"]).search_vector(queries, k=10)
    for a, e in zip(l2, exact):
        assert a[0].id == e[0].id
        np.testing.assert_allclose([h.score for h in a], [h.score for h in e], atol=2e-3)


def test_exact_search_reads_the_shards_once_when_they_fit_the_cache(planted, monkeypatch):
    """A small collection's vectors are read on the first exact query and kept (same results as
    streaming the shards per query); over ``exact_cache_mb`` every query streams them."""
    from vlsearch.store.shards import ShardFiles  # the shard reader behind Collection.iter/read_embeddings

    reads = []
    real = ShardFiles.iter_embeddings
    monkeypatch.setattr(ShardFiles, "iter_embeddings", lambda self, *a, **kw: reads.append(1) or real(self, *a, **kw))
    queries = _unit(np.random.default_rng(3), 5, 64)
    cached, streamed = Searcher.open(planted[0]), Searcher.open(planted[0], options=SearcherOptions(exact_cache_mb=0))
    first = cached.search_vector(queries, k=10, exact=True)
    assert cached.search_vector(queries, k=10, exact=True) == first and len(reads) == 1
    reads.clear()
    for _ in range(2):
        assert [[h.id for h in q] for q in streamed.search_vector(queries, k=10, exact=True)] == \
            [[h.id for h in q] for q in first]
    assert len(reads) == 2


def test_search_parameters_reach_through_idmap_pretransform_and_refine():
    """Per-call params give what a clone of the index with those settings set gives."""
    rng = np.random.default_rng(6)
    xb, xq = _unit(rng, 2000, 64), _unit(rng, 30, 64)
    index = faiss.index_factory(64, "IDMap,PCA32,IVF16,PQ8x4,RFlat", faiss.METRIC_INNER_PRODUCT)
    index.train(xb)
    index.add_with_ids(xb, np.arange(len(xb)) * 3)
    p = search_parameters(index, nprobe=5, k_factor=3)
    assert isinstance(p, faiss.IndexRefineSearchParameters) and p.k_factor == 3
    clone = faiss.clone_index(index)
    refine = faiss.downcast_index(faiss.downcast_index(clone).index)
    refine.k_factor = 3
    faiss.extract_index_ivf(clone).nprobe = 5
    np.testing.assert_array_equal(index.search(xq, 10, params=p)[1], clone.search(xq, 10)[1])
    assert not np.array_equal(index.search(xq, 10, params=search_parameters(index, nprobe=1, k_factor=1))[1],
                              clone.search(xq, 10)[1])
    assert faiss.extract_index_ivf(index).nprobe == 1  # the original is untouched
    assert search_parameters(faiss.index_factory(8, "IDMap2,Flat")) is None
    ivf = faiss.index_factory(8, "IVF4,Flat")
    assert search_parameters(ivf).nprobe == ivf.nprobe  # None keeps the index's own value


def test_concurrent_calls_with_different_parameters_equal_serial_calls(indexed):
    rng = np.random.default_rng(2)
    queries = _unit(rng, 24, 64)
    settings = [(name, nprobe, kf) for name in ("ivf", "refine") for nprobe in (1, 2, 16) for kf in (1.0, 8.0)]
    searchers = {name: Searcher.open(indexed[name]) for name in ("ivf", "refine")}
    ivf_nprobe = faiss.downcast_index(searchers["ivf"].index).nprobe

    def run(setting, qi):
        name, nprobe, kf = setting
        hits = searchers[name].search_vector(queries[qi], k=10, nprobe=nprobe, k_factor=kf if name == "refine" else None)
        return [(h.id, h.score, h.path) for h in hits]

    jobs = [(setting, qi) for setting in settings for qi in range(len(queries))]
    serial = {job: run(*job) for job in jobs}
    order = [jobs[i] for i in np.random.default_rng(3).permutation(len(jobs))] * 2
    with ThreadPoolExecutor(max_workers=8) as pool:
        concurrent = list(pool.map(lambda job: (job, run(*job)), order))
    assert all(result == serial[job] for job, result in concurrent)
    # the parameters really matter (so the test could fail), and the shared index is untouched
    assert any(serial[(("ivf", 1, 1.0), q)] != serial[(("ivf", 16, 1.0), q)] for q in range(len(queries)))
    assert any(serial[(("refine", 16, 1.0), q)] != serial[(("refine", 16, 8.0), q)] for q in range(len(queries)))
    assert faiss.downcast_index(searchers["ivf"].index).nprobe == ivf_nprobe


def test_nprobe_default_comes_from_the_manifest_unless_the_options_set_it(indexed):
    s = Searcher.open(indexed["ivf"])
    assert s.nprobe_default == 4
    q = _unit(np.random.default_rng(4), 5, 64)
    assert s.knn(q, k=5)[1].tolist() == s.knn(q, k=5, nprobe=4)[1].tolist()
    wide = Searcher.open(indexed["ivf"], options=SearcherOptions(nprobe_default=16))
    assert wide.nprobe_default == 16
    assert wide.knn(q, k=5)[1].tolist() == s.knn(q, k=5, nprobe=16)[1].tolist() != s.knn(q, k=5)[1].tolist()
    with pytest.raises(InvalidQueryError, match="nprobe"):
        Searcher.open(indexed["ivf"], options=SearcherOptions(nprobe_default=0))


def test_open_keywords_override_fields_of_the_options(planted):
    base = SearcherOptions(exact_cache_mb=0, device="cpu")
    s = Searcher.open(planted[0], options=base, text_cache_mb=1)
    assert s.options == SearcherOptions(exact_cache_mb=0, device="cpu", text_cache_mb=1)
    assert s.text_cache.max_bytes == 1 << 20 and Searcher.open(planted[0]).options == SearcherOptions()
    with pytest.raises(TypeError):
        Searcher.open(planted[0], text_cache_size=10)


# ---- memory behaviour ----------------------------------------------------------------------

def test_open_reads_only_the_id_column_and_lookups_never_read_embeddings(indexed, monkeypatch):
    columns_read: list[tuple[str, tuple]] = []
    real_read_table, real_row_group = pq.read_table, pq.ParquetFile.read_row_group

    def spy_read_table(source, *args, columns=None, **kwargs):
        columns_read.append(("read_table", tuple(columns or ("<all>",))))
        return real_read_table(source, *args, columns=columns, **kwargs)

    def spy_row_group(self, i, columns=None, **kwargs):
        columns_read.append(("read_row_group", tuple(columns or ("<all>",))))
        return real_row_group(self, i, columns=columns, **kwargs)

    for name in ("read", "iter_batches", "read_row_groups"):
        monkeypatch.setattr(pq.ParquetFile, name, lambda *a, **k: pytest.fail("unexpected full Parquet read"))
    monkeypatch.setattr(pq, "read_table", spy_read_table)
    monkeypatch.setattr(pq.ParquetFile, "read_row_group", spy_row_group)

    s = Searcher.open(indexed["ivf"])
    assert columns_read == [("read_table", ("id",))] * 3  # one per shard, id column only
    assert s.row_locator.nbytes <= len(s.row_locator) * 12
    hits = s.search_vector(_unit(np.random.default_rng(5), 1, 64)[0], k=10, nprobe=16)
    assert len(hits) == 10 and all(h.path for h in hits)
    assert all("embedding" not in cols and "<all>" not in cols for _, cols in columns_read)


# ---- text cache ----------------------------------------------------------------------------

def test_repeated_text_queries_are_not_re_encoded(planted, tiny_encoder, monkeypatch):
    encoded: list[list[str]] = []
    real = tiny_encoder.encode_texts
    monkeypatch.setattr(tiny_encoder, "encode_texts", lambda texts, *a, **k: (encoded.append(list(texts)), real(texts))[1])
    s = Searcher.open(planted[0], encoder=tiny_encoder)
    first = s.search_text(TEXTS[0], k=3, exact=True)
    again = s.search_text(TEXTS[0], k=3, exact=True)
    batch = s.search_text([TEXTS[0], TEXTS[1], TEXTS[1]], k=3, exact=True)
    assert first == again == batch[0]
    assert encoded == [[TEXTS[0]], [TEXTS[1]]]
    assert s.text_cache.hits == 2 and s.text_cache.misses == 3


def test_the_text_cache_is_bounded_in_bytes(planted, tiny_encoder, monkeypatch):
    """A budget of two 64-d float32 vectors: a third text evicts the least recently used one."""
    encoded: list[list[str]] = []
    real = tiny_encoder.encode_texts
    monkeypatch.setattr(tiny_encoder, "encode_texts", lambda texts, *a, **k: (encoded.append(list(texts)), real(texts))[1])
    s = Searcher.open(planted[0], encoder=tiny_encoder, options=SearcherOptions(text_cache_mb=2 * 64 * 4 / 2**20))
    for text in (TEXTS[0], TEXTS[1], TEXTS[0], TEXTS[2], TEXTS[0], TEXTS[1]):
        s.embed_texts([text])
    assert encoded == [[TEXTS[0]], [TEXTS[1]], [TEXTS[2]], [TEXTS[1]]]  # TEXTS[1] was evicted by TEXTS[2]
    assert s.text_cache.nbytes <= 2 * 64 * 4 and len(s.text_cache) == 2
    none = Searcher.open(planted[0], encoder=tiny_encoder, options=SearcherOptions(text_cache_mb=0))
    np.testing.assert_array_equal(none.embed_texts([TEXTS[3]]), s.embed_texts([TEXTS[3]]))
    assert len(none.text_cache) == 0


def test_metadata_row_groups_are_cached_within_their_byte_budget(indexed, monkeypatch):
    reads = []
    real = pq.ParquetFile.read_row_group
    monkeypatch.setattr(pq.ParquetFile, "read_row_group", lambda self, *a, **k: reads.append(1) or real(self, *a, **k))
    q = _unit(np.random.default_rng(7), 3, 64)
    warm, cold = Searcher.open(indexed["flat"]), Searcher.open(indexed["flat"], metadata_cache_mb=0)
    for s in (warm, cold):
        first = s.search_vector(q, k=10)
        reads.clear()
        assert s.search_vector(q, k=10) == first
        assert (len(reads) == 0) == (s is warm)
    assert warm.metadata_reader.cache.hits > 0 and warm.metadata_reader.cache.nbytes <= 256 << 20
    assert len(cold.metadata_reader.cache) == 0


# ---- errors --------------------------------------------------------------------------------

def test_query_model_that_does_not_match_the_collection_is_refused(planted, tiny_encoder):
    other = copy.copy(tiny_encoder)
    other.info = ModelInfo(tiny_encoder.info.name, "some-other-weights", tiny_encoder.info.dim)
    with pytest.raises(CollectionMismatchError, match="query model"):
        Searcher.open(planted[0], encoder=other)


def test_index_built_for_another_model_is_refused(indexed, tmp_path):
    import shutil

    dest = shutil.copytree(indexed["flat"], tmp_path / "c")
    coll = Collection.open(dest)
    coll.update_manifest(index={**coll.manifest.index, "model": {"name": "ViT-B-32", "pretrained": None, "dim": 512}})
    with pytest.raises(CollectionMismatchError, match="rebuild"):
        Searcher.open(dest)


@pytest.mark.parametrize("vector", [np.ones(32, np.float32), np.ones((2, 65), np.float32), np.ones((0, 64)),
                                    np.zeros(64, np.float32), np.full(64, np.nan, np.float32), np.ones((2, 2, 64))])
def test_bad_query_vectors_are_refused(planted, vector):
    with pytest.raises(InvalidQueryError):
        Searcher.open(planted[0]).search_vector(vector, k=3, exact=True)


def test_wrong_dimension_message_names_both_dimensions(planted):
    with pytest.raises(InvalidQueryError, match=r"dimension 32.*64-d"):
        Searcher.open(planted[0]).search_vector(np.ones(32, np.float32), exact=True)


@pytest.mark.parametrize("k", [0, -3, 2.5, True, None])
def test_k_must_be_a_positive_integer(planted, k):
    with pytest.raises(InvalidQueryError, match="k must be"):
        Searcher.open(planted[0]).search_vector(np.ones(64, np.float32), k=k, exact=True)


@pytest.mark.parametrize("text", ["", "   ", [], ["ok", ""], [1], None, 3, b"bytes"])
def test_empty_or_non_string_text_is_refused(planted, tiny_encoder, text):
    with pytest.raises(InvalidQueryError):
        Searcher.open(planted[0], encoder=tiny_encoder).search_text(text, exact=True)


@pytest.mark.parametrize("image, kind", [("missing.jpg", "missing"), (b"not an image", "unidentified"),
                                         (b"", "empty"), (42, "int"), ([], "empty list")])
def test_unreadable_query_image_names_the_problem(planted, tiny_encoder, tmp_path, image, kind):
    if image == "missing.jpg":
        image = tmp_path / "missing.jpg"
    with pytest.raises(InvalidQueryError, match=kind):
        Searcher.open(planted[0], encoder=tiny_encoder).search_image(image, exact=True)


def test_ann_without_an_index_says_how_to_build_one(planted, tmp_path):
    s = Searcher.open(planted[0])
    with pytest.raises(IndexNotBuiltError, match=r"build-index.*exact=True"):
        s.search_vector(np.ones(64, np.float32))
    assert len(s.search_vector(np.ones(64, np.float32), k=2, exact=True)) == 2  # exact works without one


def test_manifest_index_with_missing_file_is_index_not_built(indexed, tmp_path):
    import shutil

    dest = shutil.copytree(indexed["flat"], tmp_path / "c")
    (dest / "index.faiss").unlink()
    with pytest.raises(IndexNotBuiltError, match="missing"):
        Searcher.open(dest)


@pytest.mark.parametrize("options", [{"nprobe": 0}, {"nprobe": -2}, {"k_factor": 0.5}])
def test_bad_search_parameters_are_refused(indexed, options):
    with pytest.raises(InvalidQueryError):
        Searcher.open(indexed["refine"]).search_vector(np.ones(64, np.float32), **options)


# ---- CLI -----------------------------------------------------------------------------------

runner = CliRunner()


def test_cli_prints_a_table_and_json_lines(planted, indexed):
    path, expected, image_paths = planted
    result = runner.invoke(app, ["search", str(indexed["flat"]), TEXTS[2], "-k", "3"])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert lines[0].split() == ["rank", "score", "path", "caption"] and len(lines) == 4
    assert lines[1].split()[:3] == ["1", lines[1].split()[1], "text-2.jpg"] and TEXTS[2] in lines[1]

    result = runner.invoke(app, ["search", str(path), "--image", str(image_paths[3]), "-k", "2", "--exact", "--json"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.output.strip().splitlines()]
    assert [r["rank"] for r in rows] == [1, 2] and rows[0]["id"] == expected[str(image_paths[3])]
    assert set(rows[0]) == {"rank", "id", "score", "path", "caption", "metadata"} and rows[0]["metadata"]["width"] == 64


def test_cli_errors_are_one_line_with_exit_code_1(planted):
    result = runner.invoke(app, ["search", str(planted[0]), "a dog"])
    assert result.exit_code == 1 and "build-index" in result.output
    result = runner.invoke(app, ["search", str(planted[0])])
    assert result.exit_code != 0 and "exactly one" in result.output
