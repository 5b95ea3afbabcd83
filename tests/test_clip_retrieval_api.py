"""clip-retrieval's back-end API on ``vlsearch serve``: the exact bodies ClipClient 2.45 and
clip-front send (tests/fixtures/clip_retrieval/), answered field by field with the Searcher's
results; ids stable across a sync; double slashes, text/plain bodies, token, CORS, image_url
refused (SSRF) unless allowed; and the real clip-front (tests/fixtures/clip_front/) in Chromium."""

from __future__ import annotations

import base64
import csv
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from indexing.build import build_index
from indexing.embed import EmbedConfig, embed
from vlsearch.app.serve import ServeConfig, background_server, create_app
from vlsearch.app.serve.clip_retrieval import IGNORED_HEADER, api_id, item_ids_of
from vlsearch.app.serve.errors import UploadTooLargeError
from vlsearch.app.serve.url_fetch import UrlFetcher
from vlsearch.data.photo import PHOTO_SCHEMA
from vlsearch.data.shapes import ShapesConfig, generate_shapes
from vlsearch.query.searcher import Searcher
from vlsearch.store.layout import CAPTIONS_DIR

FIXTURES = Path(__file__).parent / "fixtures" / "clip_retrieval"
TOKEN = "a-token-of-sixteen-or-more"
#: Planted copies: identical files under other names (cosine 1 to their original).
COPIES = {0: ["copy-a.jpg", "copy-b.jpg"], 1: ["copy-c.jpg"]}

pytestmark = pytest.mark.usefixtures("one_faiss_thread")


def fixture(name: str, **values: Any) -> dict[str, Any]:
    """A recorded body with its ``"$NAME"`` placeholders filled in."""
    body = json.loads((FIXTURES / name).read_text())
    return {k: values[v[1:].lower()] if isinstance(v, str) and v.startswith("$") else v for k, v in body.items()}


class ClipClient:
    """clip_retrieval/clip_client.py 2.45's ClipClient, the lines ``query`` runs, with ``requests``
    as there (a Modality enum's value is its string)."""

    def __init__(self, url, indice_name, use_mclip=False, aesthetic_score=9, aesthetic_weight=0.5,
                 modality="image", num_images=40, deduplicate=True, use_safety_model=True,
                 use_violence_detector=True):
        self.url = url
        self.indice_name = indice_name
        self.use_mclip = use_mclip
        self.aesthetic_score = aesthetic_score
        self.aesthetic_weight = aesthetic_weight
        self.modality = modality
        self.num_images = num_images
        self.deduplicate = deduplicate
        self.use_safety_model = use_safety_model
        self.use_violence_detector = use_violence_detector
        self.sent: list[str] = []

    def query(self, text=None, image=None, embedding_input=None):
        if text and image:
            raise ValueError("Only one of text or image can be provided.")
        if text:
            return self.__search_knn_api__(text=text)
        elif image:
            if image.startswith("http"):
                return self.__search_knn_api__(image_url=image)
            else:
                assert Path(image).exists(), f"{image} does not exist."
                return self.__search_knn_api__(image=image)
        elif embedding_input:
            return self.__search_knn_api__(embedding_input=embedding_input)
        else:
            raise ValueError("Either text or image must be provided.")

    def __search_knn_api__(self, text=None, image=None, image_url=None, embedding_input=None):
        import requests

        if image:
            with open(image, "rb") as image_file:
                encoded_string = base64.b64encode(image_file.read())
                image = str(encoded_string.decode("utf-8"))
        data = json.dumps({
            "text": text, "image": image, "image_url": image_url, "embedding_input": embedding_input,
            "deduplicate": self.deduplicate, "use_safety_model": self.use_safety_model,
            "use_violence_detector": self.use_violence_detector, "indice_name": self.indice_name,
            "use_mclip": self.use_mclip, "aesthetic_score": self.aesthetic_score,
            "aesthetic_weight": self.aesthetic_weight, "modality": self.modality, "num_images": self.num_images,
            "num_result_ids": self.num_images})
        self.sent.append(data)
        return requests.post(self.url, data=data, timeout=3600).json()


