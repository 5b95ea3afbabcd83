"""`vlsearch serve`: the HTTP API over real (tiny-model) collections of all three source kinds,
its safety rules (binding, tokens, CORS, upload limits, malformed input, path traversal), the
Python client, concurrency and metrics."""

from __future__ import annotations

import base64
import errno
import io
import json
import os
import random
import shutil
import struct
import subprocess
import sys
import tarfile
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from process_support import wait_for_line
from serve_support import N_IMAGES, make_collections

from vlsearch import Client
from vlsearch.app.serve import ServeConfig, background_server, create_app
from vlsearch.store.collection import Collection
from vlsearch.core.errors import CollectionNotFoundError, InvalidQueryError, ItemNotFoundError, ServeConfigError
from vlsearch.query.searcher import Searcher

TOKEN = "test-token-0123456789abcdef"


@pytest.fixture(scope="module")
def colls(tmp_path_factory, tiny_encoder) -> dict[str, Path]:
    return make_collections(tmp_path_factory.mktemp("serve"), tiny_encoder)


@pytest.fixture(scope="module")
def app(colls):
    return create_app({name: str(path) for name, path in colls.items()}, ServeConfig(log_level="warning"))


@pytest.fixture(scope="module")
def http(app):
    with TestClient(app) as client:
        yield client


@pytest.fixture(scope="module")
def searchers(colls, tiny_encoder) -> dict[str, Searcher]:
    return {name: Searcher.open(path, encoder=tiny_encoder, device="cpu") for name, path in colls.items()}


@pytest.fixture(scope="module")
def live(app):
    with background_server(app) as url:
        yield url


def _ids(hits) -> list[int]:
    return [int(h["id"]) if isinstance(h, dict) else h.id for h in hits]


def _search(http, name="folder", **body):
    return http.post(f"/api/collections/{name}/search", json=body)


def _png(size=(32, 32), color=(200, 30, 30)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, format="PNG")
    return out.getvalue()


# ---- listing, search, pagination -------------------------------------------------------------

def test_collections_are_listed_with_counts_model_index_and_share_one_model(http, app, colls):
    body = http.get("/api/collections").json()
    by_name = {c["name"]: c for c in body}
    assert set(by_name) == {"folder", "manifest", "tar"}
    assert by_name["folder"]["images"] == Collection.open(colls["folder"]).count() == N_IMAGES
    assert by_name["tar"]["images"] == N_IMAGES // 2
    assert by_name["folder"]["index"]["factory"] == "IVF2,Flat" and by_name["manifest"]["index"]["factory"] == "Flat"
    assert {c["source"] for c in body} == {"folder", "manifest", "webdataset"}
    assert all(c["model"]["name"] == "vlsearch-tiny" and c["filters"] is True for c in body)
    encoders = {id(c.searcher.encoder) for c in app.state.served.values()}
    assert len(encoders) == 1, "collections of the same model must share one loaded model"
    health = http.get("/health").json()
    assert health["status"] == "ok" and health["collections"] == 3
    for c in body:  # the version each serves, and when it was loaded, in both answers
        version = Collection.open(colls[c["name"]]).manifest.version
        assert c["version"] == health["versions"][c["name"]]["version"] == version
        assert c["loaded_at"] == health["versions"][c["name"]]["loaded_at"] and c["loaded_at"].endswith("+00:00")


@pytest.mark.parametrize("exact", [False, True])
def test_text_search_returns_what_the_searcher_returns(http, searchers, exact):
    for name in ("folder", "manifest"):
        started = time.perf_counter()
        body = _search(http, name, text="a large red circle", k=7, exact=exact).json()
        wall_ms = (time.perf_counter() - started) * 1e3
        local = searchers[name].search_text("a large red circle", k=7, exact=exact)
        assert _ids(body["hits"]) == _ids(local)
        assert [h["rank"] for h in body["hits"]] == list(range(1, 8))
        assert np.allclose([h["score"] for h in body["hits"]], [h.score for h in local], atol=1e-5)
        assert [h["caption"] for h in body["hits"]] == [h.caption for h in local]
        assert body["exact"] is exact and body["query"] == "text"
        parts = [body["embed_ms"], body["search_ms"]]
        assert np.isfinite([body["took_ms"], *parts]).all() and min(parts) > 0  # both parts measured
        # the parts lie within the server's whole, and that within the request as the client saw it
        assert sum(parts) <= body["took_ms"] <= wall_ms


