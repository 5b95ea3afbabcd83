"""``Client``: search a ``vlsearch serve`` server with the same calls as a local ``Searcher``.

::

    from vlsearch import Client
    c = Client("http://127.0.0.1:8000", token=None)       # collection: the server's only one
    hits = c.search_text("a dog running on the beach", k=10)   # list[Hit], as Searcher gives
    hits = c.search_image("query.jpg", k=5, exact=True)
    batch = c.search_vector(vectors, k=10, nprobe=32)           # (Q, d) -> list[list[Hit]]
    more = c.more_like_this(hits[0].id, k=10)
    hits = c.search_terms([("a golden retriever", 2.0), (Path("pool.jpg"), 1.0), ("fruit", -1.0)])
    recs = c.more_like([12, 40], negative_ids=[7], k=10)
    hits = c.search_text("sunset", k=10, min_score=0.2, order_by="file_mtime_ns DESC", facets=["folder"])
    hits.facets                                                 # ShapedHits, as Searcher gives

Errors come back as the server's vlsearch exception types (InvalidQueryError, ItemNotFoundError,
IndexNotBuiltError...), or RemoteError when there is no more specific one. Needs ``httpx``
(``pip install 'vlsearch[client]'``). Thread-safe: one connection pool per client.
"""

from __future__ import annotations

import base64
import io
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from vlsearch.core import errors as E
from vlsearch.core.inputs import ImageInput
from vlsearch.query.results import Hit, Hits, Results
from vlsearch.query.terms import NEGATIVE_WEIGHT, Item, Query, TermLike, check_examples
from vlsearch.query.shaping import ShapedHits

if TYPE_CHECKING:  # pragma: no cover
    import httpx


class Client:
    """A remote collection. ``collection``: its name on the server (None: the server's only one)."""

    def __init__(self, url: str, token: str | None = None, collection: str | None = None, timeout: float = 60.0,
                 transport: "httpx.BaseTransport | None" = None):
        try:
            import httpx
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise ImportError("vlsearch.Client needs httpx: pip install 'vlsearch[client]'") from exc
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.url = url.rstrip("/")
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout, transport=transport)
        self._collection = collection

    # ---- the server ------------------------------------------------------------------------
    def collections(self) -> list[dict[str, Any]]:
        """The server's collections: name, images, dim, model, index, source, filters."""
        return self._call("GET", "/api/collections")

    @property
    def collection(self) -> str:
        """The collection searched (resolved on first use when not given)."""
        if self._collection is None:
            names = [c["name"] for c in self.collections()]
            if len(names) != 1:
                raise E.InvalidQueryError(
                    f"the server has collections {names}: choose one with Client(..., collection=)")
            self._collection = names[0]
        return self._collection

    # ---- searches (Searcher's signatures) --------------------------------------------------
    def search_text(self, text: str | Sequence[str], k: int = 10, nprobe: int | None = None, exact: bool = False,
                    k_factor: float | None = None, **options: Any) -> Hits | Results:
        """Search by caption text: a string gives ``list[Hit]``, a list of strings ``list[list[Hit]]``.
        ``options``: the request's other fields (``where``, ``rerank``, ``offset``, ``mode="keyword"`` or
        ``mode="hybrid"`` with ``alpha=`` (see :meth:`vlsearch.query.searcher.Searcher.search_text`), and
        the shaping ones: ``min_score``, ``autocut``, ``group_by``, ``per_group``, ``order_by``, ``depth``,
        ``facets``, ``dedup`` (``True`` or a cosine threshold: near-duplicate hits collapsed into one), which
        make the hits a :class:`~vlsearch.query.shaping.ShapedHits` with ``.facets``)."""
        single = isinstance(text, str)
        texts = [text] if single else list(text)
        return self._many([{"text": t} for t in texts], single, k, nprobe, exact, k_factor, options)

    def search_image(self, image: ImageInput | Sequence[ImageInput], k: int = 10, nprobe: int | None = None,
                     exact: bool = False, k_factor: float | None = None, **options: Any) -> Hits | Results:
        """Search by example image (path, PIL image or encoded bytes, or a list of them); uploaded."""
        single = not isinstance(image, (list, tuple))
        images = [image] if single else list(image)
        params = _params(k, nprobe, exact, k_factor, options)
        form = {key: [str(v) for v in value] if isinstance(value, (list, tuple)) else
                str(value).lower() if isinstance(value, bool) else str(value) for key, value in params.items()}
        results = Results()
        for img in images:
            files = {"file": ("query", _image_bytes(img), "application/octet-stream")}
            body = self._call("POST", f"/api/collections/{self.collection}/search/image", data=form, files=files)
            results.append(_hits(body))
        return results[0] if single else results

    def search_vector(self, vector: np.ndarray, k: int = 10, nprobe: int | None = None, exact: bool = False,
                      k_factor: float | None = None, **options: Any) -> Hits | Results:
        """Search by embedding: ``(d,)`` gives ``list[Hit]``, ``(Q, d)`` gives ``list[list[Hit]]``."""
        arr = np.asarray(vector, dtype=np.float32)
        if arr.ndim not in (1, 2):
            raise E.InvalidQueryError(f"query vectors must have shape (d,) or (Q, d), got {arr.shape}")
        rows = [arr] if arr.ndim == 1 else list(arr)
        return self._many([{"vector": r.tolist()} for r in rows], arr.ndim == 1, k, nprobe, exact, k_factor, options)

    def more_like_this(self, item_id: int, k: int = 10, nprobe: int | None = None, exact: bool = False,
                       k_factor: float | None = None, **options: Any) -> Hits:
        """Items most similar to the indexed item ``item_id`` (itself left out)."""
        return self._many([{"id": str(item_id)}], True, k, nprobe, exact, k_factor, options)

    def search_terms(self, query: Query | TermLike | Sequence[TermLike], k: int = 10, nprobe: int | None = None,
                     exact: bool = False, k_factor: float | None = None, **options: Any) -> Hits:
        """Search by weighted terms, as :meth:`Searcher.search`: texts, images (path, bytes, PIL;
        uploaded) and ``Item(id)``s, e.g. ``[("a dog", 2.0), (Path("pool.jpg"), 1.0), ("fruit", -1.0)]``."""
        terms = [{**_term_json(t.value), "weight": t.weight} for t in Query.of(query).terms]
        return self._many([{"terms": terms}], True, k, nprobe, exact, k_factor, options)

    def more_like(self, positive_ids: Sequence[int], negative_ids: Sequence[int] = (), k: int = 10,
                  negative_weight: float = NEGATIVE_WEIGHT, exclude_examples: bool = True,
                  nprobe: int | None = None, exact: bool = False, k_factor: float | None = None,
                  **options: Any) -> Hits:
        """Items like the positive examples and unlike the negative ones, as :meth:`Searcher.more_like`."""
        pos, neg = check_examples(positive_ids, negative_ids)
        body = {"positive_ids": [str(i) for i in pos], "negative_ids": [str(i) for i in neg],
                "negative_weight": negative_weight, "exclude_examples": exclude_examples,
                **_params(k, nprobe, exact, k_factor, options)}
        return _hits(self._call("POST", f"/api/collections/{self.collection}/more_like", json=body))

    # ---- items -----------------------------------------------------------------------------
    def item(self, item_id: int) -> dict[str, Any]:
        """An item's path, captions and metadata."""
        return self._call("GET", f"/api/collections/{self.collection}/items/{int(item_id)}")

    def image(self, item_id: int) -> bytes:
        """The item's image file."""
        return self._call("GET", f"/api/collections/{self.collection}/items/{int(item_id)}/image", raw=True)

    def thumbnail(self, item_id: int, size: int = 256) -> bytes:
        """A JPEG thumbnail of the item."""
        return self._call("GET", f"/api/collections/{self.collection}/items/{int(item_id)}/thumbnail",
                          params={"size": size}, raw=True)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client({self.url!r}, collection={self._collection!r})"

    # ---- internals -------------------------------------------------------------------------
    def _many(self, queries: list[dict[str, Any]], single: bool, k: int, nprobe: int | None, exact: bool,
              k_factor: float | None, options: dict[str, Any]) -> Hits | Results:
        if not queries:
            raise E.InvalidQueryError("no query given (empty list)")
        params = _params(k, nprobe, exact, k_factor, options)
        path = f"/api/collections/{self.collection}/search"
        results = Results(_hits(self._call("POST", path, json={**q, **params})) for q in queries)
        return results[0] if single else results

    def _call(self, method: str, path: str, raw: bool = False, **kwargs: Any) -> Any:
        import httpx

        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise E.RemoteError(0, f"cannot reach {self.url}: {exc}") from exc
        if response.status_code >= 400:
            raise _error(response)
        return response.content if raw else response.json()