def _make_gallery(root: Path, encoder) -> tuple[Path, Path, list[str]]:
    """Generated shapes with captions and a ``license`` column, three of them copied under other
    names, embedded from a CSV manifest with the tiny model, with a Flat index (exact ranking).
    Returns (collection, manifest, image paths as stored)."""
    import torch

    data = generate_shapes(root / "shapes", ShapesConfig(n_train=0, n_heldout=60, image_format="jpg"))
    split = data.split_dir("heldout")
    with open(split / "captions.csv", newline="") as f:
        rows = [{**r, "license": "CC-BY-4.0"} for r in csv.DictReader(f)]
    images = sorted({r["image"] for r in rows})
    for i, names in COPIES.items():
        for name in names:
            shutil.copy(split / images[i], split / "images" / name)
            rows += [{**r, "image": f"images/{name}"} for r in rows if r["image"] == images[i]]
    manifest = split / "manifest.csv"
    with open(manifest, "w", newline="") as f:
        writer = csv.DictWriter(f, ["image", "caption", "license"])
        writer.writeheader()
        writer.writerows(rows)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        config = EmbedConfig(model=encoder.info.name, workers=0, batch_size=16, shard_size=10, device="cpu")
        path = embed(manifest, root / "gallery", config, encoder=encoder).path
        build_index(path, index_type="Flat")
    finally:
        torch.set_num_threads(threads)
    return path, manifest, images


@pytest.fixture(scope="module")
def small_encoder():
    """vlsearch-small with its built-in weights: unlike the random tiny model, whose embeddings of
    all the shapes are near-copies (cosine > 0.94), it tells the shapes apart."""
    from vlsearch.models.factory import SMALL_MODEL, load_model

    return load_model(SMALL_MODEL, device="cpu")


@pytest.fixture(scope="module")
def gallery(tmp_path_factory, small_encoder):
    root = tmp_path_factory.mktemp("clip-api")
    path, manifest, images = _make_gallery(root, small_encoder)
    with Searcher.open(path, encoder=small_encoder) as searcher:
        app = create_app({"gallery": searcher}, ServeConfig(log_level="warning"))
        with TestClient(app) as http:
            yield {"path": path, "manifest": manifest, "images": images, "searcher": searcher, "app": app,
                   "http": http, "query_image": manifest.parent / images[0]}


def _u(path: str) -> str:
    """A TestClient URL for ``path``: a bare ``//path`` would be read as a host name."""
    return "http://testserver" + path


def _got(results: list[dict]) -> list[tuple[int, float]]:
    return [(r["id"], r["similarity"]) for r in results]


def _same(got: list[dict], hits) -> None:
    assert [r["id"] for r in got] == [api_id(h.id) for h in hits]
    assert [r["similarity"] for r in got] == pytest.approx([h.score for h in hits], abs=1e-5)


# ---- ClipClient ----------------------------------------------------------------------------------

def test_the_client_sends_the_recorded_bodies(gallery):
    emb = [0.5, -0.25]
    recorder, posts = ClipClient("http://127.0.0.1:9/knn-service", "gallery"), []

    import requests

    original = requests.post
    try:
        requests.post = lambda url, data, timeout: posts.append((url, data, timeout)) or _Json([])
        recorder.query(text="a red circle")
        recorder.query(image=str(gallery["query_image"]))
        recorder.query(embedding_input=emb)
        ClipClient("http://127.0.0.1:9/knn-service", "gallery", deduplicate=False).query(text="a red circle")
    finally:
        requests.post = original
    image_b64 = base64.b64encode(gallery["query_image"].read_bytes()).decode()
    assert [json.loads(p[1]) for p in posts] == [
        fixture("clipclient_text.json"), fixture("clipclient_image.json", image_base64=image_b64),
        fixture("clipclient_embedding.json", embedding=emb), fixture("clipclient_text_no_dedup.json")]
    assert [list(json.loads(p[1])) for p in posts[:1]] == [list(fixture("clipclient_text.json"))]  # field order


class _Json:
    def __init__(self, value):
        self.value = value

    def json(self):
        return self.value