def test_reranked_text_search_embeds_the_text_once_and_matches_the_searcher(colls, tiny_encoder, monkeypatch):
    import torch

    from vlsearch.app.serve.service import SearchOptions, open_collections
    from vlsearch.query import embedding, reranking
    from vlsearch.rerank.model import FusionConfig, FusionITM, Reranker, tower_identity

    torch.manual_seed(0)
    rr = Reranker(FusionITM(FusionConfig(text_dim=64, image_dim=128, width=32, heads=2, layers=1, dropout=0.0)),
                  tower_identity(tiny_encoder.info), 0.5)
    s = Searcher.open(colls["folder"], encoder=tiny_encoder, reranker=rr, rerank_features="recompute")
    served = open_collections({"c": s}, ServeConfig())["c"]
    passes = []
    real_encode, real_tokens = tiny_encoder.encode_texts, embedding.text_tokens
    monkeypatch.setattr(tiny_encoder, "encode_texts", lambda texts, *a, **k: passes.append(1) or real_encode(texts))
    for module in (embedding, reranking):
        monkeypatch.setattr(module, "text_tokens", lambda *a, **k: passes.append(1) or real_tokens(*a, **k))
    out = served.search("text", "a large red circle", SearchOptions(k=3, offset=2, rerank=8, exact=True))
    assert len(passes) == 1  # one text-tower call for both the first stage and the re-ranker
    local = s.search_text("a large red circle", k=5, exact=True, rerank=8)[2:]
    assert [(h.id, h.rank, h.score, h.first_stage_score) for h in out.hits] == \
        [(h.id, h.rank, h.score, h.first_stage_score) for h in local]
    assert all(h.first_stage_score is not None for h in out.hits)


def test_pages_concatenate_to_one_long_ranking(http, searchers):
    vec = searchers["manifest"].embed_texts(["a small blue star"])[0].tolist()
    full = _search(http, "manifest", vector=vec, k=12).json()
    pages, offset = [], 0
    while offset is not None and offset < 12:
        page = _search(http, "manifest", vector=vec, k=4, offset=offset).json()
        pages += page["hits"]
        offset = page["next_offset"]
    assert _ids(pages) == _ids(full["hits"]) and [h["rank"] for h in pages] == list(range(1, 13))
    last = _search(http, "manifest", vector=vec, k=30, offset=N_IMAGES - 4).json()  # past the end
    assert len(last["hits"]) == 4 and last["next_offset"] is None and last["hits"][0]["rank"] == N_IMAGES - 3


def test_more_like_this_searches_by_the_stored_vector_without_the_item_itself(http, searchers, colls):
    ids, vecs = Collection.open(colls["manifest"]).read_embeddings()
    item = int(ids[3])
    body = _search(http, "manifest", id=str(item), k=5).json()
    local = searchers["manifest"].search_vector(vecs[3], k=6)
    assert local[0].id == item  # itself first in a plain search...
    assert _ids(body["hits"]) == _ids(local)[1:] and item not in _ids(body["hits"])  # ...left out here
    assert [h["rank"] for h in body["hits"]] == [1, 2, 3, 4, 5]
    assert _ids(_search(http, "manifest", id=item, k=5).json()["hits"]) == _ids(body["hits"])  # int ids too


