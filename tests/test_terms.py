"""Weighted multi-term queries and recommendation from examples (vlsearch.query.terms), through the
Searcher, the CLI, the HTTP API and the Client, on a tiny-model collection."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from typer.testing import CliRunner

from vlsearch import Client
from vlsearch.app.cli import app as cli_app
from vlsearch.app.serve import ServeConfig, background_server, create_app
from vlsearch.core.errors import InvalidQueryError, ItemNotFoundError
from vlsearch.query.searcher import Searcher
from vlsearch.query.terms import (Item, Query, Term, TermSyntaxError, ZeroQueryError, combine, feedback_vector,
                                  parse_cli_terms, plain_text)
from vlsearch.store.collection import Collection

N_IMAGES = 24
runner = CliRunner()


@pytest.fixture(scope="module")
def coll(tmp_path_factory, tiny_encoder) -> Path:
    """Captioned shapes embedded with the tiny model, with a Flat index."""
    import torch

    from indexing.build import build_index
    from indexing.embed import EmbedConfig, embed
    from vlsearch.data.shapes import ShapesConfig, generate_shapes

    root = tmp_path_factory.mktemp("terms")
    data = generate_shapes(root / "shapes", ShapesConfig(n_train=0, n_heldout=N_IMAGES, image_format="jpg"))
    config = EmbedConfig(model=tiny_encoder.info.name, workers=0, batch_size=16, shard_size=16, device="cpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        path = embed(data.split_dir("heldout") / "images", root / "coll", config, encoder=tiny_encoder).path
    finally:
        torch.set_num_threads(threads)
    build_index(path, index_type="Flat")
    return path


@pytest.fixture(scope="module")
def searcher(coll, tiny_encoder) -> Searcher:
    with Searcher.open(coll, encoder=tiny_encoder, device="cpu") as s:
        yield s


@pytest.fixture(scope="module")
def stored(coll) -> dict[int, np.ndarray]:
    ids, vectors = Collection.open(coll).read_embeddings()
    return {int(i): np.asarray(v, np.float32) for i, v in zip(ids, vectors)}


@pytest.fixture(scope="module")
def images(coll) -> list[Path]:
    return sorted(Path(Collection.open(coll).manifest.source["path"]).iterdir())


def _unit(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, np.float64)
    return v / np.linalg.norm(v)


def _ids(hits) -> list[int]:
    return [int(h["id"]) if isinstance(h, dict) else h.id for h in hits]


def _path_id(searcher: Searcher, path: Path) -> int:
    return next(h.id for h in searcher.search_image(path, k=N_IMAGES, exact=True) if h.path == path.name)


# ---- the query vector ------------------------------------------------------------------------------

def test_the_query_vector_is_the_normalised_weighted_sum_of_normalised_term_embeddings(searcher, stored, images):
    item = sorted(stored)[5]
    terms = [("a large red circle", 2.0), (images[3], 1.0), ("a blue square", -1.0), (Item(item), 0.5)]
    t_red, t_blue = searcher.embed_texts(["a large red circle", "a blue square"])
    image = searcher.embed_images([images[3]])[0]
    # each term scaled to a unit vector, then weighed: an unnormalised one would count by its norm
    expected = _unit(2 * _unit(t_red) + _unit(image) - _unit(t_blue) + 0.5 * _unit(stored[item]))
    got = searcher.query_vector(terms)
    assert got.dtype == np.float32 and np.allclose(got, expected, atol=1e-5)
    assert np.isclose(np.linalg.norm(got), 1, atol=1e-5)
    # only the weights' ratios matter; the weights do matter
    assert np.allclose(searcher.query_vector([(t, 10 * w) for t, w in terms]), got, atol=1e-5)
    assert not np.allclose(searcher.query_vector([(t, 1.0) for t, _ in terms]), got, atol=1e-3)
    # an image term is the same as a Path, bytes or a PIL image; a Query or Terms read the same
    for same in (images[3].read_bytes(), Image.open(images[3])):
        assert np.allclose(searcher.query_vector([*terms[:1], (same, 1.0), *terms[2:]]), got, atol=1e-5)
    assert np.allclose(searcher.query_vector(Query.of([Term(*t) for t in terms])), got, atol=1e-5)
    assert np.allclose(searcher.query_vector([list(t) for t in terms]), got, atol=1e-5)  # as JSON would give
    # search() searches with that vector (the item term left out of the hits by default)
    hits = searcher.search(terms, k=6, exact=True)
    plain = searcher.search_vector(expected.astype(np.float32), k=7, exact=True)
    assert _ids(hits) == [i for i in _ids(plain) if i != item][:6] and [h.rank for h in hits] == [1, 2, 3, 4, 5, 6]
    assert np.allclose([h.score for h in hits], [h.score for h in plain if h.id != item][:6], atol=1e-5)


def test_combine_weighs_each_term_by_its_weight_whatever_its_norm():
    vectors = np.array([[30.0, 0, 0], [0, 0.5, 0], [0, 0, 2]], np.float32)  # one direction each, any norm
    assert np.allclose(combine(vectors, [1, 1, 0]), [2 ** -0.5, 2 ** -0.5, 0], atol=1e-6)
    assert np.allclose(combine(vectors, [3, 4, 0]), [0.6, 0.8, 0], atol=1e-6)
    assert np.allclose(combine(vectors, [1, 0, -1]), [2 ** -0.5, 0, -(2 ** -0.5)], atol=1e-6)
    same = np.array([[1.0, 2.0, 2.0], [2.0, 4.0, 4.0]], np.float32)
    assert np.allclose(combine(same, [1, -0.9]), [1 / 3, 2 / 3, 2 / 3], atol=1e-5)  # a tenth left: that direction
    with pytest.raises(ZeroQueryError):
        combine(same, [1, -0.99999])  # about zero, relative to the weights
    with pytest.raises(InvalidQueryError, match="no direction"):
        combine(np.zeros((1, 3), np.float32), [1])
    assert np.allclose(feedback_vector(vectors[:2], vectors[2:], 1.0), _unit([0.5, 0.5, -1]), atol=1e-6)
    assert np.allclose(feedback_vector(vectors[:2], None), [2 ** -0.5, 2 ** -0.5, 0], atol=1e-6)


def test_a_single_term_searches_like_the_plain_query(searcher, images):
    text = searcher.search("a small green star", k=5, exact=True)
    assert _ids(text) == _ids(searcher.search_text("a small green star", k=5, exact=True))
    assert np.allclose([h.score for h in text],
                       [h.score for h in searcher.search_text("a small green star", k=5, exact=True)], atol=1e-5)
    assert _ids(searcher.search([(images[2], 3.0)], k=5, exact=True)) == \
        _ids(searcher.search_image(images[2], k=5, exact=True))


def test_a_negative_term_moves_the_results_away_from_it(searcher):
    n = N_IMAGES
    towards = searcher.search("a large red circle", k=n, exact=True)
    away_vec = _unit(searcher.embed_texts(["a blue square"])[0])
    closeness = {h.id: float(np.dot(away_vec, v)) for h, v in zip(towards, searcher.item_vectors(_ids(towards)))}
    for weight in (-0.5, -1.0, -2.0):
        hits = searcher.search([("a large red circle", 1.0), ("a blue square", weight)], k=n, exact=True)
        assert sorted(_ids(hits)) == sorted(closeness)
        # among the top 5, the hits are less like the negative term than the positive term's own top 5
        # (a sum over the top k of cos(hit, negative) can only drop when ranking by cos(+) - w cos(-))
        top, base = _ids(hits)[:5], _ids(towards)[:5]
        assert top != base
        assert sum(closeness[i] for i in top) < sum(closeness[i] for i in base)
    # the further away, the lower the most negative-like item ranks
    most_like = max(closeness, key=closeness.get)
    ranks = [_ids(searcher.search([("a large red circle", 1.0), ("a blue square", w)], k=n, exact=True))
             .index(most_like) for w in (0.0, -1.0, -4.0)]
    assert ranks[0] <= ranks[1] <= ranks[2] and ranks[2] > ranks[0]


def test_item_terms_use_the_stored_vector_and_are_left_out_unless_asked(searcher, stored):
    item = sorted(stored)[7]
    assert np.allclose(searcher.item_vector(item), stored[item])
    assert np.allclose(searcher.item_vectors([item, sorted(stored)[0], item]),
                       [stored[item], stored[sorted(stored)[0]], stored[item]])
    kept = searcher.search([Item(item)], k=3, exact=True, exclude_items=False)
    assert kept[0].id == item and kept[0].score == pytest.approx(1.0, abs=1e-3)
    left_out = searcher.search([Item(item)], k=3, exact=True)
    assert _ids(left_out) == _ids(searcher.search_vector(stored[item], k=4, exact=True))[1:]
    with pytest.raises(ItemNotFoundError, match="no item 999999"):
        searcher.search([("a red circle", 1.0), (Item(999999), 1.0)])


@pytest.mark.parametrize("query, error, words", [
    ([("a dog", 1.0), ("a dog", -1.0)], ZeroQueryError, "cancel out"),
    ([("a dog", 0.0)], ZeroQueryError, "cancel out"),
    ([("a dog", float("nan"))], InvalidQueryError, "finite"),
    ([("a dog", True)], InvalidQueryError, "finite"),
    ([("   ", 1.0)], InvalidQueryError, "empty"),
    ([12], InvalidQueryError, "Item"),
    ([("a dog", 1.0, 2.0)], InvalidQueryError, "pairs"),
    ([], InvalidQueryError, "at least one term"),
    ([(3.5, 1.0)], InvalidQueryError, "not a float"),
    ([("x", 1.0), (object(), 1.0)], InvalidQueryError, "not a object"),
])
def test_bad_queries_get_typed_errors(searcher, query, error, words):
    with pytest.raises(error, match=words):
        searcher.search(query)


def test_item_ids_are_their_own_kind():
    with pytest.raises(InvalidQueryError, match="non-negative"):
        Item(-1)
    with pytest.raises(InvalidQueryError, match="non-negative"):
        Item(True)
    assert Term(Item(np.int64(4))).kind == "item" and Term("x").kind == "text" and Term(Path("a.jpg")).kind == "image"
    assert Query.of([Item(3), ("a", 2), Item(5)]).items == [3, 5]


# ---- more like these ---------------------------------------------------------------------------------

def test_more_like_ranks_the_nearest_neighbour_first_and_leaves_the_examples_out(searcher, stored):
    ids = sorted(stored)
    matrix = np.stack([_unit(stored[i]) for i in ids])
    sims = matrix @ matrix.T
    np.fill_diagonal(sims, -np.inf)
    top2 = -np.sort(-sims, axis=1)[:, :2]
    x = ids[int(np.argmax(top2[:, 0] - top2[:, 1]))]  # the item whose nearest neighbour is the clearest
    by_id = dict(zip(ids, sims[ids.index(x)]))
    neighbours = sorted(by_id, key=by_id.get, reverse=True)
    hits = searcher.more_like([x], k=5, exact=True)
    assert hits[0].id == neighbours[0] and x not in _ids(hits) and [h.rank for h in hits] == [1, 2, 3, 4, 5]
    # the next ones in order too (up to the stored vectors' precision)
    assert np.allclose([h.score for h in hits], [by_id[i] for i in neighbours[:5]], atol=1e-3)
    assert all(np.isclose(h.score, by_id[h.id], atol=1e-3) for h in hits)
    assert searcher.more_like([x], k=1, exact=True, exclude_examples=False)[0].id == x


def test_more_like_is_the_mean_of_positives_minus_the_weighted_mean_of_negatives(searcher, stored):
    ids = sorted(stored)
    pos, neg = [ids[1], ids[2]], [ids[9], ids[10], ids[11]]
    mean_pos = np.mean([_unit(stored[i]) for i in pos], axis=0)
    mean_neg = np.mean([_unit(stored[i]) for i in neg], axis=0)
    for weight in (0.5, 1.0, 0.0):
        expected = _unit(mean_pos - weight * mean_neg)
        assert np.allclose(searcher.more_like_vector(pos, neg, negative_weight=weight), expected, atol=1e-5)
    default = searcher.more_like_vector(pos, neg)
    assert np.allclose(default, _unit(mean_pos - 0.5 * mean_neg), atol=1e-5)
    hits = searcher.more_like(pos, neg, k=N_IMAGES, exact=True)
    assert not set(pos + neg) & set(_ids(hits)) and len(hits) == N_IMAGES - 5
    plain = searcher.search_vector(default, k=N_IMAGES, exact=True)
    assert _ids(hits) == [i for i in _ids(plain) if i not in pos + neg]
    assert _ids(searcher.more_like(pos, neg, k=4, where=f"id != {_ids(hits)[0]}", exact=True)) == _ids(hits)[1:5]


@pytest.mark.parametrize("pos, neg, error, words", [
    ([], [], InvalidQueryError, "at least one positive"),
    ([0], [0], InvalidQueryError, "both a positive and a negative"),
    (0, [], InvalidQueryError, "as lists"),
    ([-2], [], InvalidQueryError, "non-negative"),
    ([999999], [], ItemNotFoundError, "999999"),
])
def test_bad_examples_get_typed_errors(searcher, stored, pos, neg, error, words):
    first = sorted(stored)[0]  # ids given as 0 stand for a stored item
    pos, neg = ([first if p == 0 else p for p in pos] if isinstance(pos, list) else first), \
        [first if p == 0 else p for p in neg]
    with pytest.raises(error, match=words):
        searcher.more_like(pos, neg)
    with pytest.raises(InvalidQueryError, match="negative_weight"):
        searcher.more_like([first], negative_weight=-1)


# ---- the command line ---------------------------------------------------------------------------------

@pytest.mark.parametrize("words, expected", [
    (["2:golden retriever", "+", "./pool.jpg", "-", "fruit"],
     [("golden retriever", 2.0), (Path("pool.jpg"), 1.0), ("fruit", -1.0)]),
    (["-", "fruit"], [("fruit", -1.0)]),
    (["+", "a dog"], [("a dog", 1.0)]),
    (["a dog", "-", "0.5:id:12"], [("a dog", 1.0), (Item(12), -0.5)]),
    (["1e1:a", "-", "-2:b"], [("a", 10.0), ("b", 2.0)]),  # the sign multiplies the weight
    (["photo: a dog", "+", "inf:x", "+", "id :3"], [("photo: a dog", 1.0), ("inf:x", 1.0), ("id :3", 1.0)]),
    (["2:pool.jpg"], [(Path("pool.jpg"), 2.0)]),
    (["missing.jpg"], [("missing.jpg", 1.0)]),  # not a file: a text
])
def test_cli_terms_parse_rclip_style(words, expected):
    query = parse_cli_terms(words, is_file=lambda w: w in ("./pool.jpg", "pool.jpg"))
    assert [(t.value, t.weight) for t in query.terms] == expected


@pytest.mark.parametrize("words, words_in_error", [
    (["a dog", "fruit"], "without a + or -"),
    (["a", "+"], "ends with a sign"),
    (["-"], "ends with a sign"),
    (["a", "+", "-", "b"], "two signs in a row"),
    (["-", "-", "b"], "two signs in a row"),
    (["2:"], "empty"),
    (["a", "+", " "], "empty"),
    (["id:12a"], "bad item id"),
    (["id:"], "bad item id"),
    ([], "no query term"),
])
def test_cli_terms_syntax_errors_are_typed(words, words_in_error):
    with pytest.raises(TermSyntaxError, match=re.escape(words_in_error)):
        parse_cli_terms(words, is_file=lambda w: False)


def test_a_lone_plain_text_stays_a_text_query():
    assert plain_text(["a dog"]) == "a dog" and plain_text(["pool.jpg"]) == "pool.jpg"
    assert plain_text(["2:a dog"]) is None and plain_text(["id:3"]) is None and plain_text(["a", "+", "b"]) is None


def _cli(*args: str):
    return runner.invoke(cli_app, ["search", *args, "--device", "cpu", "--exact", "--json"])


def test_cli_searches_terms_and_examples_like_the_searcher(coll, searcher, images, stored, monkeypatch):
    monkeypatch.chdir(images[0].parent)
    result = _cli(str(coll), "2:a large red circle", "+", images[4].name, "-", "a blue square", "-k", "5")
    assert result.exit_code == 0, result.output
    got = [json.loads(line) for line in result.stdout.splitlines()]
    expected = searcher.search([("a large red circle", 2.0), (images[4], 1.0), ("a blue square", -1.0)],
                               k=5, exact=True)
    assert _ids(got) == _ids(expected)
    item = sorted(stored)[3]
    result = _cli(str(coll), "a red circle", "+", f"0.5:id:{item}", "-k", "4")
    assert result.exit_code == 0, result.output
    expected = searcher.search([("a red circle", 1.0), (Item(item), 0.5)], k=4, exact=True)
    assert _ids(json.loads(line) for line in result.stdout.splitlines()) == _ids(expected)
    # a lone text is the plain text search, unchanged
    result = _cli(str(coll), "a red circle", "-k", "3")
    assert _ids(json.loads(line) for line in result.stdout.splitlines()) == \
        _ids(searcher.search_text("a red circle", k=3, exact=True))
    # recommend from examples
    a, b, c = sorted(stored)[1:4]
    result = _cli(str(coll), "--like", str(a), "--like", str(b), "--unlike", str(c), "-k", "4")
    assert result.exit_code == 0, result.output
    assert _ids(json.loads(line) for line in result.stdout.splitlines()) == \
        _ids(searcher.more_like([a, b], [c], k=4, exact=True))


@pytest.mark.parametrize("args, code, words", [
    (["a dog", "fruit"], 1, "without a + or -"),
    (["a dog", "-"], 1, "ends with a sign"),
    (["a dog", "-", "a dog"], 1, "cancel out"),
    (["a dog", "+", "id:999999"], 1, "no item 999999"),
    (["a dog", "+", "b", "--rerank", "10"], 2, "single text queries only"),
    (["--like", "1", "--image", "x.png"], 2, "exactly one"),
    (["a dog", "--unlike", "1"], 2, "--unlike goes with --like"),
])
def test_cli_errors(coll, args, code, words):
    result = _cli(str(coll), *args)
    assert result.exit_code == code and words in result.output, result.output


# ---- HTTP and the Client ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def served(coll, searcher):
    return create_app({"c": searcher}, ServeConfig(log_level="warning"))


@pytest.fixture(scope="module")
def http(served):
    with TestClient(served) as client:
        yield client


def _post(http, path="search", **body):
    return http.post(f"/api/collections/c/{path}", json=body)


def test_http_terms_search_matches_the_searcher(http, searcher, images, stored):
    item = sorted(stored)[6]
    data = images[2].read_bytes()
    terms = [{"text": "a large red circle", "weight": 2}, {"image_base64": base64.b64encode(data).decode()},
             {"text": "a blue square", "weight": -1.0}, {"id": str(item), "weight": 0.5}]
    body = _post(http, terms=terms, k=5, exact=True).json()
    local = searcher.search([("a large red circle", 2.0), (data, 1.0), ("a blue square", -1.0), (Item(item), 0.5)],
                            k=5, exact=True)
    assert body["query"] == "terms" and _ids(body["hits"]) == _ids(local) and item not in _ids(body["hits"])
    assert np.allclose([h["score"] for h in body["hits"]], [h.score for h in local], atol=1e-5)
    page = _post(http, terms=terms, k=2, offset=3, exact=True).json()
    assert _ids(page["hits"]) == _ids(local)[3:5] and [h["rank"] for h in page["hits"]] == [4, 5]
    where = f"id != {_ids(local)[0]}"
    filtered = _post(http, terms=terms, k=4, exact=True, where=where).json()
    assert _ids(filtered["hits"]) == _ids(local)[1:5] == _ids(searcher.search(
        [("a large red circle", 2.0), (data, 1.0), ("a blue square", -1.0), (Item(item), 0.5)], k=4, exact=True,
        where=where))


def test_http_more_like_matches_the_searcher(http, searcher, stored):
    a, b, c = sorted(stored)[2:5]
    body = _post(http, "more_like", positive_ids=[str(a), b], negative_ids=[c], k=4, exact=True).json()
    assert body["query"] == "more_like"
    assert _ids(body["hits"]) == _ids(searcher.more_like([a, b], [c], k=4, exact=True))
    kept = _post(http, "more_like", positive_ids=[a], k=1, exact=True, exclude_examples=False).json()
    assert _ids(kept["hits"]) == [a]
    weighted = _post(http, "more_like", positive_ids=[a], negative_ids=[c], negative_weight=2, k=3, exact=True)
    assert _ids(weighted.json()["hits"]) == _ids(searcher.more_like([a], [c], negative_weight=2, k=3, exact=True))


@pytest.mark.parametrize("path, body, status, words", [
    ("search", {"terms": [{"text": "a", "weight": 1}], "text": "a"}, 422, "exactly one of"),
    ("search", {"terms": []}, 422, "terms"),
    ("search", {"terms": [{"text": "a", "id": 3}]}, 422, "exactly one of text, image_base64 or id"),
    ("search", {"terms": [{"weight": 1}]}, 422, "exactly one of text, image_base64 or id"),
    ("search", {"terms": [{"text": "a", "weight": "2"}]}, 422, "weight"),
    ("search", {"terms": [{"text": "a", "colour": "red"}]}, 422, "colour"),
    ("search", {"terms": [{"text": "a dog"}, {"text": "a dog", "weight": -1}]}, 400, "cancel out"),
    ("search", {"terms": [{"id": "999999"}]}, 404, "no item 999999"),
    ("search", {"terms": [{"image_base64": "not base64!"}]}, 400, "base64"),
    ("search", {"terms": [{"image_base64": base64.b64encode(b"not an image").decode()}]}, 400, "not a usable image"),
    ("search", {"terms": [{"text": "a"}], "rerank": 10}, 400, "rerank"),
    ("more_like", {"positive_ids": []}, 422, "positive_ids"),
    ("more_like", {"positive_ids": ["x1"]}, 422, "item id"),
    ("more_like", {"positive_ids": [1], "negative_ids": [1]}, 400, "both a positive and a negative"),
    ("more_like", {"positive_ids": [999999]}, 404, "no item 999999"),
    ("more_like", {"positive_ids": [1], "negative_weight": -1}, 422, "negative_weight"),
])
def test_http_bad_terms_and_examples_get_4xx(http, stored, path, body, status, words):
    body = json.loads(json.dumps(body).replace("[1]", f"[{sorted(stored)[0]}]"))
    response = _post(http, path, **body)
    assert response.status_code == status and words in response.text, response.text


def test_http_weights_must_be_finite(http):
    response = http.post("/api/collections/c/search", content=b'{"terms": [{"text": "a", "weight": Infinity}]}',
                         headers={"content-type": "application/json"})
    assert response.status_code == 422 and "finite" in response.text


def test_client_search_terms_and_more_like_match_the_searcher(served, searcher, images, stored):
    item = sorted(stored)[8]
    terms = [("a large red circle", 2.0), (images[5], 1.0), (Image.open(images[6]), 0.5), ("a blue square", -1.0),
             (Item(item), 1.0)]
    with background_server(served) as url, Client(url, collection="c") as client:
        remote = client.search_terms(terms, k=5, exact=True)
        local = searcher.search(terms, k=5, exact=True)
        assert [(h.id, h.rank, h.path) for h in remote] == [(h.id, h.rank, h.path) for h in local]
        assert np.allclose([h.score for h in remote], [h.score for h in local], atol=1e-4)
        assert _ids(client.search_terms("a red circle", k=3, exact=True)) == \
            _ids(searcher.search_text("a red circle", k=3, exact=True))
        a, b = sorted(stored)[:2]
        assert _ids(client.more_like([a], [b], k=4, exact=True)) == _ids(searcher.more_like([a], [b], k=4, exact=True))
        assert _ids(client.more_like([a], k=3, where=f"id != {b}", exact=True)) == \
            _ids(searcher.more_like([a], k=3, where=f"id != {b}", exact=True))
        with pytest.raises(InvalidQueryError, match="cancel out"):  # the server's ZeroQueryError, by its base
            client.search_terms([("a dog", 1.0), ("a dog", -1.0)])
        with pytest.raises(ItemNotFoundError):
            client.more_like([999999])
        with pytest.raises(InvalidQueryError, match="Item"):
            client.search_terms([5])


def test_terms_and_examples_take_the_shaping_options_with_examples_out_before_the_cut(searcher, stored):
    item = next(iter(stored))
    plain = searcher.more_like([item], k=5, exact=True)
    cut = searcher.more_like([item], k=5, exact=True, autocut=1)
    # the example's own score (1.0) never counts as the list's first jump: the cut keeps hits
    assert item not in _ids(cut) and len(cut) >= 1 and _ids(cut) == _ids(plain)[:len(cut)]
    floor = plain[2].score
    shaped = searcher.search([("a photo", 1.0), (Item(item), 1.0)], k=5, exact=True, min_score=floor)
    assert item not in _ids(shaped) and all(h.score >= floor for h in shaped)