@pytest.mark.parametrize("deduplicate", [True, False])
def test_a_clipclient_script_gets_the_searchers_results(gallery, deduplicate):
    s, dedup = gallery["searcher"], 0.94 if deduplicate else None
    vector = s.item_vector(s.search_text("a red circle", k=1)[0].id)
    with background_server(gallery["app"]) as url:
        client = ClipClient(url=url + "/knn-service", indice_name="gallery", deduplicate=deduplicate)
        by_text = client.query(text="a red circle")
        by_image = client.query(image=str(gallery["query_image"]))
        by_vector = client.query(embedding_input=vector.tolist())
    _same(by_text, s.search_text("a red circle", k=40, dedup=dedup))
    _same(by_image, s.search_image(gallery["query_image"], k=40, dedup=dedup))
    _same(by_vector, s.search_vector(vector, k=40, dedup=dedup))
    plain = s.search_image(gallery["query_image"], k=40)
    copies = sum(1 for h in plain[:3] if h.score > 0.999)
    assert copies == 3  # the original and its two planted copies lead the plain list
    assert len(by_image) == (40 if not deduplicate else len(s.search_image(gallery["query_image"], k=40, dedup=0.94)))
    assert sum(1 for r in by_image[:3] if r["similarity"] > 0.999) == (1 if deduplicate else 3)


def test_each_result_carries_id_similarity_and_for_the_first_num_images_the_metadata(gallery):
    body = fixture("clipclient_text.json") | {"num_images": 2, "num_result_ids": 5}
    response = gallery["http"].post("/knn-service", content=json.dumps(body))
    assert response.status_code == 200, response.text
    results = response.json()
    hits = gallery["searcher"].search_text("a red circle", k=5, dedup=0.94)
    _same(results, hits)
    for r, h in zip(results[:2], hits):
        assert set(r) == {"id", "similarity", "caption", "image_path", "license", "width", "height", "image",
                          *PHOTO_SCHEMA.names}  # the photo columns every shard has (null for these PNGs)
        assert r["image_path"] == h.path and r["caption"] == h.caption and r["license"] == "CC-BY-4.0"
        assert (r["width"], r["height"]) == (h.metadata["width"], h.metadata["height"])
        assert base64.b64decode(r["image"])[:3] == b"\xff\xd8\xff"  # a JPEG
        assert isinstance(r["id"], int) and 0 <= r["id"] < 2**53
    assert all(set(r) == {"id", "similarity"} for r in results[2:])


def test_metadata_after_knn_service_returns_the_same_items(gallery):
    http = gallery["http"]
    results = http.post("/knn-service", content=json.dumps(fixture("front_text.json"))).json()
    ids = [r["id"] for r in results]
    hits = gallery["searcher"].search_text("a red circle", k=3000, dedup=0.94)
    assert any(h.id >= 2**53 for h in hits) and max(ids) < 2**53  # hashed ids, folded
    got = http.post("/metadata", content=json.dumps(fixture("front_metadata.json", ids=ids))).json()
    assert [g["id"] for g in got] == ids
    for r, g in zip(results[:40], got):  # the first num_images results carry their metadata
        assert g["metadata"] == {k: v for k, v in r.items() if k not in ("id", "similarity")}
    unknown = http.post("/metadata", json={"ids": [ids[0], 12345], "indice_name": "gallery"}).json()
    assert [g["id"] for g in unknown] == [ids[0]]
    assert http.post("/metadata", json={"ids": [], "indice_name": "gallery"}).json() == []
    as_strings = http.post("/metadata", json={"ids": [str(i) for i in ids[:3]], "indice_name": "gallery"}).json()
    assert as_strings == got[:3]
    for bad in ([-1], [2**53], ["12a"], [1.5], [True]):
        response = http.post("/metadata", json={"ids": bad, "indice_name": "gallery"})
        assert response.status_code == 400 and "ids must be" in response.json()["error"]


# ---- what clip-front sends -----------------------------------------------------------------------