def test_image_query_by_upload_and_by_base64_match_the_searcher(http, searchers, colls):
    data = (Path(Collection.open(colls["folder"]).manifest.source["path"]) / "000007.jpg").read_bytes()
    local = searchers["folder"].search_image(data, k=5, exact=True)
    upload = http.post("/api/collections/folder/search/image", files={"file": ("q.jpg", data, "image/jpeg")},
                       data={"k": "5", "exact": "true"}).json()
    b64 = _search(http, image_base64=base64.b64encode(data).decode(), k=5, exact=True).json()
    assert _ids(upload["hits"]) == _ids(b64["hits"]) == _ids(local)
    assert upload["query"] == "image" and upload["hits"][0]["path"] == "000007.jpg"


def test_where_filters_pass_through_to_the_searcher(http):
    r = _search(http, text="a circle", where="width > 1000")
    assert r.status_code == 200 and r.json()["hits"] == []
    hits = _search(http, text="a circle", where="width = 64", k=3).json()["hits"]
    assert len(hits) == 3 and all(h["metadata"]["width"] == 64 for h in hits)
    assert _search(http, text="a circle", where="  ").status_code == 200  # blank = no filter
    bad = _search(http, text="a circle", where="read_csv('/etc/passwd')")
    assert bad.status_code == 400 and "read_csv" in bad.json()["error"]


# ---- items and images ---------------------------------------------------------------------------

def _source_bytes(colls, name: str, record: dict) -> bytes:
    source = Collection.open(colls[name]).manifest.source
    if name == "tar":
        with tarfile.open(Path(source["path"]) / "shard-000.tar") as tf:
            return tf.extractfile(f"{record['metadata']['key']}.jpg").read()
    root = Path(source["path"]) if name == "folder" else Path(source["path"]).parent
    return (root / record["path"]).read_bytes()


@pytest.mark.parametrize("name", ["folder", "manifest", "tar"])
def test_items_images_and_cached_thumbnails_for_every_source_kind(http, colls, name):
    hit = _search(http, name, text="a green square", k=1).json()["hits"][0]
    base = f"/api/collections/{name}/items/{hit['id']}"
    record = http.get(base).json()
    assert record["id"] == hit["id"] and record["path"] == hit["path"] and record["metadata"]["width"] == 64
    if name == "manifest":
        assert record["caption"] == hit["caption"] and len(record["captions"]) == 2
    full = http.get(base + "/image")
    assert full.status_code == 200 and full.headers["content-type"] == "image/jpeg"
    assert full.content == _source_bytes(colls, name, record)
    misses = http.app.state.served[name].images.cache.misses
    thumbs = [http.get(base + "/thumbnail", params={"size": 32}) for _ in range(2)]
    assert thumbs[0].content == thumbs[1].content and thumbs[0].headers["content-type"] == "image/jpeg"
    assert max(Image.open(io.BytesIO(thumbs[0].content)).size) <= 32
    assert http.app.state.served[name].images.cache.misses == misses + 1  # the second came from the cache
    big = http.get(base + "/thumbnail", params={"size": 100_000})  # capped by the server, not refused
    assert big.status_code == 200 and max(Image.open(io.BytesIO(big.content)).size) <= 512


def test_thumbnail_cache_is_bounded_in_bytes():
    from vlsearch.core.cache import ByteLRU

    cache = ByteLRU(1000)
    for i in range(50):
        cache.put(i, bytes(300))
        assert cache.nbytes <= 1000
    assert len(cache) == 3 and cache.get(49) is not None and cache.get(0) is None
    cache.put("huge", bytes(5000))  # larger than the whole cache: not kept
    assert cache.get("huge") is None and cache.nbytes <= 1000


# ---- bad requests ----------------------------------------------------------------------------------

