"""``create_app(collections, config)``: the FastAPI application; ``serve(...)``: run it with uvicorn."""

from __future__ import annotations

import logging
import socket
import threading
import time
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterator, Mapping

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.staticfiles import StaticFiles

import vlsearch

from vlsearch.app.serve import clip_retrieval
from vlsearch.app.serve.config import ServeConfig
from vlsearch.app.serve.errors import error_response, install_error_handlers
from vlsearch.app.serve.metrics import MetricsMiddleware, ServeMetrics
from vlsearch.app.serve.routes import api, public
from vlsearch.app.serve.service import CollectionSpec, close_collections, open_collections
from vlsearch.app.serve.watching import OnWatch, ServedWatchers

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"
#: JSON bodies carry an image as base64 (4/3 of its size) plus a little else.
_BODY_SLACK = 64 * 1024


class BodyLimitMiddleware:
    """Refuses request bodies over ``max_bytes`` with 413 before the app parses them: by the
    declared Content-Length at once, or by counting while reading a chunked body."""

    def __init__(self, app: Callable, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            return await self._refuse(scope, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.max_bytes:
                return await self._refuse(scope, send)
        body, replayed = b"".join(chunks), False

        async def replay() -> dict:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, scope: dict, send: Callable) -> None:
        limit = self.max_bytes
        response = error_response(413, f"request body larger than this server's limit of {limit} bytes",
                                  "InvalidQueryError")
        await response(scope, self._no_body, send)

    @staticmethod
    async def _no_body() -> dict:
        return {"type": "http.disconnect"}


def create_app(collections: Mapping[str, CollectionSpec] | list[CollectionSpec],
               config: ServeConfig = ServeConfig(), on_watch: OnWatch | None = None) -> FastAPI:
    """The app serving ``collections`` ({name: path or Searcher}, or a list named by folder).

    Opens every collection now (each model loads once); raises ServeConfigError / CollectionError /
    SourceError. Collections opened from paths follow their new versions (unless
    ``config.pin_version``) and are closed when the app shuts down. ``config.watch``'s folders are
    synced into their collections while the app runs; ``on_watch(name, report_or_error)`` hears
    of each round.
    """
    served = open_collections(collections, config)
    try:
        watchers = ServedWatchers(config.watch, served, on_watch)
    except BaseException:
        close_collections(served)
        raise
    app = FastAPI(title="vlsearch", version=vlsearch.__version__, docs_url=None, redoc_url=None,
                  description="Search image collections by text, image, vector or example item.",
                  lifespan=_lifespan)
    app.state.served, app.state.config, app.state.metrics = served, config, ServeMetrics()
    app.state.watchers = watchers
    app.state.metrics.cache_gauges(next(iter(served.values())).images.cache)
    install_error_handlers(app)
    app.include_router(public)
    app.include_router(api)
    if config.clip_retrieval_api:
        clip_retrieval.install(app)

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    _add_docs(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=config.max_upload_bytes * 4 // 3 + _BODY_SLACK)
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)
    if config.cors_origins:  # outermost, so that errors (413...) carry the CORS headers too
        app.add_middleware(CORSMiddleware, allow_origins=list(config.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    return app


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    app.state.watchers.start()
    yield
    app.state.watchers.stop()
    close_collections(app.state.served)  # follow threads stop; leases go (a next writer reclaims the files)


def _add_docs(app: FastAPI) -> None:
    """Swagger UI at /docs, served from the ``swagger-ui-bundle`` package rather than FastAPI's
    default CDN, so the page works on machines without internet (as a team server often is)."""
    from swagger_ui_bundle import swagger_ui_path

    app.mount("/docs-static", StaticFiles(directory=str(swagger_ui_path)), name="docs-static")

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url=app.openapi_url, title="vlsearch API",
                                   swagger_js_url="/docs-static/swagger-ui-bundle.js",
                                   swagger_css_url="/docs-static/swagger-ui.css",
                                   swagger_favicon_url="/docs-static/favicon-32x32.png")


def serve(collections: Mapping[str, CollectionSpec] | list[CollectionSpec], config: ServeConfig = ServeConfig(),
          on_ready: Callable[[FastAPI, ServeConfig], Any] | None = None, on_watch: OnWatch | None = None) -> None:
    """Open the collections and serve them until interrupted (uvicorn, one process); ``on_watch``:
    see :func:`create_app`."""
    import uvicorn

    app = create_app(collections, config, on_watch)
    if on_ready is not None:
        on_ready(app, config)
    uvicorn.run(app, host=config.host, port=config.port, log_level=config.log_level, access_log=False,
                server_header=False)


@contextmanager
def background_server(app: FastAPI, host: str = "127.0.0.1", port: int = 0, timeout: float = 30.0) -> Iterator[str]:
    """Serve ``app`` with uvicorn in a daemon thread (port 0: a free one); yields its base URL and
    stops it on exit. For notebooks, tests and scripts; ``serve`` is the command-line way."""
    import uvicorn

    # Bound here: a taken port raises its own OSError at once, and port 0's pick is known before
    # uvicorn starts (which closes the socket on shutdown).
    sock = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    bound = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=bound, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="vlsearch-serve", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            server.should_exit = True
            sock.close()
            raise RuntimeError(f"the server did not start on {host}:{bound}")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{bound}"
    finally:
        server.should_exit = True
        thread.join(timeout=timeout)