def _params(k: int, nprobe: int | None, exact: bool, k_factor: float | None, options: dict[str, Any]) -> dict[str, Any]:
    params = {"k": k, "exact": exact, "nprobe": nprobe, "k_factor": k_factor, **options}
    return {key: value for key, value in params.items() if value is not None}


def _hits(body: dict[str, Any]) -> Hits:
    hits = [Hit(id=int(h["id"]), score=float(h["score"]), rank=int(h["rank"]), path=h["path"],
                caption=h["caption"], metadata=h["metadata"]) for h in body["hits"]]
    if body.get("relevant") is None and body.get("facets") is None:
        return Hits(hits)
    facets = {column: {v["value"]: int(v["count"]) for v in values} for column, values in (body.get("facets") or {}).items()}
    return ShapedHits(hits, facets=facets, relevant=body.get("relevant"))


def _term_json(value: Any) -> dict[str, Any]:
    """A term's value as the ``terms`` list of a search body has it."""
    if isinstance(value, str):
        return {"text": value}
    if isinstance(value, Item):
        return {"id": str(value.id)}
    return {"image_base64": base64.b64encode(_image_bytes(value)).decode("ascii")}


def _image_bytes(img: Any) -> bytes:
    if isinstance(img, (bytes, bytearray, memoryview)):
        return bytes(img)
    if isinstance(img, (str, os.PathLike)):
        try:
            return Path(img).read_bytes()
        except OSError as exc:
            raise E.InvalidQueryError(f"cannot read query image {img}: {exc}") from exc
    if hasattr(img, "save"):  # a PIL image
        out = io.BytesIO()
        img.save(out, format="PNG")
        return out.getvalue()
    raise E.InvalidQueryError(f"query image is a {type(img).__name__}: give a file path, a PIL image or encoded bytes")


def _error(response: Any) -> E.VlsearchError:
    """The server's error as the local exception type it names (RemoteError if none fits)."""
    try:
        body = response.json()
        message, name = str(body.get("error", body)), str(body.get("type", ""))
    except ValueError:
        message, name = response.text[:500], ""
    cls = getattr(E, name, None)
    if isinstance(cls, type) and issubclass(cls, E.VlsearchError) and cls not in (E.VlsearchError, E.RemoteError,
                                                                                  E.DecodeError):
        return cls(message)
    return E.RemoteError(response.status_code, message)