@pytest.mark.parametrize("path", ["/knn-service", "//knn-service"])
def test_front_bodies_are_read_as_text_plain_at_single_and_double_slash_paths(gallery, path):
    http = gallery["http"]
    headers = {"Content-Type": "text/plain;charset=UTF-8"}
    response = http.post(_u(path), content=json.dumps(fixture("front_text.json")), headers=headers)
    assert response.status_code == 200, response.text
    _same(response.json(), gallery["searcher"].search_text("a red circle", k=3000, dedup=0.94))
    assert response.headers[IGNORED_HEADER] == "use_safety_model,use_violence_detector"
    ids = [r["id"] for r in response.json()[:3]]
    meta = http.post(_u(path.replace("knn-service", "metadata")),
                     content=json.dumps(fixture("front_metadata.json", ids=ids)), headers=headers)
    assert [m["id"] for m in meta.json()] == ids
    assert http.get(_u(path.replace("knn-service", "indices-list"))).json() == ["gallery"]


def test_options_vlsearch_lacks_are_named_in_a_header_and_change_nothing(gallery):
    http = gallery["http"]
    quiet = fixture("clipclient_text.json") | {"use_safety_model": False, "use_violence_detector": False,
                                               "aesthetic_score": "", "aesthetic_weight": ""}
    plain = http.post("/knn-service", json=quiet)
    assert plain.status_code == 200 and IGNORED_HEADER not in plain.headers
    loud = http.post("/knn-service", json=fixture("clipclient_text.json") | {"use_mclip": True})
    assert loud.headers[IGNORED_HEADER] == "use_safety_model,use_violence_detector,use_mclip,aesthetic_score"
    assert _got(loud.json()) == _got(plain.json())


def test_text_modality_ranks_items_by_their_best_caption_embedding(gallery):
    s = gallery["searcher"]
    body = fixture("clipclient_text.json") | {"modality": "text", "deduplicate": False, "num_result_ids": 8}
    got = gallery["http"].post("/knn-service", json=body).json()
    cap_ids, cap_vectors = s.collection.read_embeddings(CAPTIONS_DIR)
    scores = cap_vectors @ s.embed_texts(["a red circle"])[0]
    best: dict[int, float] = {}
    for i, score in zip(cap_ids.tolist(), scores.tolist()):
        best[i] = max(best.get(i, -2.0), score)
    expected = sorted(best.items(), key=lambda kv: -kv[1])[:8]
    assert [r["id"] for r in got] == [api_id(i) for i, _ in expected]
    assert [r["similarity"] for r in got] == pytest.approx([v for _, v in expected], abs=1e-5)
    deduped = gallery["http"].post("/knn-service", json=body | {"deduplicate": True}).json()
    planted = {h.id for h in s.search_image(gallery["query_image"], k=3) if h.score > 0.999}
    assert len(planted) == 3
    assert sum(1 for r in deduped if r["id"] in {api_id(i) for i in planted}) <= 1
    assert sum(1 for r in got if r["id"] in {api_id(i) for i in planted}) in (0, 3)


def test_a_collection_without_caption_embeddings_says_it_has_no_text_index(tmp_path, gallery, small_encoder):
    import torch

    source = tmp_path / "bare"
    shutil.copytree(gallery["manifest"].parent / "images", source)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        config = EmbedConfig(model=small_encoder.info.name, workers=0, batch_size=16, device="cpu")
        path = embed(source, tmp_path / "bare-coll", config, encoder=small_encoder).path
    finally:
        torch.set_num_threads(threads)
    with TestClient(create_app({"bare": Searcher.open(path, encoder=small_encoder)},
                               ServeConfig(log_level="warning"))) as http:
        body = fixture("clipclient_text.json") | {"indice_name": "bare", "modality": "text"}
        response = http.post("/knn-service", json=body)
        assert response.status_code == 409 and "no text index" in response.json()["error"]
        assert http.post("/knn-service", json=body | {"modality": "image"}).status_code == 200


