"""clip-retrieval's back-end HTTP API (``clip-retrieval back``, version 2.45), served beside
``/api`` so that ``ClipClient`` scripts and the clip-front page work against ``vlsearch serve``
unchanged (on by default; ``serve --no-clip-retrieval-api`` turns it off).

* ``GET /indices-list``: the served collection names.
* ``POST /knn-service``: ``text``, ``image`` (base64), ``image_url``, ``embedding_input``,
  ``modality`` (``"image"`` | ``"text"``), ``num_images``, ``num_result_ids`` (default
  ``num_images``), ``indice_name`` (null: the first collection), ``deduplicate``,
  ``use_mclip``, ``use_safety_model``, ``use_violence_detector``, ``aesthetic_score`` and
  ``aesthetic_weight`` (``""`` or a number). The query is, as in clip_back.py: a non-empty
  ``text``, else ``image``, else ``image_url``, else ``embedding_input``. The answer is a list in
  similarity order of ``{"id", "similarity"}``, the first ``num_images`` also carrying the item's
  metadata (``caption``, ``image_path``, every metadata column of the collection, such as ``url``)
  and, where its image is readable, ``image``: a base64 JPEG (the server's thumbnail, at most
  ``max_thumbnail_size`` a side); ``[]`` when nothing is found. The hits are the Searcher's:
  ``search_text`` / ``search_image`` / ``search_vector`` with ``k=num_result_ids`` and, with
  ``deduplicate``, ``dedup=0.94`` (clip-retrieval's threshold, over the stored vectors); on the
  collection's index, or exact where it has none. Unlike clip_back, which drops the copies among
  its ``num_result_ids`` and so returns fewer, the list is filled to ``num_result_ids`` distinct
  items where the collection has them.
* ``modality: "text"`` ranks the collection's caption embeddings (its ``captions`` shards; an item
  scores its best caption), exactly, in memory (loaded on the first such query of a collection
  version); a collection without caption embeddings answers 409 "no text index".
* ``POST /metadata``: ``{"ids": [...], "indice_name": ...}`` -> ``[{"id": i, "metadata": {...}}]``,
  the same metadata (and ``image``) as ``/knn-service``; ids no item has are left out. An id may
  also be a decimal string: clip-front parses ids of more than 15 digits with json-bigint and
  sends them back as strings.
* Each path is also served with a leading double slash (``//knn-service``: the front builds
  ``backend + "/knn-service"`` from a backend URL that ends with ``/``), and the JSON body is read
  whatever the Content-Type says (the front's ``fetch`` sends ``text/plain``).
* ``--token`` is required as on ``/api``; CORS headers only for ``--cors-origin`` origins.

**What vlsearch cannot do.** It has no safety model, violence detector, aesthetic embeddings or
multilingual CLIP: a request asking for them (``use_safety_model`` / ``use_violence_detector``
true, an ``aesthetic_score``, ``use_mclip`` true) is answered as if it had not, and the response
header ``X-Vlsearch-Ignored`` names those fields (``use_mclip``: the collection's own text tower
embeds the text). ``image_url`` is refused (400) unless the server runs with ``--allow-url-fetch``
(:mod:`vlsearch.app.serve.url_fetch`: public http(s) addresses only, a size cap and a timeout).

**Ids.** clip-retrieval's ids are row positions; vlsearch's are 63-bit hashes, which JavaScript
numbers (53 bits) cannot hold. The API id of an item is its vlsearch id folded to 53 bits,
``id mod 2**53`` (:func:`api_id`): a pure function of the item, so it never changes while the item
lives, whatever syncs add or remove, and no table is stored or rebuilt. Ids below ``2**53`` (row
positions of an imported clip-retrieval folder) are their own API id. ``/metadata`` finds the item
of an API id by looking up the 1024 vlsearch ids that fold to it (binary searches in the id map the
Searcher already holds); if two live items fold to one API id (for N hashed ids, about
``N**2 / 2**54`` pairs: 5e-5 at a million), that id is ambiguous and ``/metadata`` leaves it out
rather than answer with the wrong item.
"""

