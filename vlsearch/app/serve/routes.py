"""The HTTP endpoints. Handlers are plain ``def``: FastAPI runs them in its thread pool, and the
heavy parts (FAISS, torch, PIL) release the GIL, so requests are served concurrently."""

from __future__ import annotations

import base64
import binascii
import hmac
import math
import time
from typing import Any, Optional

import numpy as np
from fastapi import APIRouter, Depends, File, Form, Query, Request, UploadFile
from fastapi.responses import Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException

from vlsearch.core.errors import CollectionNotFoundError, DecodeError, InvalidQueryError
from vlsearch.data.images import open_image
from vlsearch.query.results import Hit
from vlsearch.query.terms import Item, Term
from vlsearch.query.terms import Query as TermsQuery

from vlsearch.app.serve.config import MAX_RESULTS
from vlsearch.app.serve.errors import UploadTooLargeError
from vlsearch.app.serve.schemas import (
    CollectionInfo,
    ErrorBody,
    Health,
    ItemModel,
    MoreLikeRequest,
    SearchParams,
    SearchRequest,
    SearchResponse,
    TermModel,
    parse_id,
)
from vlsearch.app.serve.service import Examples, SearchOptions, ServedCollection

ERRORS = {code: {"model": ErrorBody} for code in (400, 401, 404, 409, 413, 422)}


#: Declares the bearer scheme in the OpenAPI schema (the "Authorize" button of /docs); it only reads
#: the header, so that ``require_token`` decides, with the server's own 401, whether one is needed.
bearer = HTTPBearer(auto_error=False, scheme_name="bearerToken",
                    description="The server's --token (none needed when it was started without one).")


def require_token(request: Request,
                  credentials: Optional[HTTPAuthorizationCredentials] = Depends(bearer)) -> None:
    """Bearer-token check (constant-time) when the server has a token."""
    token = request.app.state.config.token
    if token is None:
        return
    given = credentials.credentials if credentials is not None else ""
    if not hmac.compare_digest(given.encode(), token.encode()):
        raise HTTPException(401, "missing or wrong bearer token (send `Authorization: Bearer TOKEN`)",
                            headers={"WWW-Authenticate": "Bearer"})


public = APIRouter()
api = APIRouter(prefix="/api", dependencies=[Depends(require_token)], responses=ERRORS)


def _collection(request: Request, name: str) -> ServedCollection:
    served = request.app.state.served
    if name not in served:
        raise CollectionNotFoundError(f"no collection named {name!r}; this server has: {', '.join(served)}")
    return served[name]


def _item_id(value: str) -> int:
    try:
        return parse_id(value)
    except ValueError as exc:
        raise InvalidQueryError(f"bad item id {value[:40]!r}: {exc}") from None