@pytest.mark.parametrize("body, status, words", [
    ("not json", 400, "not JSON"),
    ([1, 2], 400, "JSON object"),
    ({"text": "x", "num_images": 3, "indice_name": None}, 400, "modality"),
    ({"text": "x", "modality": "audio", "num_images": 3, "indice_name": None}, 400, "modality"),
    ({"text": "", "modality": "image", "num_images": 3, "indice_name": None}, 400, "must fill one of"),
    ({"text": "x", "modality": "image", "num_images": 0, "indice_name": None}, 400, "num_images"),
    ({"text": "x", "modality": "image", "num_images": 3, "indice_name": "nope"}, 404, "no index named"),
    ({"embedding_input": [1.0, 2.0], "modality": "image", "num_images": 3, "indice_name": None}, 400, "finite"),
    ({"image": "@@@", "modality": "image", "num_images": 3, "indice_name": None}, 400, "base64"),
    ({"text": "x", "modality": "image", "num_images": 3, "indice_name": None, "aesthetic_score": "high"}, 400,
     "aesthetic_score"),
])
def test_bad_requests_are_4xx_never_500(gallery, body, status, words):
    content = body if isinstance(body, str) else json.dumps(body)
    response = gallery["http"].post("/knn-service", content=content)
    assert response.status_code == status and words in response.json()["error"]


def test_null_indice_name_searches_the_first_collection(gallery):
    body = fixture("clipclient_text.json") | {"indice_name": None, "num_images": 3, "num_result_ids": 5}
    results = gallery["http"].post("/knn-service", json=body).json()
    _same(results, gallery["searcher"].search_text("a red circle", k=5, dedup=0.94))
    assert ["caption" in r for r in results] == [True] * 3 + [False] * 2


# ---- image_url: refused unless allowed, and then public http(s) only ------------------------------

def _url_body(url: str) -> dict[str, Any]:
    return fixture("clipclient_text.json") | {"text": None, "image_url": url, "num_images": 4}


def test_image_url_is_refused_by_default(gallery):
    response = gallery["http"].post("/knn-service", json=_url_body("https://example.org/cat.jpg"))
    assert response.status_code == 400 and "--allow-url-fetch" in response.json()["error"]


@pytest.fixture(scope="module")
def fetching(gallery):
    app = create_app({"gallery": gallery["searcher"]}, ServeConfig(log_level="warning", allow_url_fetch=True))
    with TestClient(app) as http:
        yield app, http


@pytest.mark.parametrize("url, words", [
    ("http://127.0.0.1:9/a.jpg", "loopback"),
    ("http://localhost/a.jpg", "loopback"),
    ("http://[::1]/a.jpg", "loopback"),
    ("http://169.254.169.254/latest/meta-data", "link-local"),
    ("http://10.1.2.3/a.jpg", "private"),
    ("file:///etc/passwd", "http or https"),
    ("ftp://example.org/a.jpg", "http or https"),
    ("http://user:pw@example.org/a.jpg", "credentials"),
])
def test_allowed_url_fetch_still_refuses_private_addresses_and_other_schemes(fetching, url, words):
    _, http = fetching
    response = http.post("/knn-service", json=_url_body(url))
    assert response.status_code == 400 and words in response.json()["error"]


def test_allowed_url_fetch_connects_to_the_checked_public_address(fetching, gallery):
    app, http = fetching
    image = gallery["query_image"].read_bytes()
    dns = {"img.example": ["93.184.216.34"], "mixed.example": ["93.184.216.34", "10.0.0.1"],
           "hop.example": ["93.184.216.35"], "127.0.0.1": ["127.0.0.1"]}
    opened = []

    def opener(target, max_bytes, timeout):
        opened.append((target.host, target.address, target.path))
        if target.host == "hop.example":
            return 302, "http://127.0.0.1/admin.jpg", b""
        return 200, None, image

    saved = app.state.url_fetcher
    app.state.url_fetcher = UrlFetcher(saved.max_bytes, saved.timeout, resolver=lambda host, port: dns[host],
                                       opener=opener)
    try:
        ok = http.post("/knn-service", json=_url_body("https://img.example/a.jpg?x=1"))
        assert ok.status_code == 200, ok.text
        _same(ok.json(), gallery["searcher"].search_image(gallery["query_image"], k=40, dedup=0.94))
        assert opened == [("img.example", "93.184.216.34", "/a.jpg?x=1")]
        mixed = http.post("/knn-service", json=_url_body("http://mixed.example/a.jpg"))
        assert mixed.status_code == 400 and "10.0.0.1" in mixed.json()["error"]
        hop = http.post("/knn-service", json=_url_body("http://hop.example/a.jpg"))
        assert hop.status_code == 400 and "loopback" in hop.json()["error"]
        assert opened[-1][0] == "hop.example"  # the redirect's target was never opened
    finally:
        app.state.url_fetcher = saved