BAD_BODIES = [
    ({"text": "x", "k": 0}, 422, "k"),
    ({"text": "x", "k": 10**9}, 422, "k"),
    ({"text": "x", "k": "ten"}, 422, "k"),
    ({"text": "x", "k": 1.5}, 422, "k"),
    ({"text": "x", "offset": -1}, 422, "offset"),
    ({"text": "x", "k": 900, "offset": 900}, 422, "k + offset"),
    ({"text": "x", "nprobe": 0}, 422, "nprobe"),
    ({"text": "x", "k_factor": 0.5}, 422, "k_factor"),
    ({"text": "x", "exact": "maybe"}, 422, "exact"),
    ({"text": "   "}, 422, "blank"),
    ({"vector": [0.1, 0.2, 0.3]}, 400, "dimension"),
    ({"vector": ["a", "b"]}, 422, "vector"),
    ({"vector": [0.0] * 64}, 400, "non-zero"),
    ({"text": "x", "vector": [1.0]}, 422, "exactly one"),
    ({}, 422, "exactly one"),
    ({"text": "x", "bogus": 1}, 422, "bogus"),
    ({"id": "12abc"}, 422, "id"),
    ({"id": -5}, 422, "id"),
    ({"id": "123"}, 404, "no item 123"),
    ({"image_base64": "!!!not base64!!!"}, 400, "base64"),
]


@pytest.mark.parametrize("body,status,words", BAD_BODIES)
def test_bad_parameters_get_a_4xx_with_a_message(http, body, status, words):
    r = _search(http, **body)
    assert r.status_code == status, r.text
    assert words in r.json()["error"]


def test_unknown_collections_ids_and_routes_are_404(http):
    assert _search(http, "nope", text="x").status_code == 404
    assert "folder, manifest, tar" in _search(http, "nope", text="x").json()["error"]
    for path in ("/api/collections/folder/items/42", "/api/collections/folder/items/42/image",
                 "/api/collections/folder/items/42/thumbnail", "/api/collections/nope/items/1", "/api/nothing"):
        r = http.get(path)
        assert r.status_code == 404 and r.json()["error"], path
    assert http.get("/api/collections/folder/items/abc").status_code == 400


def test_exact_false_on_a_collection_without_index_is_a_409(tmp_path, colls, tiny_encoder):
    path = tmp_path / "noindex"
    shutil.copytree(colls["manifest"], path)
    coll = Collection.open(path)
    coll.update_manifest(index=None)
    with TestClient(create_app({"n": Searcher.open(path, encoder=tiny_encoder)})) as client:
        r = _search(client, "n", text="x")
        assert r.status_code == 409 and "exact" in r.json()["error"]
        assert _search(client, "n", text="x", exact=True).status_code == 200


# ---- uploads ------------------------------------------------------------------------------------------

def _bomb_png(width=100_000, height=100_000) -> bytes:
    """A valid 1x1 PNG whose header claims width x height pixels."""
    data = bytearray(_png((1, 1)))
    ihdr = 8 + 8  # signature, then length + type of the IHDR chunk
    data[ihdr:ihdr + 8] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[12:ihdr + 13])) & 0xFFFFFFFF
    data[ihdr + 13:ihdr + 17] = struct.pack(">I", crc)
    return bytes(data)


def test_upload_limits_and_bad_images(colls, tiny_encoder):
    config = ServeConfig(max_upload_bytes=50_000)
    s = Searcher.open(colls["folder"], encoder=tiny_encoder)
    with TestClient(create_app({"c": s}, config)) as client:
        url = "/api/collections/c/search/image"
        big = os.urandom(60_000)
        r = client.post(url, files={"file": ("big.jpg", big, "image/jpeg")})
        assert r.status_code == 413 and "50000" in r.json()["error"]
        r = client.post(url, files={"file": ("huge.jpg", os.urandom(200_000), "image/jpeg")})  # body over the cap
        assert r.status_code == 413
        r = _search(client, "c", image_base64=base64.b64encode(big).decode())
        assert r.status_code == 413

        def chunks():  # no Content-Length: counted while read
            for _ in range(20):
                yield os.urandom(10_000)

        r = client.post(url, content=chunks(), headers={"Content-Type": "multipart/form-data; boundary=x"})
        assert r.status_code == 413
        jpeg = io.BytesIO()
        Image.new("RGB", (64, 64), (10, 200, 10)).save(jpeg, format="JPEG")
        cases = {"text.txt": b"hello, I am not an image", "truncated.jpg": jpeg.getvalue()[:300],
                 "bomb.png": _bomb_png(), "empty.png": b""}
        for name, data in cases.items():
            r = client.post(url, files={"file": (name, data, "application/octet-stream")})
            assert 400 <= r.status_code < 500 and r.json()["error"], name
        assert "bomb" in client.post(url, files={"file": ("b.png", _bomb_png())}).json()["error"]
        assert client.post(url, files={"file": ("ok.jpg", jpeg.getvalue())}).status_code == 200
        assert client.get("/health").status_code == 200


