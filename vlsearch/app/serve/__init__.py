"""``vlsearch serve``: an HTTP API and a web page over one or more collections.

::

    from vlsearch.app.serve import ServeConfig, create_app, serve
    app = create_app({"photos": "collections/photos"}, ServeConfig())   # an ASGI app (FastAPI)
    serve(["collections/photos"], ServeConfig(port=8000))                 # or run it with uvicorn

Modules: ``config`` (ServeConfig, binding rules), ``service`` (collections, shared models,
search and items), ``images`` (item images, thumbnails, byte-bounded cache), ``schemas``
(request/response models), ``routes`` (endpoints, bearer-token check), ``errors`` (error -> status code),
``metrics`` (Prometheus), ``app`` (factory, body limit); ``static/`` holds the page.
"""

from vlsearch.app.serve.app import background_server, create_app, serve
from vlsearch.app.serve.config import ServeConfig

__all__ = ["ServeConfig", "background_server", "create_app", "serve"]
