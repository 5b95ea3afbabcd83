"""The one place where errors become HTTP responses: VlsearchError subclasses -> status codes,
and every error body is ``{"error": message, "type": class name}`` (see ``ErrorBody``)."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from vlsearch.core import errors as E

log = logging.getLogger(__name__)


class UploadTooLargeError(E.InvalidQueryError):
    """An uploaded image is larger than the server's limit."""


#: First match wins (subclasses before their bases).
STATUS_CODES: tuple[tuple[type[E.VlsearchError], int], ...] = (
    (UploadTooLargeError, 413),
    (E.ItemNotFoundError, 404),
    (E.CollectionNotFoundError, 404),
    (E.IndexNotBuiltError, 409),
    (E.RerankerNotFoundError, 409),
    (E.RerankerMismatchError, 409),
    (E.RerankFeaturesError, 409),
    (E.InvalidQueryError, 400),
    (E.DecodeError, 400),
    (E.VlsearchError, 500),
)


def status_of(exc: E.VlsearchError) -> int:
    return next(code for cls, code in STATUS_CODES if isinstance(exc, cls))


def public_type(exc: BaseException) -> str:
    """The most specific class of ``exc`` that ``vlsearch.core.errors`` defines (what clients re-raise)."""
    return next((c.__name__ for c in type(exc).__mro__ if getattr(E, c.__name__, None) is c), "VlsearchError")


def error_response(status: int, message: str, type_name: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "type": type_name}, status_code=status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers that give every error the same JSON shape."""

    @app.exception_handler(E.VlsearchError)
    async def _vlsearch(request: Request, exc: E.VlsearchError) -> JSONResponse:
        status = status_of(exc)
        if status >= 500:
            log.error("%s %s: %s", request.method, request.url.path, exc)
        return error_response(status, str(exc), public_type(exc))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path", "form"))
            parts.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
        detail = [{"loc": [str(p) for p in err.get("loc", ())], "msg": str(err.get("msg")), "type": err.get("type")}
                  for err in exc.errors()]  # the inputs are not echoed back (size, NaN...)
        body = {"error": "; ".join(parts) or "invalid request", "type": "InvalidQueryError", "detail": detail}
        return JSONResponse(body, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), "RemoteError", getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("%s %s failed", request.method, request.url.path)
        return error_response(500, "internal server error (see the server log)", "RemoteError")