def _json_value(value: Any) -> Any:
    """Metadata values as JSON can carry them (NaN -> null, bytes -> size, dates -> ISO)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    if isinstance(value, (bytes, bytearray)):
        return f"<{len(value)} bytes>"
    if value is None or isinstance(value, (str, int, bool)):
        return value
    return value.isoformat() if hasattr(value, "isoformat") else str(value)


def _hit(h: Hit) -> dict[str, Any]:
    return {"rank": h.rank, "id": str(h.id), "score": h.score, "path": h.path, "caption": h.caption,
            "metadata": _json_value(h.metadata), "first_stage_score": h.first_stage_score}


def _decode_upload(data: bytes, request: Request) -> Any:
    config = request.app.state.config
    if len(data) > config.max_upload_bytes:
        raise UploadTooLargeError(
            f"the image has {len(data)} bytes; this server takes at most {config.max_upload_bytes}")
    try:
        return open_image(data, max_pixels=config.max_image_pixels)
    except DecodeError as exc:
        raise InvalidQueryError(f"the uploaded file is not a usable image ({exc})") from None


def _search(request: Request, name: str, kind: str, value: Any, params: SearchParams) -> dict[str, Any]:
    start = time.perf_counter()
    coll = _collection(request, name)
    opts = SearchOptions(k=params.k, offset=params.offset, nprobe=params.nprobe, k_factor=params.k_factor,
                         exact=params.exact, where=params.where, rerank=params.rerank, min_score=params.min_score,
                         autocut=params.autocut, group_by=params.group_by, per_group=params.per_group,
                         order_by=params.order_by, depth=params.depth,
                         facets=None if params.facets is None else tuple(params.facets),
                         mode=getattr(params, "mode", "vector"), alpha=getattr(params, "alpha", None),
                         dedup=params.dedup)
    if kind == "image":
        value = _decode_upload(value, request)
    out = coll.search(kind, value, opts)
    last = len(out.hits) < params.k or params.offset + 2 * params.k > MAX_RESULTS
    return {"collection": name, "query": kind, "k": params.k, "offset": params.offset, "exact": params.exact,
            "hits": [_hit(h) for h in out.hits], "next_offset": None if last else params.offset + params.k,
            "took_ms": (time.perf_counter() - start) * 1e3, "embed_ms": out.embed_ms, "search_ms": out.search_ms,
            "facets": None if out.facets is None else _facets(out.facets), "relevant": out.relevant,
            "version": out.version}


def _facets(facets: dict[str, dict[Any, int]]) -> dict[str, list[dict[str, Any]]]:
    """Facet counts as JSON lists (values may be null, numbers or strings; order kept)."""
    return {column: [{"value": _json_value(value), "count": count} for value, count in counts.items()]
            for column, counts in facets.items()}


@public.get("/health", response_model=Health, tags=["service"])
async def health(request: Request) -> dict[str, Any]:
    """Liveness: always answers while the process serves requests (no token needed); with the
    version of each collection served and when it was loaded."""
    served = request.app.state.served
    return {"status": "ok", "collections": len(served),
            "versions": {name: c.served_version() for name, c in served.items()}}


@public.get("/metrics", dependencies=[Depends(require_token)], tags=["service"],
            response_class=Response, responses={200: {"content": {"text/plain": {}}}})
def metrics(request: Request) -> Response:
    """Prometheus metrics: request counts, latency histogram, errors, thumbnail cache."""
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@api.get("/collections", response_model=list[CollectionInfo], tags=["collections"])
def collections(request: Request) -> list[dict[str, Any]]:
    """The served collections with their image counts, model, index, and the version served."""
    return [c.info() for c in request.app.state.served.values()]


@api.post("/collections/{name}/search", response_model=SearchResponse, tags=["search"])
def search(request: Request, name: str, body: SearchRequest) -> dict[str, Any]:
    """Search by text, vector, base64 image, indexed item id or weighted terms (JSON body)."""
    if body.image_base64 is not None:
        value: Any = _base64_image(request, body.image_base64)
    elif body.terms is not None:
        value = TermsQuery(tuple(_term(request, t) for t in body.terms))
    else:
        value = {"text": body.text, "vector": None if body.vector is None else np.asarray(body.vector, np.float32),
                 "id": body.id}[body.kind]
    return _search(request, name, body.kind, value, body)


def _base64_image(request: Request, data: str) -> bytes:
    limit = request.app.state.config.max_upload_bytes
    if len(data) > limit * 4 // 3 + 4:
        raise UploadTooLargeError(f"the image is larger than this server's limit of {limit} bytes")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidQueryError("image_base64 is not valid base64") from None


def _term(request: Request, term: TermModel) -> Term:
    """A request's term: a text, an image (decoded under the server's limits) or an item."""
    if term.text is not None:
        return Term(term.text, term.weight)
    if term.id is not None:
        return Term(Item(term.id), term.weight)
    return Term(_decode_upload(_base64_image(request, term.image_base64), request), term.weight)


@api.post("/collections/{name}/more_like", response_model=SearchResponse, tags=["search"])
def more_like(request: Request, name: str, body: MoreLikeRequest) -> dict[str, Any]:
    """Recommend from stored examples: items like ``positive_ids`` and unlike ``negative_ids``."""
    examples = Examples(body.positive_ids, body.negative_ids, body.negative_weight, body.exclude_examples)
    return _search(request, name, "more_like", examples, body)


@api.post("/collections/{name}/search/image", response_model=SearchResponse, tags=["search"])
def search_upload(
    request: Request, name: str,
    file: UploadFile = File(..., description="The query image."),
    k: int = Form(10, ge=1, le=MAX_RESULTS), offset: int = Form(0, ge=0, le=MAX_RESULTS),
    nprobe: Optional[int] = Form(None, ge=1, le=1 << 20), k_factor: Optional[float] = Form(None, ge=1, le=1000),
    exact: bool = Form(False), where: Optional[str] = Form(None, max_length=2000),
    min_score: Optional[float] = Form(None), autocut: Optional[int] = Form(None, ge=1, le=100),
    group_by: Optional[str] = Form(None, max_length=256), per_group: Optional[int] = Form(None, ge=1, le=MAX_RESULTS),
    order_by: Optional[str] = Form(None, max_length=300), depth: Optional[int] = Form(None, ge=1),
    facets: Optional[list[str]] = Form(None, description="Repeat the field once per column."),
    dedup: Optional[str] = Form(None, max_length=32, description="true, false or a cosine threshold in (0, 1]."),
) -> dict[str, Any]:
    """Search by an uploaded image (multipart/form-data)."""
    try:
        params = SearchParams(k=k, offset=offset, nprobe=nprobe, k_factor=k_factor, exact=exact, where=where or None,
                              min_score=min_score, autocut=autocut, group_by=group_by or None, per_group=per_group,
                              order_by=order_by or None, depth=depth, facets=facets or None, dedup=_form_dedup(dedup))
    except ValueError as exc:
        raise InvalidQueryError(str(exc)) from None
    limit = request.app.state.config.max_upload_bytes
    data = file.file.read(limit + 1)
    return _search(request, name, "image", data, params)


def _form_dedup(value: Optional[str]) -> bool | float | None:
    """A form's ``dedup``: ``true``/``false`` or a threshold (checked by the search itself)."""
    if value is None or not value.strip():
        return None
    if value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"dedup must be true, false or a number, not {value[:32]!r}") from None