from __future__ import annotations

import base64
import json
import threading
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse

from vlsearch.ann.duplicates import CLIP_RETRIEVAL_THRESHOLD
from vlsearch.core.errors import CollectionNotFoundError, IndexNotBuiltError, InvalidQueryError, ItemNotFoundError
from vlsearch.query.results import NOT_METADATA
from vlsearch.query.searcher import Searcher
from vlsearch.query.shaping import MAX_DEPTH, distinct_positions
from vlsearch.store.layout import CAPTIONS_DIR
from vlsearch.store.rows import RowLocator

from vlsearch.app.serve.routes import _base64_image, _decode_upload, _json_value, require_token
from vlsearch.app.serve.schemas import parse_id
from vlsearch.app.serve.service import ServedCollection
from vlsearch.app.serve.url_fetch import UrlFetcher

API_ID_BITS = 53
_API_MASK = (1 << API_ID_BITS) - 1
#: Every vlsearch id (< 2**63) folding to one API id: ``api | j << 53`` for these j.
_HIGH = np.arange(1 << (63 - API_ID_BITS), dtype=np.int64) << API_ID_BITS
#: Most results (``num_result_ids``) and ``/metadata`` ids one request may ask for.
MAX_IDS = MAX_DEPTH
IGNORED_HEADER = "X-Vlsearch-Ignored"
MODALITIES = ("image", "text")


def api_id(item_id: int) -> int:
    """The integer the clip-retrieval API hands out for vlsearch item ``item_id`` (see the module docstring)."""
    return int(item_id) & _API_MASK


def item_ids_of(locator: RowLocator, api_ids: list[int]) -> np.ndarray:
    """The live vlsearch id behind each API id, -1 where no item, or more than one, folds to it."""
    if not api_ids:
        return np.zeros(0, np.int64)
    candidates = np.asarray(api_ids, np.int64)[:, None] | _HIGH[None, :]
    found = locator.locate(candidates.ravel())[2].reshape(candidates.shape)
    chosen = candidates[np.arange(len(api_ids)), found.argmax(axis=1)]
    return np.where(found.sum(axis=1) == 1, chosen, -1)


# ---- the request ---------------------------------------------------------------------------------

def _count(body: dict[str, Any], name: str, default: Any = None) -> int:
    value = body.get(name, default)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_IDS:
        raise InvalidQueryError(f"{name} must be an integer in 1..{MAX_IDS}, got {value!r}")
    return value


def _optional(body: dict[str, Any], name: str, kind: type) -> Any:
    value = body.get(name)
    if value is not None and not isinstance(value, kind):
        raise InvalidQueryError(f"{name} must be a {kind.__name__} or null")
    return value


def _number(value: Any, name: str, kind: type) -> Any:
    """clip_back's reading of the aesthetic fields: ``""`` (or null) is none, else ``int``/``float`` of it."""
    if value is None or value == "":
        return None
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise InvalidQueryError(f"{name} must be \"\" or a number, got {value!r}") from None