def test_a_url_fetch_larger_than_the_cap_is_refused():
    fetcher = UrlFetcher(10, 5.0, resolver=lambda host, port: ["93.184.216.34"],
                         opener=lambda target, max_bytes, timeout: (200, None, b"x" * (max_bytes + 1)))
    with pytest.raises(UploadTooLargeError, match="larger than this server's limit of 10 bytes"):
        fetcher.fetch("http://img.example/a.jpg")


# ---- switches: off, token, CORS --------------------------------------------------------------------

def test_no_clip_retrieval_api_serves_none_of_its_paths(gallery):
    app = create_app({"gallery": gallery["searcher"]}, ServeConfig(log_level="warning", clip_retrieval_api=False))
    with TestClient(app) as http:
        assert http.get("/indices-list").status_code == 404
        assert http.get(_u("//indices-list")).status_code == 404
        assert http.post("/knn-service", json=fixture("clipclient_text.json")).status_code == 404
        assert http.post(_u("//metadata"), json={"ids": [1], "indice_name": "gallery"}).status_code == 404


def test_the_token_is_required_when_set(gallery):
    app = create_app({"gallery": gallery["searcher"]}, ServeConfig(log_level="warning", token=TOKEN))
    with TestClient(app) as http:
        assert http.get("/indices-list").status_code == 401
        assert http.post(_u("//knn-service"), json=fixture("clipclient_text.json")).status_code == 401
        assert http.post("/metadata", json={"ids": [1], "indice_name": "gallery"}).status_code == 401
        auth = {"Authorization": f"Bearer {TOKEN}"}
        assert http.get("/indices-list", headers=auth).json() == ["gallery"]
        assert http.post(_u("//knn-service"), json=fixture("clipclient_text.json"), headers=auth).status_code == 200


def test_cors_only_for_the_origins_given(gallery):
    origin = "http://127.0.0.1:8123"
    body = json.dumps(fixture("front_text.json"))
    with TestClient(gallery["app"]) as http:
        assert "access-control-allow-origin" not in http.post(_u("//knn-service"), content=body,
                                                              headers={"Origin": origin}).headers
    app = create_app({"gallery": gallery["searcher"]}, ServeConfig(log_level="warning", cors_origins=(origin,)))
    with TestClient(app) as http:
        simple = http.post(_u("//knn-service"), content=body, headers={"Origin": origin, "Content-Type": "text/plain"})
        assert simple.status_code == 200 and simple.headers["access-control-allow-origin"] == origin
        preflight = http.options(_u("//metadata"), headers={"Origin": origin, "Access-Control-Request-Method": "POST",
                                                        "Access-Control-Request-Headers": "content-type"})
        assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == origin
        other = http.get("/indices-list", headers={"Origin": "http://evil.example"})
        assert "access-control-allow-origin" not in other.headers


# ---- ids -----------------------------------------------------------------------------------------

def test_api_ids_fold_hashed_ids_keep_small_ones_and_leave_collisions_out():
    class Locator:
        def __init__(self, ids):
            self.ids = np.asarray(sorted(ids), np.int64)

        def locate(self, wanted):
            return None, None, np.isin(wanted, self.ids)

    small, hashed = 41, (5 << 53) + 777
    assert api_id(small) == small and api_id(hashed) == 777 and api_id(2**63 - 1) == 2**53 - 1
    assert item_ids_of(Locator([small, hashed]), [41, 777, 3]).tolist() == [small, hashed, -1]
    collided = Locator([hashed, (9 << 53) + 777])
    assert item_ids_of(collided, [777]).tolist() == [-1]