@api.get("/collections/{name}/items/{item_id}", response_model=ItemModel, tags=["items"])
def item(request: Request, name: str, item_id: str) -> dict[str, Any]:
    """An item's path, captions and metadata."""
    coll = _collection(request, name)
    rec = coll.record(_item_id(item_id))
    captions = list(rec.get("captions") or [])
    meta = {k: v for k, v in rec.items() if k not in ("id", "path", "captions")}
    return {"collection": name, "id": str(rec["id"]), "path": rec.get("path"),
            "caption": captions[0] if captions else None, "captions": captions, "metadata": _json_value(meta)}


_CACHE = {"Cache-Control": "private, max-age=3600"}


@api.get("/collections/{name}/items/{item_id}/image", tags=["items"], response_class=Response,
         responses={200: {"content": {"image/*": {}}}})
def image(request: Request, name: str, item_id: str) -> Response:
    """The item's image file, as stored."""
    coll = _collection(request, name)
    data, media_type = coll.images.image(coll.record(_item_id(item_id)))
    return Response(data, media_type=media_type, headers={**_CACHE, "X-Content-Type-Options": "nosniff"})


@api.get("/collections/{name}/items/{item_id}/thumbnail", tags=["items"], response_class=Response,
         responses={200: {"content": {"image/jpeg": {}}}})
def thumbnail(request: Request, name: str, item_id: str,
              size: int = Query(256, ge=16, description="Longest side in pixels (capped by the server).")) -> Response:
    """A JPEG thumbnail of the item, made on first request and cached."""
    coll = _collection(request, name)
    size = min(size, request.app.state.config.max_thumbnail_size)
    data = coll.images.thumbnail(coll.record(_item_id(item_id)), size)
    return Response(data, media_type="image/jpeg", headers={**_CACHE, "X-Content-Type-Options": "nosniff"})