@dataclass(frozen=True)
class KnnRequest:
    """A ``/knn-service`` body, read as clip_back.py reads it (:meth:`of`)."""

    modality: str
    num_images: int
    num_result_ids: int
    indice_name: Optional[str] = None
    text: Optional[str] = None
    image: Optional[str] = None
    image_url: Optional[str] = None
    embedding_input: Optional[list] = None
    deduplicate: bool = False
    use_mclip: bool = False
    use_safety_model: bool = False
    use_violence_detector: bool = False
    aesthetic_score: Optional[int] = None
    aesthetic_weight: Optional[float] = None

    @classmethod
    def of(cls, body: Any) -> "KnnRequest":
        """The request in ``body``; InvalidQueryError names what is missing or wrong."""
        if not isinstance(body, dict):
            raise InvalidQueryError("the body must be a JSON object")
        missing = [n for n in ("modality", "num_images", "indice_name") if n not in body]
        if missing:
            raise InvalidQueryError(f"missing field(s): {', '.join(missing)}")
        if body["modality"] not in MODALITIES:
            raise InvalidQueryError(f"modality must be \"image\" or \"text\", got {body['modality']!r}")
        num_images = _count(body, "num_images")
        return cls(
            modality=body["modality"], num_images=num_images,
            num_result_ids=_count(body, "num_result_ids", num_images),
            indice_name=_optional(body, "indice_name", str), text=_optional(body, "text", str),
            image=_optional(body, "image", str), image_url=_optional(body, "image_url", str),
            embedding_input=_optional(body, "embedding_input", list),
            deduplicate=bool(body.get("deduplicate", False)), use_mclip=bool(body.get("use_mclip", False)),
            use_safety_model=bool(body.get("use_safety_model", False)),
            use_violence_detector=bool(body.get("use_violence_detector", False)),
            aesthetic_score=_number(body.get("aesthetic_score", ""), "aesthetic_score", int),
            aesthetic_weight=_number(body.get("aesthetic_weight", ""), "aesthetic_weight", float))

    @property
    def query(self) -> str:
        """Which input is the query, by clip_back's precedence: text, image, image_url, embedding_input."""
        if self.text is not None and self.text != "":
            return "text"
        for name in ("image", "image_url", "embedding_input"):
            if getattr(self, name) is not None:
                return name
        raise InvalidQueryError("must fill one of text, image, image_url and embedding_input")

    def ignored(self) -> list[str]:
        """The fields asking for what vlsearch does not have (they change nothing)."""
        names = [n for n in ("use_safety_model", "use_violence_detector", "use_mclip") if getattr(self, n)]
        return names + (["aesthetic_score"] if self.aesthetic_score is not None else [])


# ---- the search ----------------------------------------------------------------------------------