def test_api_ids_stay_the_same_across_a_sync(tmp_path, gallery, small_encoder):
    import torch

    from indexing.sync import sync

    path = tmp_path / "coll"
    shutil.copytree(gallery["path"], path)
    manifest = gallery["manifest"]
    with Searcher.open(path, encoder=small_encoder) as s, \
            TestClient(create_app({"gallery": s}, ServeConfig(log_level="warning", pin_version=True))) as http:
        everything = fixture("front_text.json") | {"num_images": 3000, "deduplicate": False}
        before = http.post("/knn-service", json=everything).json()
        by_path = {r["image_path"]: r["id"] for r in before}
        rows = list(csv.DictReader(open(manifest, newline="")))
        gone = {before[0]["image_path"], before[-1]["image_path"]}
        kept = [r for r in rows if r["image"] not in gone]
        extra = [{**r, "image": "images/copy-z.jpg"} for r in rows if r["image"] == rows[5]["image"]]
        shutil.copy(manifest.parent / rows[5]["image"], manifest.parent / "images" / "copy-z.jpg")
        synced = manifest.parent / "synced.csv"
        with open(synced, "w", newline="") as f:
            writer = csv.DictWriter(f, ["image", "caption", "license"])
            writer.writeheader()
            writer.writerows(kept + extra)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            report = sync(synced, path, EmbedConfig(model=small_encoder.info.name, workers=0, device="cpu"),
                          encoder=small_encoder)
        finally:
            torch.set_num_threads(threads)
        assert report.new and report.deleted
        assert s.refresh()
        after = http.post("/knn-service", json=everything).json()
        again = {r["image_path"]: r["id"] for r in after}
        assert set(again) == set(by_path) - gone | {"images/copy-z.jpg"}
        assert all(again[p] == by_path[p] for p in by_path if p not in gone)
        meta = http.post("/metadata", json={"ids": list(by_path.values()), "indice_name": "gallery"}).json()
        assert {m["metadata"]["image_path"]: m["id"] for m in meta} == \
            {p: i for p, i in by_path.items() if p not in gone}


# ---- the real clip-front in Chromium ----------------------------------------------------------------

def _front_server(root: Path, config: dict) -> Any:
    """A loopback static server for the vendored front, with clip_front.py's dynamic config.json."""
    from fastapi import FastAPI
    from fastapi.staticfiles import StaticFiles

    app = FastAPI()
    app.get("/config.json")(lambda: config)
    app.mount("/", StaticFiles(directory=root, html=True), name="front")
    return background_server(app)


def test_the_real_clip_front_searches_and_pages_through_vlsearch_serve(gallery):
    from prerequisites import chromium_path

    chromium = chromium_path()
    from playwright.sync_api import sync_playwright

    front_dir = Path(__file__).parent / "fixtures" / "clip_front"
    with _front_server(front_dir, {"defaultBackend": "", "defaultIndex": "", "urlColumn": "url"}) as front:
        config = ServeConfig(log_level="warning", cors_origins=(front,))
        with background_server(create_app({"gallery": gallery["searcher"]}, config)) as back, \
                sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, headless=True,
                                        args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
            try:
                _drive_front(browser, front, back, gallery)
            finally:
                browser.close()


def _drive_front(browser, front: str, back: str, gallery) -> None:
    page = browser.new_page(viewport={"width": 1200, "height": 500})
    page.route("**/*", lambda route: route.continue_() if route.request.url.startswith(("http://127.0.0.1",
                                                                                        "data:")) else route.abort())
    posts: list[tuple[str, str, dict]] = []
    problems: list[str] = []
    page.on("request", lambda r: posts.append((r.url, r.post_data, r.headers)) if r.method == "POST" else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("requestfailed", lambda r: problems.append(f"failed: {r.url} {r.failure}"))
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text[:300]}"))
    page.goto(f"{front}/?back={back}/&index=gallery&query=a%20red%20circle")
    try:
        page.wait_for_function("() => { const f = document.querySelector('clip-front'); return f && "
                               "f.shadowRoot && f.shadowRoot.querySelectorAll('img.pic').length >= 10 }",
                               timeout=30_000)
    except Exception:
        pytest.fail("the front showed no results:\n" + "\n".join(problems + [p[0] for p in posts]))
    knn = [p for p in posts if p[0].endswith("/knn-service")]
    assert knn[0][0] == f"{back}//knn-service"  # the front's own URL building, clip-retrieval #170
    assert json.loads(knn[0][1]) == fixture("front_text.json")
    assert knn[0][2].get("content-type", "").startswith("text/plain")
    expected = gallery["searcher"].search_text("a red circle", k=3000, dedup=0.94)
    # json-bigint (the front's parser) makes ids of more than 15 digits BigNumbers: compared as strings
    shown = page.evaluate("() => document.querySelector('clip-front').images.map(i => String(i.id))")
    assert shown == [str(api_id(h.id)) for h in expected]
    captions = page.evaluate("() => [...document.querySelector('clip-front').shadowRoot"
                             ".querySelectorAll('figcaption')].map(f => f.textContent.trim())")
    assert captions[0] == expected[0].caption
    loaded = page.evaluate("() => [...document.querySelector('clip-front').shadowRoot"
                           ".querySelectorAll('img.pic')].filter(i => i.complete && i.naturalWidth > 0).length")
    assert loaded >= 10
    _page_further(page, posts, back, expected)