def test_fuzz_malformed_bodies_all_get_4xx_and_the_server_stays_healthy(http):
    rng = random.Random(1234)
    values = [None, True, -1, 0, 2**70, 1e308, float("nan"), "", "x" * 5000, [], {}, [1, "a"], {"a": []}, "1e3"]
    keys = ["text", "vector", "image_base64", "id", "k", "offset", "nprobe", "k_factor", "exact", "where", "zzz"]
    sent = 0
    for i in range(240):
        kind = i % 4
        headers = {"Content-Type": "application/json"}
        if kind == 0:  # random bytes
            content = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 300)))
        elif kind == 1:  # well-formed JSON of wrong types and values
            body = {rng.choice(keys): rng.choice(values) for _ in range(rng.randint(0, 5))}
            content = json.dumps(body).encode()
        elif kind == 2:  # truncated JSON
            content = json.dumps({"text": "a dog", "k": 5, "vector": [0.5] * 8})[: rng.randint(1, 40)].encode()
        else:  # broken multipart to the upload endpoint
            headers = {"Content-Type": rng.choice(["multipart/form-data; boundary=zz", "multipart/form-data",
                                                   "text/plain", "image/png"])}
            content = b"--zz\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\n" + os.urandom(rng.randint(0, 200))
        path = "/api/collections/manifest/search" + ("/image" if kind == 3 else "")
        r = http.post(path, content=content, headers=headers)
        assert 400 <= r.status_code < 500, (i, content[:80], r.status_code, r.text[:200])
        assert "error" in r.json()
        sent += 1
    assert sent >= 200
    assert http.get("/health").json()["status"] == "ok"
    assert _search(http, "manifest", text="a red circle", k=3).status_code == 200


# ---- path traversal ---------------------------------------------------------------------------------

def test_requests_cannot_name_a_path(http):
    secret = Path(__file__).resolve()  # any file outside the collections
    for path in ("/api/collections/folder/items/..%2F..%2Fetc%2Fpasswd/image",
                 "/api/collections/folder/items/%2Fetc%2Fpasswd/image",
                 f"/api/collections/folder/items/{secret}/image",
                 "/api/collections/..%2F..%2F/items/1/image",
                 "/api/collections/folder/items/1/../../../../etc/passwd",
                 "/static/../../../../etc/passwd", "/static/..%2F..%2F..%2Fpyproject.toml",
                 "/static/%2e%2e/%2e%2e/%2e%2e/pyproject.toml", "/static//etc/passwd"):
        r = http.get(path)
        assert 400 <= r.status_code < 500, path
        assert b"root:" not in r.content and b"[project]" not in r.content and b"pytest" not in r.content