class CaptionVectors:
    """One collection version's caption embeddings, in memory, ranked exactly (``modality: text``)."""

    def __init__(self, s: Searcher):
        ids, vectors = s.collection.read_embeddings(CAPTIONS_DIR)
        live = s.row_locator.locate(ids)[2]  # captions of removed images are not hits
        self.version, self.image_ids, self.vectors = s.version, ids[live], vectors[live]

    def search(self, s: Searcher, vector: np.ndarray, k: int, dedup: float | None) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` best items ``(ids, scores)`` by their best caption; with ``dedup``, near-duplicate
        items (by their stored image vectors) collapsed into the best-ranked one."""
        scores = self.vectors @ vector
        depth = min(len(scores), k)
        while True:
            top = np.argpartition(-scores, depth - 1)[:depth] if depth < len(scores) else np.arange(len(scores))
            top = top[np.argsort(-scores[top], kind="stable")]
            _, first = np.unique(self.image_ids[top], return_index=True)
            best = top[np.sort(first)]  # each item once, at its best caption
            ids, item_scores = self.image_ids[best], scores[best]
            if dedup is not None and len(ids):
                keep = distinct_positions(s.item_vectors(ids.tolist()), dedup)
                ids, item_scores = ids[keep], item_scores[keep]
            if len(ids) >= k or depth >= len(scores):
                return ids[:k], item_scores[:k]
            depth = min(len(scores), depth * 4)


class CaptionIndexes:
    """Each served collection's :class:`CaptionVectors` for the version it serves, loaded on first use."""

    def __init__(self) -> None:
        self._loaded: dict[str, CaptionVectors] = {}
        self._lock = threading.Lock()

    def of(self, name: str, s: Searcher) -> CaptionVectors:
        with self._lock:
            current = self._loaded.get(name)
            if current is None or current.version != s.version:
                current = self._loaded[name] = CaptionVectors(s)
        if not len(current.image_ids):
            raise IndexNotBuiltError(f"collection {name!r} has no text index (no caption embeddings): search it "
                                     "with modality \"image\"")
        return current


def _embedding(s: Searcher, values: list) -> np.ndarray:
    try:
        vector = np.asarray(values, np.float32)
    except (TypeError, ValueError):
        raise InvalidQueryError("embedding_input must be a list of numbers") from None
    if vector.shape != (s.dim,) or not np.isfinite(vector).all():
        raise InvalidQueryError(f"embedding_input must hold {s.dim} finite numbers (the collection's dimension)")
    return vector


def _image(request: Request, req: KnnRequest) -> Any:
    """The query image (decoded under the server's limits) from ``image`` or a fetched ``image_url``."""
    if req.query == "image":
        return _decode_upload(_base64_image(request, req.image), request)
    fetcher: UrlFetcher | None = request.app.state.url_fetcher
    if fetcher is None:
        raise InvalidQueryError("image_url is refused: this server does not fetch URLs (an SSRF risk) unless "
                                "started with --allow-url-fetch; send the image itself as base64 in \"image\"")
    return _decode_upload(fetcher.fetch(req.image_url), request)


def knn(request: Request, coll: ServedCollection, s: Searcher, req: KnnRequest) -> tuple[list[int], list[float]]:
    """The ranked ``(item ids, similarities)`` of a request on version ``s`` of ``coll``."""
    dedup = CLIP_RETRIEVAL_THRESHOLD if req.deduplicate else None
    k, query, exact = req.num_result_ids, req.query, not s.has_index  # clip_back always has an index
    if req.modality == "text":
        vector = (s.embed_texts([req.text])[0] if query == "text" else
                  _embedding(s, req.embedding_input) if query == "embedding_input" else
                  s.embed_images([_image(request, req)])[0])
        vector = vector / max(float(np.linalg.norm(vector)), 1e-12)
        ids, scores = request.app.state.clip_captions.of(coll.name, s).search(s, vector, k, dedup)
        return ids.tolist(), scores.tolist()
    if query == "text":
        hits = s.search_text(req.text, k=k, exact=exact, dedup=dedup)
    elif query == "embedding_input":
        hits = s.search_vector(_embedding(s, req.embedding_input), k=k, exact=exact, dedup=dedup)
    else:
        hits = s.search_image(_image(request, req), k=k, exact=exact, dedup=dedup)
    return [h.id for h in hits], [h.score for h in hits]


# ---- the items -----------------------------------------------------------------------------------

def item_metadata(record: dict[str, Any]) -> dict[str, Any]:
    """An item row as clip-retrieval's metadata: its metadata columns (``url``...), ``caption`` (its
    first caption, unless a ``caption`` column exists) and ``image_path`` (its stored path, likewise)."""
    meta = {k: _json_value(v) for k, v in record.items() if k not in NOT_METADATA}
    captions = record.get("captions") or []
    if captions:
        meta.setdefault("caption", captions[0])
    if record.get("path") is not None:
        meta.setdefault("image_path", record["path"])
    return meta


def items(request: Request, coll: ServedCollection, s: Searcher, ids: list[int]) -> list[dict[str, Any] | None]:
    """Each item's metadata with its ``image`` (base64 JPEG thumbnail) where readable; None for an id
    no live item has."""
    shard, row, found = s.row_locator.locate(np.asarray(ids, np.int64))
    records = iter(s.metadata_reader.rows(shard[found], row[found]))
    size = request.app.state.config.max_thumbnail_size
    out: list[dict[str, Any] | None] = []
    for ok in found.tolist():
        if not ok:
            out.append(None)
            continue
        record = next(records)
        meta = item_metadata(record)
        try:
            meta["image"] = base64.b64encode(coll.images.thumbnail(record, size)).decode("ascii")
        except ItemNotFoundError:
            pass  # no image source, or the file is gone: the item still has its metadata
        out.append(meta)
    return out


# ---- the endpoints -------------------------------------------------------------------------------

async def json_body(request: Request) -> Any:
    """The body as JSON, whatever its Content-Type (clip-front's fetch sends text/plain)."""
    data = await request.body()
    try:
        return json.loads(data)
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidQueryError(f"the body is not JSON ({exc})") from None


def _collection(request: Request, name: Any) -> ServedCollection:
    served = request.app.state.served
    if name is None:
        return next(iter(served.values()))
    if name not in served:
        raise CollectionNotFoundError(f"no index named {name!r}; this server has: {', '.join(served)}")
    return served[name]


def indices_list(request: Request) -> list[str]:
    """The served collections' names (clip-retrieval: the index names)."""
    return list(request.app.state.served)


def knn_service(request: Request, body: Any = Depends(json_body)) -> JSONResponse:
    """clip-retrieval's k-NN search (see the module docstring)."""
    req = KnnRequest.of(body)
    coll = _collection(request, req.indice_name)
    s = coll.searcher.snapshot()
    ids, scores = knn(request, coll, s, req)
    metas = items(request, coll, s, ids[: req.num_images])
    results = []
    for i, (item_id, score) in enumerate(zip(ids, scores)):
        entry = dict(metas[i] or {}) if i < len(metas) else {}
        entry["id"], entry["similarity"] = api_id(item_id), float(score)
        results.append(entry)
    ignored = req.ignored()
    return JSONResponse(results, headers={IGNORED_HEADER: ",".join(ignored)} if ignored else None)


def _api_ids(values: list[Any]) -> list[int]:
    """``/metadata``'s ids: integers, or their decimal strings (clip-front parses ids of more than 15
    digits with json-bigint, whose numbers go back out as strings)."""
    try:
        ids = [parse_id(v) for v in values]
    except ValueError:
        ids = [-1]
    if len(ids) > MAX_IDS or not all(i <= _API_MASK for i in ids) or min(ids, default=0) < 0:
        raise InvalidQueryError(f"ids must be at most {MAX_IDS} integers in 0..2**{API_ID_BITS}-1")
    return ids


def metadata(request: Request, body: Any = Depends(json_body)) -> list[dict[str, Any]]:
    """The metadata of API ids, as ``/knn-service`` gives it (ids no item has are left out)."""
    if not isinstance(body, dict) or not isinstance(body.get("ids"), list):
        raise InvalidQueryError("the body must be {\"ids\": [...], \"indice_name\": ...}")
    api_ids = _api_ids(body["ids"])
    coll = _collection(request, body.get("indice_name"))
    s = coll.searcher.snapshot()
    item_ids = item_ids_of(s.row_locator, api_ids)
    metas = items(request, coll, s, item_ids.tolist())
    return [{"id": i, "metadata": m} for i, m in zip(api_ids, metas) if m is not None]


def clip_retrieval_router() -> APIRouter:
    """The three endpoints, each at ``/path`` and ``//path``, behind the server's token."""
    router = APIRouter(dependencies=[Depends(require_token)], tags=["clip-retrieval"])
    for prefix in ("", "/"):
        shown = not prefix
        router.add_api_route(prefix + "/indices-list", indices_list, methods=["GET"], include_in_schema=shown,
                             response_model=list[str])
        router.add_api_route(prefix + "/knn-service", knn_service, methods=["POST"], include_in_schema=shown,
                             response_class=JSONResponse)
        router.add_api_route(prefix + "/metadata", metadata, methods=["POST"], include_in_schema=shown)
    return router


def install(app: FastAPI) -> None:
    """Serve the API on ``app`` (its state: the caption indexes, and the URL fetcher where allowed)."""
    config = app.state.config
    app.state.clip_captions = CaptionIndexes()
    app.state.url_fetcher = UrlFetcher(config.max_upload_bytes, config.url_fetch_timeout) \
        if config.allow_url_fetch else None
    app.include_router(clip_retrieval_router())
