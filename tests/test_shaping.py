"""Shaping the result list: min_score, autocut, group_by/per_group, order_by over the relevant set
and facets, the same through the Searcher, the HTTP API, the Client and the CLI."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from collection_support import copy_with_flat_index
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from vlsearch import Client
from vlsearch.app.cli import app as cli_app
from vlsearch.app.serve import ServeConfig, background_server, create_app
from vlsearch.core.errors import InvalidQueryError
from vlsearch.core.modelinfo import ModelInfo
from vlsearch.query.searcher import Searcher
from vlsearch.query.shaping import DEFAULT_DEPTH, ShapedHits, autocut
from vlsearch.store.arrays import embedding_array
from vlsearch.store.collection import Collection
from vlsearch.store.manifest import Manifest

N, D, SHARD = 1200, 16, 500
FOLDERS = np.array(["trips/alps", "trips/sea", "home", "work", "misc"])
LABELS = np.array(["dog", "cat", "bird"])

pytestmark = pytest.mark.usefixtures("one_faiss_thread")


def _data():
    """Vectors: a tight cluster of 300 around axis 0, all in folder "home" (so the top 100 of a
    query near it hold one folder), the rest spread; metadata: label, taken (a time), score
    with NULLs, captions (a list column)."""
    rng = np.random.default_rng(7)
    vectors = rng.standard_normal((N, D)).astype(np.float32)
    vectors[:300] = 0.15 * vectors[:300]
    vectors[:300, 0] += 1.0
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = rng.permutation(N).astype(np.int64) * 5 + 2
    folder = np.where(np.arange(N) < 300, "home", FOLDERS[rng.integers(0, len(FOLDERS), N)])
    meta = {
        "path": [f"{f}/{i:05d}.jpg" if f != "misc" else f"{i:05d}.jpg" for i, f in enumerate(folder)],
        "label": LABELS[rng.integers(0, 3, N)],
        "taken": rng.permutation(N).astype(np.int64) * 1000,
        "rating": pa.array(rng.integers(1, 6, N).astype(np.int32), mask=np.arange(N) % 9 == 0),
        "captions": [[f"photo {i}"] for i in range(N)],
    }
    return vectors, ids, meta


@pytest.fixture(scope="module")
def data():
    return _data()


@pytest.fixture(scope="module")
def coll_path(tmp_path_factory, data) -> Path:
    vectors, ids, meta = data
    root = tmp_path_factory.mktemp("shaping") / "coll"
    coll = Collection.create(root, Manifest(model=ModelInfo("synthetic", None, D), shard_size=SHARD))
    for s, start in enumerate(range(0, N, SHARD)):
        sl = slice(start, start + SHARD)
        coll.write_shard(s, pa.table({"id": ids[sl], **{k: (v[sl] if not isinstance(v, list) else v[sl])
                                                        for k, v in meta.items()},
                                      "embedding": embedding_array(vectors[sl])}))
    coll.update_manifest(counts={"images": N, "captions": 0, "failures": 0, "shards": 3}, complete=True)
    return root


@pytest.fixture(scope="module")
def searcher(coll_path):
    with Searcher.open(coll_path) as s:
        yield s


def _query(data, near_cluster: bool = True) -> np.ndarray:
    vectors = data[0]
    q = vectors[:300].mean(axis=0) if near_cluster else vectors[700] + 0.3 * vectors[900]
    return (q / np.linalg.norm(q)).astype(np.float32)


def _ranking(data, q):
    """Exact ranking: (order of rows, scores), best first."""
    scores = data[0] @ q
    order = np.argsort(-scores, kind="stable")
    return order, scores


def _folder(path: str) -> str:
    return path.rsplit("/", 1)[0] if "/" in path else ""


def _ids(hits) -> list[int]:
    return [int(h["id"]) if isinstance(h, dict) else h.id for h in hits]


# ---- autocut on hand-made lists ------------------------------------------------------------------

def test_autocut_cuts_before_the_nth_jump_as_weaviate_documents():
    distances = [0.1899, 0.1901, 0.191, 0.21, 0.215, 0.23]  # Weaviate's documented example
    assert [autocut(distances, n) for n in (1, 2, 3)] == [3, 5, 6]
    similarities = [1 - d for d in distances]  # a falling curve cuts at the same places
    assert [autocut(similarities, n) for n in (1, 2, 3)] == [3, 5, 6]
    assert autocut([0.9, 0.89, 0.88, 0.5, 0.49, 0.48, 0.47], 1) == 3
    assert autocut([0.9, 0.5, 0.49, 0.48, 0.47], 1) == 1


def test_autocut_keeps_short_flat_and_even_lists_whole():
    assert autocut([], 1) == 0 and autocut([0.3], 1) == 1 and autocut([0.3, 0.1], 1) == 2
    assert autocut([0.5] * 5, 1) == 5
    assert autocut(np.linspace(0.9, 0.1, 20), 1) == 20  # an even slope has no jump
    for bad in (0, -1, 1.5, True, "1"):
        with pytest.raises(InvalidQueryError, match="autocut"):
            autocut([0.3, 0.2], bad)


# ---- Searcher ------------------------------------------------------------------------------------

def test_min_score_keeps_the_top_k_scoring_at_least_it(searcher, data):
    q = _query(data, near_cluster=False)
    order, scores = _ranking(data, q)
    threshold = float(scores[order[5]]) - 1e-6
    hits = searcher.search_vector(q, k=10, exact=True, min_score=threshold)
    assert isinstance(hits, ShapedHits)
    assert _ids(hits) == [int(data[1][r]) for r in order[:6]]
    assert [h.rank for h in hits] == list(range(1, 7)) and min(h.score for h in hits) >= threshold
    assert searcher.search_vector(q, k=10, exact=True, min_score=1.01) == []
    plain = searcher.search_vector(q, k=10, exact=True)
    assert not isinstance(plain, ShapedHits)  # nothing asked: the plain path, the plain type
    assert _ids(searcher.search_vector(q, k=10, exact=True, min_score=-1.0)) == _ids(plain)


def test_autocut_through_the_searcher_cuts_the_top_k_list(searcher, data):
    q = _query(data, near_cluster=False)
    plain = searcher.search_vector(q, k=10, exact=True)
    n = autocut([h.score for h in plain], 1)
    cut = searcher.search_vector(q, k=10, exact=True, autocut=1)
    assert _ids(cut) == _ids(plain)[:n] and cut.relevant == n


def test_group_by_folder_caps_each_group_and_fetches_deeper(searcher, data):
    vectors, ids, meta = data
    q = _query(data)
    order, _ = _ranking(data, q)
    folders = [_folder(meta["path"][r]) for r in order]
    assert len(set(folders[:DEFAULT_DEPTH])) == 1  # the first list holds a single folder: deeper fetches needed
    expected, seen = [], Counter()
    for r, f in zip(order, folders):
        if seen[f] < 2:
            seen[f] += 1
            expected.append(int(ids[r]))
    hits = searcher.search_vector(q, k=8, exact=True, group_by="folder", per_group=2)
    assert _ids(hits) == expected[:8] and hits.depth > DEFAULT_DEPTH
    assert max(Counter(_folder(h.path) for h in hits).values()) == 2
    # every group exhausted before k: as many as there are (5 folders + the root's "")
    hits = searcher.search_vector(q, k=50, exact=True, group_by="folder")
    assert len(hits) == len(set(folders)) == len(FOLDERS)
    label_hits = searcher.search_vector(q, k=3, exact=True, group_by="LABEL")  # names match case-insensitively
    assert sorted(h.metadata["label"] for h in label_hits) == sorted(LABELS)


def test_order_by_sorts_the_relevant_set_not_the_top_k(searcher, data):
    vectors, ids, meta = data
    q = _query(data)
    order, scores = _ranking(data, q)
    threshold = float(scores[order[250]] + scores[order[251]]) / 2  # 251 relevant hits: more than the first list of 100
    relevant = [r for r in order if scores[r] >= threshold]
    newest = sorted(relevant, key=lambda r: -meta["taken"][r])[:10]
    hits = searcher.search_vector(q, k=10, exact=True, min_score=threshold, order_by="taken DESC")
    assert _ids(hits) == [int(ids[r]) for r in newest]
    assert hits.relevant == len(relevant) and [h.rank for h in hits] == list(range(1, 11))
    assert [h.metadata["taken"] for h in hits] == sorted((h.metadata["taken"] for h in hits), reverse=True)
    # no cut: the top `depth` are the relevant set
    top = list(order[:40])
    oldest = sorted(top, key=lambda r: meta["taken"][r])[:5]
    assert _ids(searcher.search_vector(q, k=5, exact=True, order_by="taken", depth=40)) == [int(ids[r]) for r in oldest]
    assert _ids(searcher.search_vector(q, k=5, exact=True, order_by="taken asc", depth=40)) == \
        [int(ids[r]) for r in oldest]
    # NULLs last in either direction
    rated = searcher.search_vector(q, k=DEFAULT_DEPTH, exact=True, order_by="rating DESC")
    values = [h.metadata["rating"] for h in rated]
    assert None in values and values[values.index(None):] == [None] * (len(values) - values.index(None))


def test_order_by_then_group_by_keeps_the_first_of_each_group_in_that_order(searcher, data):
    vectors, ids, meta = data
    q = _query(data, near_cluster=False)
    order, _ = _ranking(data, q)
    top = sorted(order[:DEFAULT_DEPTH], key=lambda r: -meta["taken"][r])
    expected, seen = [], set()
    for r in top:
        if meta["label"][r] not in seen:
            seen.add(meta["label"][r])
            expected.append(int(ids[r]))
    hits = searcher.search_vector(q, k=5, exact=True, order_by="taken DESC", group_by="label")
    assert _ids(hits) == expected


def test_facets_count_values_among_the_relevant_set(searcher, data):
    vectors, ids, meta = data
    q = _query(data, near_cluster=False)
    order, scores = _ranking(data, q)
    threshold = float(scores[order[149]] + scores[order[150]]) / 2
    relevant = [r for r in order if scores[r] >= threshold]
    hits = searcher.search_vector(q, k=5, exact=True, min_score=threshold, facets=["label", "folder", "rating"])
    assert len(hits) == 5 and hits.relevant == len(relevant) == 150
    assert hits.facets["label"] == dict(Counter(meta["label"][r] for r in relevant))
    assert hits.facets["folder"] == dict(Counter(_folder(meta["path"][r]) for r in relevant))
    assert list(hits.facets["label"].values()) == sorted(hits.facets["label"].values(), reverse=True)
    assert sum(hits.facets["rating"].values()) == 150 and None in hits.facets["rating"]
    # without a cut: over the first list (depth)
    top = searcher.search_vector(q, k=5, exact=True, facets=["label"], depth=30)
    assert top.facets["label"] == dict(Counter(meta["label"][r] for r in order[:30]))
    # with a filter: among the rows passing it
    dogs = searcher.search_vector(q, k=5, exact=True, where="label = 'dog'", facets=["label"])
    assert dogs.facets["label"] == {"dog": DEFAULT_DEPTH}


def test_shaping_works_on_the_ann_index_and_on_batches(tmp_path, coll_path, data):
    dest = copy_with_flat_index(coll_path, tmp_path / "indexed")
    queries = np.stack([_query(data), _query(data, near_cluster=False)])
    with Searcher.open(dest) as s:
        batch = s.search_vector(queries, k=6, group_by="folder", per_group=1, facets=["label"])
        for q, hits in zip(queries, batch):
            single = s.search_vector(q, k=6, exact=True, group_by="folder", per_group=1, facets=["label"])
            assert _ids(hits) == _ids(single) and hits.facets == single.facets


@pytest.mark.parametrize("kwargs, words", [
    ({"order_by": "nope DESC"}, "unknown column 'nope'"),
    ({"order_by": "taken SIDEWAYS"}, "order_by"),
    ({"order_by": "taken; DROP TABLE images"}, "order_by"),
    ({"order_by": "taken DESC, label"}, "order_by"),
    ({"group_by": 'label" OR 1=1 --'}, "unknown column"),
    ({"group_by": "captions"}, "single values"),
    ({"facets": ["label", "(SELECT 1)"]}, "unknown column"),
    ({"facets": "label"}, "list of column names"),
    ({"per_group": 2}, "needs group_by"),
    ({"group_by": "label", "per_group": 0}, "per_group"),
    ({"min_score": float("nan")}, "min_score"),
    ({"min_score": "0.2"}, "min_score"),
    ({"autocut": 0}, "autocut"),
    ({"depth": 5}, "smaller than k"),
    ({"depth": 10**6}, "depth"),
])
def test_bad_shaping_arguments_are_typed_errors(searcher, data, kwargs, words):
    with pytest.raises(InvalidQueryError, match=words.replace("(", r"\(")):
        searcher.search_vector(_query(data), k=10, exact=True, **kwargs)
    assert len(searcher.search_vector(_query(data), k=3, exact=True, order_by="taken")) == 3  # still usable


# ---- HTTP, Client (vector queries on the synthetic collection) -----------------------------------

SHAPES = [
    dict(min_score=0.5),
    dict(autocut=1),
    dict(group_by="folder", per_group=2),
    dict(order_by="taken DESC", min_score=0.6, facets=["label", "folder"]),
    dict(order_by="rating", group_by="label", depth=60, facets=["rating"]),
]


@pytest.fixture(scope="module")
def served(searcher):
    return create_app({"syn": searcher}, ServeConfig(log_level="warning"))


@pytest.fixture(scope="module")
def http(served):
    with TestClient(served) as client:
        yield client


@pytest.fixture(scope="module")
def client(served):
    with background_server(served) as url, Client(url, collection="syn") as c:
        yield c


def _facets_json(facets: dict) -> dict:
    return {c: [{"value": v, "count": n} for v, n in counts.items()] for c, counts in facets.items()}


@pytest.mark.parametrize("shape", SHAPES)
def test_http_and_client_return_what_the_searcher_returns(http, client, searcher, data, shape):
    q = _query(data)
    local = searcher.search_vector(q, k=7, exact=True, **shape)
    body = http.post("/api/collections/syn/search", json={"vector": q.tolist(), "k": 7, "exact": True, **shape})
    assert body.status_code == 200, body.text
    body = body.json()
    assert _ids(body["hits"]) == _ids(local) and [h["rank"] for h in body["hits"]] == [h.rank for h in local]
    assert body["relevant"] == local.relevant
    assert body["facets"] == (_facets_json(local.facets) if "facets" in shape else None)
    remote = client.search_vector(q, k=7, exact=True, **shape)
    assert isinstance(remote, ShapedHits) and _ids(remote) == _ids(local)
    assert remote.facets == local.facets and remote.relevant == local.relevant


def test_http_pages_of_a_shaped_list_concatenate(http, searcher, data):
    q = _query(data).tolist()
    shape = dict(group_by="folder", per_group=2, exact=True)
    whole = http.post("/api/collections/syn/search", json={"vector": q, "k": 8, **shape}).json()
    first = http.post("/api/collections/syn/search", json={"vector": q, "k": 4, **shape}).json()
    second = http.post("/api/collections/syn/search", json={"vector": q, "k": 4, "offset": 4, **shape}).json()
    assert _ids(first["hits"]) + _ids(second["hits"]) == _ids(whole["hits"])


def test_plain_http_searches_carry_no_shaping_fields(http, client, data):
    body = http.post("/api/collections/syn/search", json={"vector": _query(data).tolist(), "k": 3, "exact": True}).json()
    assert body["facets"] is None and body["relevant"] is None
    hits = client.search_vector(_query(data), k=3, exact=True)
    assert not isinstance(hits, ShapedHits)


@pytest.mark.parametrize("body, status, words", [
    ({"order_by": "taken SIDEWAYS"}, 400, "order_by"),
    ({"order_by": "nope"}, 400, "unknown column"),
    ({"group_by": "label; DROP TABLE images"}, 400, "unknown column"),
    ({"group_by": "captions"}, 400, "single values"),  # facets count a list column's elements (tags)
    ({"per_group": 2}, 400, "needs group_by"),
    ({"autocut": 0}, 422, "autocut"),
    ({"facets": "label"}, 422, "facets"),
    ({"depth": 3}, 400, "smaller than k"),
])
def test_bad_shaping_fields_are_4xx_and_typed_errors_in_the_client(http, client, data, body, status, words):
    q = _query(data)
    response = http.post("/api/collections/syn/search", json={"vector": q.tolist(), "k": 5, "exact": True, **body})
    assert response.status_code == status and words in response.text
    with pytest.raises(InvalidQueryError if status == 400 else Exception, match=words if status == 400 else None):
        client.search_vector(q, k=5, exact=True, **body)


# ---- text and image queries on a tiny-model collection: Searcher, HTTP, Client, CLI ---------------

TEXT_SHAPE = dict(min_score=-1.0, order_by="path DESC", facets=["folder", "width"], group_by="width", per_group=3)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_encoder):
    """Generated shapes in two sub-folders, embedded with the tiny model (exact search)."""
    import shutil

    import torch

    from indexing.embed import EmbedConfig, embed
    from vlsearch.data.shapes import ShapesConfig, generate_shapes

    root = tmp_path_factory.mktemp("shaping-tiny")
    data = generate_shapes(root / "shapes", ShapesConfig(n_train=0, n_heldout=16, image_format="jpg"))
    images = sorted((data.split_dir("heldout") / "images").iterdir())
    for i, img in enumerate(images):
        (root / "gallery" / ("a" if i % 3 else "b")).mkdir(parents=True, exist_ok=True)
        shutil.copy(img, root / "gallery" / ("a" if i % 3 else "b") / img.name)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        config = EmbedConfig(model=tiny_encoder.info.name, workers=0, batch_size=16, shard_size=16, device="cpu")
        return embed(root / "gallery", root / "coll", config, encoder=tiny_encoder).path, images
    finally:
        torch.set_num_threads(threads)


def test_text_and_image_queries_are_shaped_alike_in_every_surface(tiny, tiny_encoder):
    path, images = tiny
    with Searcher.open(path, encoder=tiny_encoder, device="cpu") as s:
        local = s.search_text("a red circle", k=6, exact=True, **TEXT_SHAPE)
        local_image = s.search_image(images[3], k=4, exact=True, facets=["folder"], autocut=2)
        assert set(local.facets["folder"]) == {"a", "b"} and sum(local.facets["folder"].values()) == local.relevant
        assert [h.path for h in local] == sorted((h.path for h in local), reverse=True)
        app = create_app({"tiny": s}, ServeConfig(log_level="warning"))
        with TestClient(app) as http:
            body = http.post("/api/collections/tiny/search", json={"text": "a red circle", "k": 6, "exact": True,
                                                                   **TEXT_SHAPE}).json()
            assert _ids(body["hits"]) == _ids(local) and body["facets"] == _facets_json(local.facets)
            with open(images[3], "rb") as f:
                upload = http.post("/api/collections/tiny/search/image", files={"file": f},
                                   data={"k": "4", "exact": "true", "facets": ["folder"], "autocut": "2"}).json()
            assert _ids(upload["hits"]) == _ids(local_image) and upload["facets"] == _facets_json(local_image.facets)
        with background_server(app) as url, Client(url, collection="tiny") as c:
            remote = c.search_text("a red circle", k=6, exact=True, **TEXT_SHAPE)
            assert _ids(remote) == _ids(local) and remote.facets == local.facets
            remote_image = c.search_image(images[3], k=4, exact=True, facets=["folder"], autocut=2)
            assert _ids(remote_image) == _ids(local_image) and remote_image.facets == local_image.facets
    args = ["search", str(path), "a red circle", "-k", "6", "--exact", "--device", "cpu", "--min-score", "-1",
            "--order-by", "path DESC", "--facet", "folder", "--facet", "width", "--group-by", "width",
            "--per-group", "3"]
    result = CliRunner().invoke(cli_app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.output.splitlines() if line.strip()]
    assert [int(line["id"]) for line in lines[:-1]] == _ids(local)
    assert lines[-1] == {"facets": _facets_json(local.facets)}
    table = CliRunner().invoke(cli_app, args)
    assert table.exit_code == 0 and "folder: a (" in table.output, table.output
    bad = CliRunner().invoke(cli_app, [*args[:6], "--device", "cpu", "--order-by", "path SIDEWAYS"])
    assert bad.exit_code == 1 and "order_by" in bad.output


def test_reranked_lists_are_shaped_on_the_rerank_scores(tmp_path_factory, tiny_encoder):
    from test_rerank import rr_collection

    path, _, rr = rr_collection.__wrapped__(tmp_path_factory, tiny_encoder)
    with Searcher.open(path, encoder=tiny_encoder, reranker=rr, rerank_features="recompute") as s:
        query = "a dark noisy square"
        plain = s.search_text(query, k=12, exact=True, rerank=12)
        threshold = (plain[5].score + plain[6].score) / 2
        cut = s.search_text(query, k=12, exact=True, rerank=12, min_score=threshold)
        assert _ids(cut) == _ids(plain)[:6]
        assert [h.first_stage_score for h in cut] == [h.first_stage_score for h in plain[:6]]
        ordered = s.search_text(query, k=5, exact=True, rerank=12, order_by="path DESC", facets=["width"])
        assert [h.path for h in ordered] == sorted((h.path for h in ordered), reverse=True)
        assert ordered.facets == {"width": {48: 24}} and ordered.relevant == 24
        assert all(h.first_stage_score is not None for h in ordered)


def test_more_like_this_is_shaped_without_the_item_itself(http, searcher, data):
    vectors, ids, meta = data
    item = int(ids[10])
    for shape in (dict(autocut=1), dict(group_by="folder", per_group=2, facets=["label"]),
                  dict(min_score=0.5, order_by="taken DESC", facets=["folder"])):
        body = http.post("/api/collections/syn/search", json={"id": str(item), "k": 6, "exact": True, **shape}).json()
        local = searcher.search_vector(vectors[10], k=6, exact=True, where=f"id != {item}", **shape)
        assert item not in _ids(body["hits"]) and len(body["hits"]) > 0
        assert _ids(body["hits"]) == _ids(local) and body["relevant"] == local.relevant
        assert body["facets"] == (_facets_json(local.facets) if "facets" in shape else None)