def test_items_whose_files_lie_outside_the_source_root_are_never_served(tmp_path, tiny_encoder):
    from indexing.embed import EmbedConfig, embed

    outside = tmp_path / "outside"
    outside.mkdir()
    secret_jpg = outside / "secret.jpg"
    Image.new("RGB", (48, 48), (1, 2, 3)).save(secret_jpg)
    (outside / "secret.txt").write_text("TOP SECRET")
    src = tmp_path / "src"
    src.mkdir()
    for i in range(4):
        Image.new("RGB", (48, 48), (60 * i, 20, 20)).save(src / f"ok-{i}.jpg")
    os.symlink(secret_jpg, src / "link.jpg")  # indexed through a symlink that leaves the root
    config = EmbedConfig(model=tiny_encoder.info.name, workers=0, device="cpu", shard_size=100)
    coll = embed(src, tmp_path / "coll", config, encoder=tiny_encoder)
    shard = coll.shard_paths()[0]
    table = pq.read_table(shard)
    paths = table.column("path").to_pylist()
    assert "link.jpg" in paths
    # A tampered shard: rows that point up and out, absolutely, and at a non-image inside the root.
    (src / "notes.jpg").write_text("not an image")
    tampered = paths[:]
    tampered[0], tampered[1], tampered[2] = "../outside/secret.jpg", str(secret_jpg), "notes.jpg"
    pq.write_table(table.set_column(table.schema.get_field_index("path"), "path", pa.array(tampered)), shard)
    ids = table.column("id").to_pylist()
    with TestClient(create_app({"c": Searcher.open(coll.path, encoder=tiny_encoder)})) as client:
        secret_bytes = secret_jpg.read_bytes()
        for item_id, path in zip(ids, tampered):
            for what in ("image", "thumbnail"):
                r = client.get(f"/api/collections/c/items/{item_id}/{what}")
                if path.startswith("ok-"):
                    assert r.status_code == 200
                else:
                    assert r.status_code == 404, (path, what)
                    assert r.content != secret_bytes and b"TOP SECRET" not in r.content
        os.unlink(src / "ok-3.jpg")  # a file replaced by a symlink after indexing
        os.symlink(outside / "secret.txt", src / "ok-3.jpg")
        i = tampered.index("ok-3.jpg")
        r = client.get(f"/api/collections/c/items/{ids[i]}/image")
        assert r.status_code == 404 and b"TOP SECRET" not in r.content


# ---- binding, tokens, CORS --------------------------------------------------------------------------

def test_binding_rules():
    assert ServeConfig().host == "127.0.0.1"
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.5"):
        ServeConfig(host=host)
    with pytest.raises(ServeConfigError, match="--token.*--no-auth"):
        ServeConfig(host="0.0.0.0")
    with pytest.raises(ServeConfigError, match="--token.*--no-auth"):
        ServeConfig(host="192.168.1.20")
    ServeConfig(host="0.0.0.0", token=TOKEN)
    ServeConfig(host="0.0.0.0", no_auth=True)
    with pytest.raises(ServeConfigError, match="at least 16"):
        ServeConfig(host="0.0.0.0", token="short")
    with pytest.raises(ServeConfigError, match="not both"):
        ServeConfig(host="0.0.0.0", token=TOKEN, no_auth=True)


def test_cli_refuses_an_exposed_address_without_token(colls):
    from typer.testing import CliRunner

    from vlsearch.app.cli import app as cli

    result = CliRunner().invoke(cli, ["serve", str(colls["manifest"]), "--host", "0.0.0.0"])
    assert result.exit_code == 1
    assert "--token" in result.output and "--no-auth" in result.output


def test_token_is_required_on_every_api_call(colls, tiny_encoder):
    s = Searcher.open(colls["manifest"], encoder=tiny_encoder)
    with TestClient(create_app({"c": s}, ServeConfig(token=TOKEN))) as client:
        calls = [("GET", "/api/collections"), ("POST", "/api/collections/c/search"), ("GET", "/metrics"),
                 ("GET", "/api/collections/c/items/1/thumbnail")]
        for headers in ({}, {"Authorization": "Bearer wrong-token-0123456789abc"}, {"Authorization": TOKEN},
                        {"Authorization": f"Basic {TOKEN}"}):
            for method, path in calls:
                r = client.request(method, path, headers=headers, json={"text": "x"})
                assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", (headers, path)
                assert r.json() == {"error": "missing or wrong bearer token (send `Authorization: Bearer TOKEN`)",
                                    "type": "RemoteError"}
        for good in ({"Authorization": f"Bearer {TOKEN}"}, {"Authorization": f"bearer  {TOKEN} "}):
            assert client.get("/api/collections", headers=good).status_code == 200
            assert client.post("/api/collections/c/search", headers=good, json={"text": "x"}).status_code == 200
            assert client.get("/metrics", headers=good).status_code == 200
        assert client.get("/health").status_code == 200 and client.get("/").status_code == 200