def _page_further(page, posts, back, expected) -> None:
    """The front fetches the metadata of results past the first 40 as the page scrolls."""
    if len(expected) <= 40:
        pytest.fail(f"the gallery has only {len(expected)} results: too few to page")
    before = len(page.evaluate("() => [...document.querySelector('clip-front').shadowRoot"
                               ".querySelectorAll('img.pic')]"))
    for _ in range(10):
        page.mouse.wheel(0, 5000)
        page.wait_for_timeout(300)
        if any(p[0] == f"{back}//metadata" for p in posts):
            break
    meta = [p for p in posts if p[0] == f"{back}//metadata"]
    assert meta, "the front asked for no more metadata"
    body = json.loads(meta[0][1])
    wanted = [api_id(h.id) for h in expected[40:40 + len(body["ids"])]]
    assert body == fixture("front_metadata.json", ids=[str(i) if i >= 10**15 else i for i in wanted])
    page.wait_for_function(f"() => document.querySelector('clip-front').shadowRoot"
                           f".querySelectorAll('img.pic').length > {before}", timeout=15_000)


# ---- dedup on vlsearch's own image upload, and the serve flags ----------------------------------------

def test_dedup_on_the_upload_form_and_in_the_client(gallery):
    s, image = gallery["searcher"], gallery["query_image"]
    upload = {"file": ("q.jpg", image.read_bytes(), "image/jpeg")}
    plain = gallery["http"].post("/api/collections/gallery/search/image", files=upload, data={"k": "5"}).json()
    deduped = gallery["http"].post("/api/collections/gallery/search/image", files=upload,
                                   data={"k": "5", "dedup": "true"}).json()
    assert [h["id"] for h in plain["hits"]] == [str(h.id) for h in s.search_image(image, k=5)]
    assert [h["id"] for h in deduped["hits"]] == [str(h.id) for h in s.search_image(image, k=5, dedup=True)]
    assert [h["score"] > 0.999 for h in plain["hits"][:3]] == [True] * 3
    assert sum(h["score"] > 0.999 for h in deduped["hits"]) == 1 and len(deduped["hits"]) == 5
    bad = gallery["http"].post("/api/collections/gallery/search/image", files=upload, data={"dedup": "maybe"})
    assert bad.status_code == 400 and "dedup" in bad.json()["error"]
    from vlsearch import Client

    with background_server(gallery["app"]) as url, Client(url, collection="gallery") as client:
        assert [h.id for h in client.search_image(image, k=5, dedup=0.94)] == \
            [h.id for h in s.search_image(image, k=5, dedup=0.94)]


def test_serve_flags_reach_the_config():
    from typer.testing import CliRunner

    from vlsearch.app.cli import app as cli_app
    from vlsearch.app.options import ServeOptions

    assert ServeOptions().config().clip_retrieval_api and not ServeOptions().config().allow_url_fetch
    off = ServeOptions(clip_retrieval_api=False, allow_url_fetch=True).config()
    assert not off.clip_retrieval_api and off.allow_url_fetch
    help_text = CliRunner().invoke(cli_app, ["serve", "--help"], env={"COLUMNS": "200"}).output
    assert "--no-clip-retrieval-api" in help_text and "--allow-url-fetch" in help_text
