"""Auto-tags from stored image embeddings (indexing.tagging): vocabularies, the tags columns, and
tags as filters, facets, keyword terms and HTTP metadata."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pyarrow as pa
import pytest
from typer.testing import CliRunner

from indexing.build import build_index
from indexing.tagging import (
    BUILTIN_VOCABULARY, TagConfig, Vocabulary, calibrate_min_score, calibrate_tag_scores, calibrated_min_score,
    read_calibration, read_vocabulary, tag_collection,
)
from vlsearch.app.cli import app
from vlsearch.core.errors import CollectionMismatchError, InvalidQueryError, TaggingError
from vlsearch.core.modelinfo import ModelInfo
from vlsearch.query.searcher import Searcher
from vlsearch.store.arrays import embedding_array
from vlsearch.store.collection import Collection
from vlsearch.store.manifest import Manifest

TAGS = ["dog", "beach", "car", "tree", "snow", "cat"]
DIM = 16
MODEL = ModelInfo("fake-tags", None, DIM)


class FakeEncoder:
    """Each text embeds as the basis vector of the tag it names: tag prototypes are exact axes."""

    info = MODEL

    def encode_texts(self, texts):
        out = np.zeros((len(texts), DIM), np.float32)
        for i, text in enumerate(texts):
            out[i, next(j for j, t in enumerate(TAGS) if f" {t}." in text)] = 1.0
        return out


def _unit(*tags: str, noise: int | None = None, weights: tuple[float, ...] | None = None) -> np.ndarray:
    v = np.zeros(DIM, np.float32)
    for t, w in zip(tags, weights or [1.0] * len(tags)):
        v[TAGS.index(t)] = w
    if noise is not None:
        v[len(TAGS):] = np.random.default_rng(noise).standard_normal(DIM - len(TAGS))
    return v / np.linalg.norm(v)


#: row -> (embedding, tags expected at min_score 0.5 and max_tags 2, best first)
ROWS = [
    (_unit("dog"), ["dog"]),
    (_unit("dog", "beach") + np.float32(0.01) * _unit("beach"), ["beach", "dog"]),
    (_unit("car", "tree", "snow", weights=(1.0, 0.9, 0.8)), ["car", "tree"]),  # three above 0.5: two kept
    (_unit(noise=1), []),  # no tag near it: tagged, with no tag
    (_unit("cat", noise=2), ["cat"] if _unit("cat", noise=2)[TAGS.index("cat")] >= 0.5 else []),
]


def _collection(path, rows=ROWS, start: int = 0) -> Collection:
    coll = Collection.create(path, Manifest(model=MODEL, shard_size=2))
    x = np.stack([r[0] for r in rows]).astype(np.float32)
    ids = np.arange(start, start + len(rows), dtype=np.int64) + 100
    for k, s in enumerate(range(0, len(rows), 2)):
        coll.write_shard(k, pa.table({"id": pa.array(ids[s:s + 2]), "path": [f"p/{i}.jpg" for i in ids[s:s + 2]],
                                      "width": [8] * len(ids[s:s + 2]), "height": [8] * len(ids[s:s + 2]),
                                      "captions": pa.array([[]] * len(ids[s:s + 2]), pa.list_(pa.string())),
                                      "embedding": embedding_array(x[s:s + 2])}))
    coll.commit_version(counts={"images": len(rows), "captions": 0, "failures": 0, "shards": k + 1}, complete=True)
    build_index(coll.path, "Flat")
    return Collection.open(path)


def _vocab_file(tmp_path) -> str:
    path = tmp_path / "vocab.txt"
    path.write_text("# my tags\n" + "\n".join(TAGS[:2]) + "\ncar: automobile, cars\n" + "\n".join(TAGS[3:]) + "\n")
    return str(path)


def _tags(path) -> dict[int, tuple[list[str], list[float]]]:
    table = Collection.open(path).read_table(columns=["id", "tags", "tag_scores"]).to_pydict()
    return {i: (t, s) for i, t, s in zip(table["id"], table["tags"], table["tag_scores"])}


def test_vocabulary_files_text_json_and_the_built_in_one(tmp_path):
    vocab = read_vocabulary(_vocab_file(tmp_path))
    assert vocab.tags == tuple(TAGS) and vocab.synonyms[2] == ("automobile", "cars")
    assert vocab.matches(2, "Two CARS parked.") and not vocab.matches(0, "a hotdog stand")
    (tmp_path / "v.json").write_text(json.dumps(["dog", {"tag": "hot dog", "synonyms": ["hotdog"]}]))
    vocab = read_vocabulary(tmp_path / "v.json")
    assert vocab.tags == ("dog", "hot dog") and vocab.matches(1, "A man eats a hot-dog .")
    builtin = read_vocabulary()
    assert builtin.tags == read_vocabulary(BUILTIN_VOCABULARY).tags and len(builtin.tags) >= 200
    assert "dog" in builtin.tags and "puppy" in builtin.synonyms[builtin.tags.index("dog")]


@pytest.mark.parametrize("content, message", [
    ("dog\n", "at least 2"), ("dog\ndog\n", "twice"), ('[{"tags": "x"}]', "each entry"),
    ('{"tag": "x"}', "JSON list"), ("[1, 2", "not valid JSON"), ('[{"tag": "a", "synonyms": "b"}, "c"]', "synonyms"),
])
def test_a_bad_vocabulary_is_a_typed_error(tmp_path, content, message):
    path = tmp_path / ("v.json" if content.lstrip().startswith(("[", "{")) else "v.txt")
    path.write_text(content)
    with pytest.raises(TaggingError, match=message):
        read_vocabulary(path)


def test_tags_are_the_best_prototypes_above_min_score_from_stored_embeddings(tmp_path):
    coll = _collection(tmp_path / "c")
    calls = []
    report = tag_collection(coll, TagConfig(_vocab_file(tmp_path), min_score=0.5, max_tags=2),
                            encoder=FakeEncoder(), progress=lambda d, t, **kw: calls.append((d, t, kw)))
    got = _tags(coll.path)
    assert {i: t for i, (t, _) in got.items()} == {100 + i: expected for i, (_, expected) in enumerate(ROWS)}
    for i, (tags, scores) in got.items():
        assert scores == sorted(scores, reverse=True) and all(s >= 0.5 for s in scores) and len(scores) == len(tags)
    assert got[100][1] == [pytest.approx(1.0, abs=1e-3)]  # the cosine (of the stored fp16 vector)
    assert report.rows == 5 and report.skipped == 0 and report.tagged == sum(1 for _, e in ROWS if e)
    assert report.version == coll.manifest.version and report.top["dog"] == 2
    assert calls[-1] == (3, 3, {"stage": "write"})
    schema = Collection.open(coll.path).read_table(columns=["tags", "tag_scores"]).schema
    assert schema.field("tags").type == pa.list_(pa.string()) and schema.field("tag_scores").type == pa.list_(pa.float32())


def test_only_new_tags_rows_never_tagged_and_keeps_the_others(tmp_path):
    coll = _collection(tmp_path / "c")
    tag_collection(coll, TagConfig(_vocab_file(tmp_path), min_score=0.5, max_tags=1), encoder=FakeEncoder())
    with coll.update() as u:  # a sync adds rows: a shard without the tags column
        u.add(pa.table({"id": pa.array([900], pa.int64()), "path": ["p/new.jpg"],
                        "embedding": embedding_array(_unit("snow")[None])}))
    report = tag_collection(Collection.open(coll.path), TagConfig(_vocab_file(tmp_path), min_score=0.9, max_tags=3,
                                                                  only_new=True), encoder=FakeEncoder())
    assert report.rows == 1 and report.skipped == 5 and report.tagged == 1
    got = _tags(coll.path)
    assert got[900][0] == ["snow"] and got[101][0] == ["beach"] and got[103][0] == []  # kept: not redone at 0.9
    again = tag_collection(Collection.open(coll.path), TagConfig(_vocab_file(tmp_path), min_score=0.5, only_new=True),
                           encoder=FakeEncoder())
    assert again.rows == 0 and again.version is None


def test_tags_filter_facet_and_keyword_search(tmp_path):
    coll = _collection(tmp_path / "c")
    tag_collection(coll, TagConfig(_vocab_file(tmp_path), min_score=0.5, max_tags=2), encoder=FakeEncoder())
    s = Searcher.open(coll.path)
    hits = s.search_vector(_unit("dog"), k=5, where="list_contains(tags, 'dog')")
    assert sorted(h.id for h in hits) == [100, 101] and hits[0].metadata["tags"] == ["dog"]
    hits = s.search_vector(_unit("dog"), k=5, facets=["tags"])
    expected = Counter(t for _, tags in ROWS for t in tags)
    assert hits.facets["tags"] == dict(expected) and list(hits.facets["tags"])[0] == "dog"  # most frequent first
    assert [h.id for h in s.search_text("tree", k=5, mode="keyword")] == [102]
    assert [h.id for h in s.search_text("tags:beach", k=5, mode="keyword")] == [101]
    with pytest.raises(InvalidQueryError, match="single values"):
        s.search_vector(_unit("dog"), k=5, group_by="tags")


def test_http_hits_carry_tags_as_json_lists(tmp_path):
    from fastapi.testclient import TestClient

    from vlsearch.app.serve import create_app

    coll = _collection(tmp_path / "c")
    tag_collection(coll, TagConfig(_vocab_file(tmp_path), min_score=0.5, max_tags=2), encoder=FakeEncoder())
    with TestClient(create_app({"c": Searcher.open(coll.path)})) as http:
        body = http.post("/api/collections/c/search", json={"vector": _unit("dog", "beach").tolist(), "k": 1,
                                                              "facets": ["tags"]}).json()
        hit = body["hits"][0]
        assert hit["metadata"]["tags"] == ["beach", "dog"] and len(hit["metadata"]["tag_scores"]) == 2
        assert {"value": "dog", "count": 2} in body["facets"]["tags"]  # among the relevant set (depth 100)
        info = http.get("/api/collections").json()[0]
        assert "tags" in info["facets"] and "tag_scores" not in info["facets"]  # the page offers tags as a facet


def test_errors_max_tags_uncalibrated_model_and_another_models_encoder(tmp_path):
    coll = _collection(tmp_path / "c")
    with pytest.raises(TaggingError, match="max_tags"):
        tag_collection(coll, TagConfig(min_score=0.5, max_tags=0), encoder=FakeEncoder())
    with pytest.raises(TaggingError, match="no calibrated tag score for fake-tags/None"):
        tag_collection(coll, TagConfig(), encoder=FakeEncoder())

    class Other(FakeEncoder):
        info = ModelInfo("other", None, DIM)

    with pytest.raises(CollectionMismatchError):
        tag_collection(coll, TagConfig(_vocab_file(tmp_path), min_score=0.5), encoder=Other())
    assert Collection.open(coll.path).manifest.version == coll.manifest.version


def test_calibration_picks_the_lowest_score_that_keeps_the_precision():
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    correct = np.array([1, 1, 1, 0, 1, 0], bool)
    assert calibrate_min_score(scores, correct, 1.0, min_kept=1) == 0.7
    assert calibrate_min_score(scores, correct, 0.8, min_kept=1) == 0.5
    assert calibrate_min_score(scores, correct, 0.8, min_kept=6) == 0.9  # never enough kept: the top score


def test_per_tag_thresholds_only_for_tags_seen_often_enough():
    names = ["dog"] * 8 + ["cat"] * 2
    scores = np.array([0.9, 0.85, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.9, 0.1])
    correct = np.array([1, 1, 1, 1, 1, 0, 0, 0, 0, 1], bool)
    assert calibrate_tag_scores(names, scores, correct, 0.85, min_photos=5) == {"dog": 0.6}


def test_calibrated_thresholds_apply_per_tag_without_min_score(tmp_path, monkeypatch):
    import indexing.tagging as tagging

    calibration = tmp_path / "calibration.json"
    calibration.write_text(json.dumps({"fake-tags/None": {"min_score": 0.6, "tag_scores": {"dog": 0.9, "car": 0.1}}}))
    monkeypatch.setattr(tagging, "CALIBRATION_FILE", calibration)
    coll = _collection(tmp_path / "c")
    report = tag_collection(coll, TagConfig(_vocab_file(tmp_path), max_tags=2), encoder=FakeEncoder())
    got = _tags(coll.path)
    assert got[100][0] == ["dog"] and got[101][0] == ["beach"]  # dog at 0.70 is under its own 0.9
    # car (0.64) is the best tag: its own 0.1 applies; tree (0.58), a second tag, needs the model's 0.6 too
    assert got[102][0] == ["car"] and report.calibrated and report.min_score == pytest.approx(0.1)
    tag_collection(coll, TagConfig(_vocab_file(tmp_path), min_score=0.5, max_tags=2), encoder=FakeEncoder())
    assert _tags(coll.path)[101][0] == ["beach", "dog"]  # an explicit min_score applies to every tag


def test_the_built_in_model_has_a_recorded_calibration():
    from vlsearch.models.factory import BUILTIN_WEIGHTS, SMALL_MODEL

    for tag in BUILTIN_WEIGHTS[SMALL_MODEL]:  # every shipped weight of the built-in model is calibrated
        assert 0.0 < calibrated_min_score(ModelInfo(SMALL_MODEL, tag, 384)) < 1.0
    default_tag = next(iter(BUILTIN_WEIGHTS[SMALL_MODEL]))
    entry = read_calibration()[f"{SMALL_MODEL}/{default_tag}"]
    assert "flickr8k-train" in entry["calibrated_on"] and entry["vocabulary"] == "everyday"
    vocab = read_vocabulary()
    assert entry["tag_scores"] and set(entry["tag_scores"]) <= set(vocab.tags)


def test_cli_tag_loads_the_collections_model(tmp_path, tiny_encoder, tiny_checkpoint):
    from indexing.embed import embed
    from indexing.shards import EmbedConfig
    from PIL import Image

    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(src / f"{i}.png")
    coll = embed(src, tmp_path / "c", EmbedConfig(model="vlsearch-tiny", pretrained=str(tiny_checkpoint), workers=0,
                                                  device="cpu"), encoder=tiny_encoder)
    runner = CliRunner()
    result = runner.invoke(app, ["tag", str(coll.path), "--vocabulary", _vocab_file(tmp_path), "--max-tags", "2"])
    assert result.exit_code == 1 and "no calibrated tag score" in result.output
    result = runner.invoke(app, ["tag", str(coll.path), "--vocabulary", _vocab_file(tmp_path),
                                 "--min-score", "-1", "--max-tags", "2"])
    assert result.exit_code == 0, result.output
    assert "3 photos tagged, 3 with a tag (0 skipped)" in result.output
    assert all(len(t) == 2 and set(t) <= set(TAGS) for t, _ in _tags(coll.path).values())
    result = runner.invoke(app, ["tag", str(coll.path), "--min-score", "-1", "--only-new"])
    assert result.exit_code == 0 and "0 photos tagged, 0 with a tag (3 skipped)" in result.output, result.output


def test_vocabulary_class_rejects_a_single_string_entry_list():
    with pytest.raises(TaggingError):
        Vocabulary.of(["only"])