def test_openapi_declares_the_bearer_scheme_on_protected_routes(http):
    """/docs' "Authorize" button: the schema names an HTTP bearer scheme on every route that checks the token."""
    schema = http.get("/openapi.json").json()
    schemes = schema["components"]["securitySchemes"]
    assert [(s["type"], s["scheme"]) for s in schemes.values()] == [("http", "bearer")]
    (name,) = schemes
    operations = {(method, path): op for path, ops in schema["paths"].items() for method, op in ops.items()}
    protected = {key for key in operations if key[1].startswith("/api/") or key[1] == "/metrics"}
    assert ("post", "/api/collections/{name}/search") in protected and ("get", "/metrics") in protected
    for key in protected:
        assert operations[key]["security"] == [{name: []}], key
    assert "security" not in operations[("get", "/health")]


def test_no_cors_unless_asked(colls, tiny_encoder):
    s = Searcher.open(colls["manifest"], encoder=tiny_encoder)
    origin = {"Origin": "https://evil.example"}
    with TestClient(create_app({"c": s})) as client:
        r = client.get("/api/collections", headers=origin)
        assert "access-control-allow-origin" not in r.headers
        pre = client.options("/api/collections/c/search", headers={**origin, "Access-Control-Request-Method": "POST"})
        assert "access-control-allow-origin" not in pre.headers
    with TestClient(create_app({"c": s}, ServeConfig(cors_origins=("https://app.example",)))) as client:
        ok = client.get("/api/collections", headers={"Origin": "https://app.example"})
        assert ok.headers["access-control-allow-origin"] == "https://app.example"
        assert "access-control-allow-origin" not in client.get("/api/collections", headers=origin).headers


# ---- the Python client, a real server, concurrency -------------------------------------------------

def test_client_has_the_searchers_calls_and_returns_the_same_hits(live, searchers, colls):
    s = searchers["manifest"]
    with Client(live, collection="manifest") as c:
        assert [x["name"] for x in c.collections()] == ["folder", "manifest", "tar"]
        for remote, local in [
            (c.search_text("a red circle", k=5), s.search_text("a red circle", k=5)),
            (c.search_text("a red circle", k=5, exact=True), s.search_text("a red circle", k=5, exact=True)),
            (c.search_vector(s.embed_texts(["a star"])[0], k=4), s.search_vector(s.embed_texts(["a star"])[0], k=4)),
        ]:
            assert [(h.id, h.rank, h.path, h.caption, h.metadata) for h in remote] == \
                   [(h.id, h.rank, h.path, h.caption, h.metadata) for h in local]
            assert np.allclose([h.score for h in remote], [h.score for h in local], atol=1e-5)
        batch = c.search_text(["a red circle", "a blue square"], k=3)
        assert [_ids(b) for b in batch] == [_ids(b) for b in s.search_text(["a red circle", "a blue square"], k=3)]
        vecs = s.embed_texts(["a red circle", "a blue square"])
        assert [_ids(b) for b in c.search_vector(vecs, k=3)] == [_ids(b) for b in s.search_vector(vecs, k=3)]
        image = Path(Collection.open(colls["manifest"]).manifest.source["path"]).parent / "images" / "000003.jpg"
        assert _ids(c.search_image(image, k=3)) == _ids(s.search_image(image, k=3))
        assert _ids(c.search_image(Image.open(image), k=3)) == _ids(s.search_image(Image.open(image), k=3))
        first = c.search_text("a red circle", k=1)[0]
        assert c.item(first.id)["path"] == first.path and c.thumbnail(first.id, 32)[:2] == b"\xff\xd8"
        assert first.id not in _ids(c.more_like_this(first.id, k=5))
        with pytest.raises(InvalidQueryError, match="dimension"):
            c.search_vector(np.ones(3), k=3)
        with pytest.raises(ItemNotFoundError):
            c.item(12345)
    with pytest.raises(InvalidQueryError, match="choose one"):
        Client(live).search_text("x")
    with pytest.raises(CollectionNotFoundError):
        Client(live, collection="nope").search_text("x")


