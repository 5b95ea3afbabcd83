"""Keyword (BM25, tantivy) and hybrid search: what is indexed, query syntax, deletes, syncs, versions,
kill -9 mid-sync, ``where`` in every mode, the fusion, and the surfaces (CLI, HTTP)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pytest
from PIL import Image
from typer.testing import CliRunner

from conftest import kill_9_when
from indexing.build import build_index
from indexing.embed import EmbedConfig, embed
from vlsearch.app.cli import app
from vlsearch.core.errors import IndexNotBuiltError, InvalidQueryError
from vlsearch.models.factory import TINY_MODEL
from vlsearch.query import hybrid
from vlsearch.query.searcher import Searcher
from vlsearch.store.collection import Collection
from vlsearch.store.keyword import keyword_path
from vlsearch.store.lease import lease_path

HELPER = Path(__file__).resolve().parent / "_sync_crash.py"

ROWS = [("beach/dog_01.jpg", "a brown dog runs on the sand", "alpha"),
        ("beach/kite.jpg", "children fly a red kite", "beta"),
        ("city/taxi.jpg", "a yellow cab in traffic", "alpha"),
        ("city/night.jpg", "neon lights at night", "gamma"),
        ("forest/owl.jpg", "an owl sits on a branch", "beta"),
        ("forest/deer.jpg", "a deer near the red car", "gamma"),
        ("home/cat.jpg", "a cat sleeping on a red sofa", "alpha"),
        ("home/dog_02.jpg", "the dog sleeps by the fire", "delta")]


def _source(root: Path, rows=ROWS) -> Path:
    for i, (path, _, _) in enumerate(rows):
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        if not (root / path).exists():
            Image.fromarray(np.random.default_rng(i).integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(root / path)
    pcsv.write_csv(pa.table({"image": [r[0] for r in rows], "caption": [r[1] for r in rows],
                             "site": [r[2] for r in rows]}), root / "captions.csv")
    return root / "captions.csv"


def _config(**kw) -> EmbedConfig:
    return EmbedConfig(**{"model": TINY_MODEL, "workers": 0, "batch_size": 4, "shard_size": 3, "device": "cpu", **kw})


@pytest.fixture
def coll(tmp_path, tiny_encoder) -> Collection:
    c = embed(_source(tmp_path / "src"), tmp_path / "c", _config(), encoder=tiny_encoder)
    build_index(c.path, "Flat")
    return Collection.open(c.path)


def _paths(hits) -> list[str]:
    return [h.path for h in hits]


def _kw(s: Searcher, q: str, k: int = 10, **kw) -> list[str]:
    return _paths(s.search_text(q, k=k, mode="keyword", **kw))


def test_keyword_finds_captions_file_names_folders_and_metadata_with_phrases_and_prefixes(coll, tiny_encoder):
    s = Searcher.open(coll.path, encoder=tiny_encoder)
    assert _kw(s, "kite") == ["beach/kite.jpg"]  # a caption word
    assert _kw(s, "dogs")[:2] == ["beach/dog_01.jpg", "home/dog_02.jpg"]  # stemmed
    assert _kw(s, "taxi") == ["city/taxi.jpg"]  # a file name (the caption says "cab")
    assert set(_kw(s, "forest")) == {"forest/owl.jpg", "forest/deer.jpg"}  # a folder word
    assert _kw(s, "delta") == ["home/dog_02.jpg"]  # a metadata value
    assert set(_kw(s, "site:gamma")) == {"city/night.jpg", "forest/deer.jpg"}  # a metadata field prefix
    assert set(_kw(s, "red")) == {"beach/kite.jpg", "forest/deer.jpg", "home/cat.jpg"}
    assert _kw(s, '"red car"') == ["forest/deer.jpg"]  # a phrase
    assert set(_kw(s, "path:beach")) == {"beach/dog_01.jpg", "beach/kite.jpg"}
    assert _kw(s, "caption:beach") == []  # the word is in paths only
    assert _kw(s, "zeppelin") == []
    hits = s.search_text("red", k=2, mode="keyword")
    assert len(hits) == 2 and hits[0].score >= hits[1].score > 0 and [h.rank for h in hits] == [1, 2]
    assert s.search_text("kite", mode="keyword")[0].caption == "children fly a red kite"


@pytest.mark.parametrize("bad", ['"unclosed phrase', "nofield:x", "(kite", "path:"])
def test_bad_keyword_syntax_is_a_typed_error_naming_the_problem(coll, bad):
    s = Searcher.open(coll.path)
    with pytest.raises(InvalidQueryError, match="bad keyword query"):
        s.search_text(bad, mode="keyword")
    with pytest.raises(InvalidQueryError):
        s.search_text("kite", mode="semantic")
    with pytest.raises(InvalidQueryError, match="alpha"):
        s.search_text("kite", mode="hybrid", alpha=1.5)


def test_deleted_rows_never_come_back_in_keyword_or_hybrid_mode(coll, tiny_encoder):
    ids = {h.path: h.id for h in Searcher.open(coll.path, encoder=tiny_encoder).search_text("red", mode="keyword")}
    coll.remove([ids["beach/kite.jpg"]])
    s = Searcher.open(coll.path, encoder=tiny_encoder)
    assert _kw(s, "kite") == []
    assert set(_kw(s, "red")) == {"forest/deer.jpg", "home/cat.jpg"}
    for alpha in (None, 0.0, 0.5):
        hits = s.search_text("red kite", k=20, mode="hybrid", alpha=alpha)
        assert "beach/kite.jpg" not in _paths(hits) and len(hits) == 7


def test_where_applies_to_every_mode(coll, tiny_encoder):
    s = Searcher.open(coll.path, encoder=tiny_encoder)
    assert _kw(s, "red", where="site = 'alpha'") == ["home/cat.jpg"]
    for mode in ("vector", "keyword", "hybrid"):
        hits = s.search_text("red dog", k=10, mode=mode, where="site IN ('alpha', 'delta')")
        assert hits and {h.metadata["site"] for h in hits} <= {"alpha", "delta"}
    assert len(s.search_text("red dog", k=10, mode="hybrid", where="site = 'alpha'")) == 3


def test_hybrid_fuses_by_reciprocal_rank_or_by_weighted_normalised_scores(coll, tiny_encoder):
    scores, ids = hybrid.rrf([np.array([1, 2, 3, -1]), np.array([3, 4, 1])], k=10, rrf_k=60)
    assert ids.tolist() == [1, 3, 2, 4]  # 1: 1/61 + 1/63; 3: 1/63 + 1/61 (tie, by id); 2: 1/62; 4: 1/62
    assert np.allclose(scores, [1 / 61 + 1 / 63, 1 / 63 + 1 / 61, 1 / 62, 1 / 62])
    vec = (np.array([0.9, 0.5, 0.1]), np.array([1, 2, 3]))
    kw = (np.array([8.0, 4.0]), np.array([3, 2]))
    _, ids = hybrid.weighted(vec, kw, alpha=1.0, k=3)
    assert ids.tolist() == [1, 2, 3]
    scores, ids = hybrid.weighted(vec, kw, alpha=0.5, k=3)
    assert ids.tolist() == [1, 3, 2] and np.allclose(scores, [0.5, 0.5, 0.25])  # a tie: by id
    s = Searcher.open(coll.path, encoder=tiny_encoder)
    vector = s.search_text("kite", k=20)
    fused = s.search_text("kite", k=20, mode="hybrid")
    expected = {}
    for rank, h in enumerate(vector, 1):
        expected[h.id] = 1 / (60 + rank)
    expected[_kw_ids(s, "kite")[0]] += 1 / 61
    assert [h.id for h in fused] == sorted(expected, key=lambda i: (-expected[i], i))
    assert fused[0].path == "beach/kite.jpg" and fused[0].score == pytest.approx(expected[fused[0].id])


def _kw_ids(s: Searcher, q: str) -> list[int]:
    return [h.id for h in s.search_text(q, mode="keyword")]


def test_keyword_mode_needs_no_model(coll, monkeypatch):
    import vlsearch.models.factory as factory

    monkeypatch.setattr(factory, "load_model", lambda *a, **k: pytest.fail("keyword mode loaded the model"))
    assert _kw(Searcher.open(coll.path), "owl") == ["forest/owl.jpg"]


def test_sync_adds_and_deletes_follow_and_a_leased_old_version_still_searches_after_compact(
        tmp_path, coll, tiny_encoder):
    old = Searcher.open(coll.path, encoder=tiny_encoder)  # leases this version
    rows = [r for r in ROWS if r[0] != "beach/kite.jpg"] + [("sea/boat.jpg", "a sailing boat at sunset", "omega")]
    embed(_source(tmp_path / "src", rows), coll.path, _config(), encoder=tiny_encoder)  # a sync
    new = Searcher.open(coll.path, encoder=tiny_encoder)
    assert new.version > old.version
    assert _kw(new, "kite") == [] and _kw(new, "boat") == ["sea/boat.jpg"] and _kw(new, "omega") == ["sea/boat.jpg"]
    Collection.open(coll.path).compact()  # rewrites the shard that held the deleted row
    assert _kw(old, "kite") == ["beach/kite.jpg"] and _kw(old, "boat") == []  # the old version, whole
    latest = Searcher.open(coll.path, encoder=tiny_encoder)
    assert _kw(latest, "kite") == [] and _kw(latest, "boat") == ["sea/boat.jpg"]
    assert len(latest.search_text("red", k=20, mode="hybrid")) == 8
    old.close(), new.close()
    Collection.open(coll.path).compact()  # GC now removes the old version's keyword indexes
    live = set(Collection.open(coll.path).shard_numbers())
    assert {int(p.name[5:]) for p in (coll.path / "keyword").iterdir()} == live


def test_collections_without_keyword_files_build_them_on_demand(coll):
    shutil.rmtree(coll.path / "keyword")
    with pytest.raises(IndexNotBuiltError, match="keyword-index"):
        Searcher.open(coll.path).search_text("kite", mode="keyword")
    result = CliRunner().invoke(app, ["keyword-index", str(coll.path)])
    assert result.exit_code == 0 and "built for 3 of 3 shards" in result.output, result.output
    assert _kw(Searcher.open(coll.path), "kite") == ["beach/kite.jpg"]
    assert coll.build_keyword_index() == {"shards_built": 0, "shards": 3}


def test_cli_search_modes(coll, tiny_checkpoint):
    runner = CliRunner()
    result = runner.invoke(app, ["search", str(coll.path), "path:forest", "--mode", "keyword", "--json"])
    assert result.exit_code == 0, result.output
    assert "forest/owl.jpg" in result.output and "city" not in result.output
    result = runner.invoke(app, ["search", str(coll.path), '"red', "--mode", "keyword"])
    assert result.exit_code != 0 and "bad keyword query" in result.output
    result = runner.invoke(app, ["search", str(coll.path), "kite", "--mode", "hybrid", "--alpha", "0.3", "-k", "3"])
    assert result.exit_code == 0 and "beach/kite.jpg" in result.output, result.output


def test_http_modes_and_bad_syntax_is_400(coll, tiny_encoder):
    from fastapi.testclient import TestClient

    from vlsearch.app.serve import create_app

    with TestClient(create_app({"c": Searcher.open(coll.path, encoder=tiny_encoder)})) as http:
        body = http.post("/api/collections/c/search", json={"text": "path:city", "mode": "keyword"}).json()
        assert {h["path"] for h in body["hits"]} == {"city/taxi.jpg", "city/night.jpg"}
        body = http.post("/api/collections/c/search", json={"text": "kite", "mode": "hybrid", "k": 3}).json()
        assert body["hits"][0]["path"] == "beach/kite.jpg" and len(body["hits"]) == 3
        bad = http.post("/api/collections/c/search", json={"text": '"kite', "mode": "keyword"})
        assert bad.status_code == 400 and "bad keyword query" in bad.json()["error"]
        bad = http.post("/api/collections/c/search", json={"text": "kite", "mode": "vector", "alpha": 0.5})
        assert bad.status_code in (400, 422)
        bad = http.post("/api/collections/c/search", json={"vector": [0.1] * 8, "mode": "keyword"})
        assert bad.status_code in (400, 422)


@pytest.mark.parametrize("point", ["shard", "versions"])
def test_kill_9_mid_sync_leaves_a_keyword_index_matching_the_version_readers_see(
        tmp_path, tiny_encoder, tiny_checkpoint, point):
    src = _source(tmp_path / "src")
    config = _config(pretrained=str(tiny_checkpoint))
    c = embed(src, tmp_path / "c", config, encoder=tiny_encoder)
    rows = [r for r in ROWS if r[0] != "beach/kite.jpg"] + [("sea/boat.jpg", "a sailing boat at sunset", "omega")]
    _source(tmp_path / "src", rows)
    marker = tmp_path / "reached"
    args = ["embed", str(src), str(c.path), "--model", TINY_MODEL, "--pretrained", str(tiny_checkpoint),
            "--workers", "0", "--device", "cpu", "--shard-size", "3"]
    kill_9_when([sys.executable, str(HELPER), point, str(marker), *args], marker.exists, f"sync step {point}")
    assert any((c.path / "keyword").iterdir())
    s = Searcher.open(c.path)  # the old version: the killed sync's keyword files are not part of it
    assert _kw(s, "kite") == ["beach/kite.jpg"] and _kw(s, "boat") == []
    s.close()
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    s = Searcher.open(c.path)
    assert _kw(s, "kite") == [] and _kw(s, "boat") == ["sea/boat.jpg"]
    final = Collection.open(c.path)
    on_disk = {p for p in (c.path / "keyword").rglob("*")}
    kept = final.referenced_files() | {keyword_path(c.path, n) / ".tantivy-meta.lock" for n in final.shard_numbers()}
    assert on_disk <= kept  # the killed sync's keyword directories are gone
    assert lease_path(c.path, final.manifest.version).exists()


def test_client_search_text_modes(coll, tiny_encoder):
    from vlsearch import Client
    from vlsearch.app.serve import background_server, create_app
    from vlsearch.core.errors import InvalidQueryError as ClientInvalid

    with background_server(create_app({"c": Searcher.open(coll.path, encoder=tiny_encoder)})) as url:
        client = Client(url)
        assert _paths(client.search_text('"red car"', mode="keyword")) == ["forest/deer.jpg"]
        hits = client.search_text("kite", k=3, mode="hybrid", alpha=0.2)
        assert hits[0].path == "beach/kite.jpg" and len(hits) == 3
        with pytest.raises(ClientInvalid, match="bad keyword query"):
            client.search_text("site:(", mode="keyword")


def test_a_refreshed_searcher_keyword_searches_the_new_version(coll, tiny_encoder):
    s = Searcher.open(coll.path, encoder=tiny_encoder)
    kite = s.search_text("kite", mode="keyword")[0].id
    coll.remove([kite])
    assert _kw(s, "kite") == ["beach/kite.jpg"]  # still the version it read
    assert s.refresh() and "keyword" in s._current.__dict__  # warmed like the version it replaced
    assert _kw(s, "kite") == [] and _paths(s.search_text("kite", k=3, mode="hybrid"))[0] != "beach/kite.jpg"


def test_keyword_and_hybrid_lists_take_the_shaping_options(coll, tiny_encoder):
    s = Searcher.open(coll.path, encoder=tiny_encoder)
    shaped = s.search_text("red", k=10, mode="keyword", facets=["folder"], order_by="path DESC")
    assert sorted(shaped.facets["folder"].items()) == [("beach", 1), ("forest", 1), ("home", 1)]
    assert [h.path for h in shaped] == ["home/cat.jpg", "forest/deer.jpg", "beach/kite.jpg"]  # the matches, by path
    grouped = s.search_text("dogs", k=10, mode="hybrid", group_by="folder", per_group=1, exact=True)
    folders = [h.path.split("/")[0] for h in grouped]
    assert len(folders) == len(set(folders))  # at most one hit per folder


def test_the_indexed_metadata_columns_are_configurable_and_syncs_follow_the_choice(coll, tmp_path, tiny_encoder):
    assert _kw(Searcher.open(coll.path), "delta") == ["home/dog_02.jpg"]  # every text column by default
    result = CliRunner().invoke(app, ["keyword-index", str(coll.path), "--columns", ""])  # no metadata column
    assert result.exit_code == 0 and "built for 3 of 3 shards" in result.output, result.output
    s = Searcher.open(coll.path)
    assert _kw(s, "delta") == [] and _kw(s, "kite") == ["beach/kite.jpg"]  # site no longer indexed; captions are
    rows = [*ROWS, ("home/bird.jpg", "a small bird", "delta")]
    embed(_source(tmp_path / "src", rows), coll.path, _config(), encoder=tiny_encoder)  # a sync
    assert _kw(Searcher.open(coll.path), "delta") == []  # the new shard follows the choice
    coll.build_keyword_index(columns=None)
    assert set(_kw(Searcher.open(coll.path), "delta")) == {"home/dog_02.jpg", "home/bird.jpg"}


def test_hybrid_reads_natural_language_leniently_where_keyword_mode_checks_syntax(coll, tiny_encoder):
    s = Searcher.open(coll.path, encoder=tiny_encoder)
    text = 'the "red kite: (children'  # an unclosed phrase, a stray field colon, an open parenthesis
    with pytest.raises(InvalidQueryError, match="bad keyword query"):
        s.search_text(text, mode="keyword")
    hits = s.search_text(text, k=3, mode="hybrid", exact=True)
    assert "beach/kite.jpg" in [h.path for h in hits]  # its words still count