def test_concurrent_requests_return_what_serial_requests_return(live, searchers):
    texts = ["a red circle", "a small blue star", "a green square at the bottom", "a yellow triangle", "a cross"]
    vecs = searchers["folder"].embed_texts(texts)
    jobs = [("text", t, name) for t in texts for name in ("folder", "manifest")]
    jobs += [("vector", v, "folder") for v in vecs] + [("exact", v, "manifest") for v in vecs]
    clients = {name: Client(live, collection=name) for name in ("folder", "manifest")}

    def run(job):
        kind, query, name = job
        c = clients[name]
        if kind == "text":
            hits = c.search_text(query, k=8)
        else:
            hits = c.search_vector(query, k=8, exact=kind == "exact")
        return [(h.id, round(h.score, 5)) for h in hits]

    serial = [run(j) for j in jobs]
    with ThreadPoolExecutor(16) as pool:
        for _ in range(3):
            assert list(pool.map(run, jobs * 2)) == serial * 2


def test_metrics_count_requests_latency_and_errors(http):
    _search(http, "manifest", text="a red circle", k=2)
    _search(http, "manifest", text="x", k=0)
    text = http.get("/metrics").text
    assert 'vlsearch_requests_total{method="POST",route="/api/collections/{name}/search",status="200"}' in text
    assert 'vlsearch_errors_total{route="/api/collections/{name}/search",status="422"}' in text
    assert 'vlsearch_request_seconds_bucket{le="0.1",route="/api/collections/{name}/search"}' in text
    assert "vlsearch_thumbnail_cache_bytes" in text


def test_docs_page_and_openapi(http):
    docs = http.get("/docs")
    assert docs.status_code == 200 and "cdn." not in docs.text  # served locally: works offline
    assert "/docs-static/swagger-ui-bundle.js" in docs.text
    bundle = http.get("/docs-static/swagger-ui-bundle.js")
    assert bundle.status_code == 200 and "SwaggerUIBundle" in bundle.text
    spec = http.get("/openapi.json").json()
    assert "/api/collections/{name}/search" in spec["paths"] and "/api/collections/{name}/search/image" in spec["paths"]
    page = http.get("/")
    assert page.status_code == 200 and "<title>vlsearch</title>" in page.text
    assert http.get("/static/app.js").status_code == 200


def test_vlsearch_serve_command_serves_until_stopped(colls):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-m", "vlsearch.app.cli", "serve", f"shapes={colls['manifest']}",
                             str(colls["tar"]), "--port", "0"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, bufsize=0)
    try:
        # Port 0: the server binds a free port itself and logs it once it accepts requests (no port
        # picked here and bound there later). A failed start fails here, with the server's output.
        started = wait_for_line(proc, r"Uvicorn running on http://127\.0\.0\.1:(\d+)", timeout=300)
        with Client(f"http://127.0.0.1:{started.group(1)}", collection="shapes", timeout=60) as c:
            names = [x["name"] for x in c.collections()]
            hits = c.search_text("a red circle", k=3)
        assert names == ["shapes", "coll-tar"] and len(hits) == 3
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_background_server_reports_a_taken_port_at_once(app, live):
    taken = int(live.rsplit(":", 1)[1])
    with pytest.raises(OSError) as info:  # the bind's own error, before any server thread starts
        with background_server(app, port=taken):
            pass
    assert info.value.errno == errno.EADDRINUSE
