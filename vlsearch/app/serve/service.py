"""The served collections: one Searcher each, models shared, and the search/item operations
the HTTP routes call (no HTTP here, so the same logic is tested directly)."""

from __future__ import annotations

import functools
import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Union

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vlsearch.core.errors import InvalidQueryError, ItemNotFoundError, ServeConfigError
from vlsearch.core.cache import ByteLRU
from vlsearch.query.embedding import TextQuery
from vlsearch.query.results import Hit
from vlsearch.query.searcher import Searcher
from vlsearch.query.terms import NEGATIVE_WEIGHT
from vlsearch.store.keyword.index import text_columns

from vlsearch.app.serve.config import ServeConfig
from vlsearch.app.serve.images import ItemImages

CollectionSpec = Union[str, os.PathLike, Searcher]
log = logging.getLogger(__name__)
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class SearchOptions:
    """Per-request search parameters (validated by the request models)."""

    k: int = 10
    offset: int = 0
    nprobe: int | None = None
    k_factor: float | None = None
    exact: bool = False
    where: str | None = None
    rerank: int = 0  #: text queries: re-score the top ``rerank`` (see Searcher.search_text)
    mode: str = "vector"  #: text queries: vector, keyword or hybrid (see vlsearch.query.hybrid)
    alpha: float | None = None  #: mode hybrid: weighted fusion instead of RRF
    #: shaping the list (see :mod:`vlsearch.query.shaping`)
    min_score: float | None = None
    autocut: int | None = None
    group_by: str | None = None
    per_group: int | None = None
    order_by: str | None = None
    depth: int | None = None
    facets: tuple[str, ...] | None = None
    dedup: bool | float | None = None  #: collapse near-duplicate hits (see :mod:`vlsearch.query.shaping`)

    def shaping(self) -> dict[str, Any]:
        """The shaping arguments given (none: an empty dict, so the plain search runs)."""
        given = dict(min_score=self.min_score, autocut=self.autocut, group_by=self.group_by,
                     per_group=self.per_group, order_by=self.order_by, depth=self.depth,
                     facets=None if self.facets is None else list(self.facets),
                     dedup=None if self.dedup is False else self.dedup)
        return {key: value for key, value in given.items() if value is not None}


@dataclass(frozen=True)
class Examples:
    """A ``more_like`` query (see :meth:`Searcher.more_like`)."""

    positive_ids: list[int]
    negative_ids: list[int]
    negative_weight: float = NEGATIVE_WEIGHT
    exclude_examples: bool = True


@dataclass
class SearchOutcome:
    hits: list[Hit]
    embed_ms: float
    search_ms: float
    facets: dict[str, dict[Any, int]] | None = None  #: with ``facets``: counts among the relevant set
    relevant: int | None = None  #: with shaping: the relevant set's size
    version: int | None = None  #: the collection version the hits come from


def columns_info(schema: pa.Schema) -> dict[str, list[str]]:
    """An images shard schema's ``columns`` (what ``where`` may name) and ``facets``: the columns
    the page counts, every text metadata column, then ``folder`` (the directory part of ``path``,
    a pseudo-column of ``facets``) unless a column has that name; and ``list_columns``, those holding
    lists (``captions``, ``tags``): not sortable or groupable, filtered by element."""
    columns = [n for n in schema.names if n != "embedding"]
    text = text_columns(schema)  # the text metadata columns, as the keyword index defines them
    folder = ["folder"] if "path" in columns and "folder" not in (c.lower() for c in columns) else []
    lists = [f.name for f in schema if f.name in columns
             and (pa.types.is_list(f.type) or pa.types.is_large_list(f.type) or pa.types.is_fixed_size_list(f.type))]
    return {"columns": columns, "facets": text + folder, "list_columns": lists}


class ModelPool:
    """Loads each (model name, pretrained) once and hands the same Encoder to every collection."""

    def __init__(self, device: str):
        self.device = device
        self._models: dict[tuple[str, str | None], Any] = {}
        self._lock = threading.Lock()

    def get(self, name: str, pretrained: str | None) -> Any:
        with self._lock:
            key = (name, pretrained)
            if key not in self._models:
                from vlsearch.models.factory import load_model

                self._models[key] = load_model(name, pretrained, device=self.device)
            return self._models[key]

    def __len__(self) -> int:
        return len(self._models)


class ServedCollection:
    """One collection behind the server: its Searcher (which may follow the collection's new
    versions), its item images and stored vectors. Each operation takes one
    :meth:`Searcher.snapshot`, so its search, hits and item reads all see one version.
    ``owned``: the server opened the Searcher, and :meth:`close` closes it."""

    def __init__(self, name: str, searcher: Searcher, images: ItemImages, owned: bool = False):
        self.name = name
        self.searcher = searcher
        self.images = images
        self.owned = owned

    def info(self) -> dict[str, Any]:
        s = self.searcher.snapshot()
        m = s.collection.manifest
        index = m.index or None
        return {
            "name": self.name, "images": len(s.row_locator), "dim": s.dim,
            "model": {"name": m.model.name, "pretrained": m.model.pretrained, "dim": m.model.dim},
            "index": None if index is None else {k: index.get(k) for k in ("factory", "metric", "ntotal",
                                                                          "nprobe_default")},
            "source": m.source.get("type"), "filters": True, "version": s.version, "loaded_at": s.loaded_at,
            **columns_info(pq.read_schema(s.row_locator.paths[0]) if s.row_locator.paths else pa.schema([])),
        }

    def served_version(self) -> dict[str, Any]:
        """The version served now and when it was loaded."""
        s = self.searcher.snapshot()
        return {"version": s.version, "loaded_at": s.loaded_at}

    def close(self) -> None:
        """Close the Searcher if the server opened it (stops following, lets go of its lease)."""
        if self.owned:
            self.searcher.close()

    # ---- items -----------------------------------------------------------------------------
    def _locate(self, s: Searcher, item_id: int) -> tuple[np.ndarray, np.ndarray]:
        shard, row, found = s.row_locator.locate(np.array([item_id], np.int64))
        if not found[0]:
            raise ItemNotFoundError(f"collection {self.name!r} has no item {item_id}")
        return shard, row

    def record(self, item_id: int) -> dict[str, Any]:
        """The item's row (without its embedding); ItemNotFoundError for an unknown id."""
        s = self.searcher.snapshot()
        return s.metadata_reader.rows(*self._locate(s, item_id))[0]

    def vector(self, item_id: int, s: Searcher | None = None) -> np.ndarray:
        """The item's stored embedding (float32), from version ``s`` (default: the one served now)."""
        try:
            return (s or self.searcher.snapshot()).item_vector(item_id)
        except ItemNotFoundError:
            raise ItemNotFoundError(f"collection {self.name!r} has no item {item_id}") from None

    # ---- search ----------------------------------------------------------------------------
    def search(self, query: str, value: Any, opts: SearchOptions) -> SearchOutcome:
        """Search by ``query`` kind: ``text`` (str), ``image`` (PIL image), ``vector``, ``id``,
        ``terms`` (a :class:`~vlsearch.query.terms.Query`) or ``more_like`` (:class:`Examples`).
        Returns hits ``offset .. offset+k`` of the ranking (ranks stay global)."""
        if opts.rerank and query != "text":
            raise InvalidQueryError("rerank re-scores text queries only")
        start = time.perf_counter()
        s = self.searcher.snapshot()
        wanted = opts.k + opts.offset
        params = dict(k=wanted, nprobe=opts.nprobe, exact=opts.exact, k_factor=opts.k_factor, **self._filter(opts.where),
                      **opts.shaping())
        if opts.mode != "vector":  # keyword / hybrid: the Searcher embeds (hybrid) or not (keyword)
            embedded = start
            hits = s.search_text(value, rerank=opts.rerank, mode=opts.mode, alpha=opts.alpha, **params)
        else:
            embedded_query, exclude = self._embed(s, query, value, tokens=bool(opts.rerank))
            embedded = time.perf_counter()
            if isinstance(embedded_query, TextQuery):  # one path with Searcher.search_text: the text is embedded once
                hits = s.search_text_query(embedded_query, rerank=opts.rerank, **params)[0]
            else:  # "more like this" leaves out the item itself, terms and more_like their example items
                hits = s.search_vector(embedded_query, exclude=exclude, **params)
        facets, relevant = getattr(hits, "facets", None), getattr(hits, "relevant", None)
        done = time.perf_counter()
        return SearchOutcome(list(hits[opts.offset: opts.offset + opts.k]), (embedded - start) * 1e3,
                             (done - embedded) * 1e3, facets=facets if opts.facets else None, relevant=relevant,
                             version=s.version)

    def _embed(self, s: Searcher, query: str, value: Any, tokens: bool) -> tuple[TextQuery | np.ndarray, list[int]]:
        """The query embedded (a TextQuery for text, with token states when re-ranked; else a
        vector) and the item ids to leave out of the hits (those of ``id``, ``terms`` and
        ``more_like`` queries, read from ``s``)."""
        if query == "text":
            return s.text_query([value], tokens=tokens), []
        if query == "image":
            return s.embed_images([value])[0], []
        if query == "id":
            return self.vector(value, s), [int(value)]
        if query == "terms":  # value: a vlsearch.query.terms.Query
            return s.query_vector(value), value.items
        if query == "more_like":  # value: an Examples
            return (s.more_like_vector(value.positive_ids, value.negative_ids, value.negative_weight),
                    [*value.positive_ids, *value.negative_ids] if value.exclude_examples else [])
        return np.asarray(value, dtype=np.float32), []

    @staticmethod
    def _filter(where: str | None) -> dict[str, Any]:
        return {"where": where} if where is not None and where.strip() else {}


def collection_name(spec: CollectionSpec) -> str:
    """The default name of a collection: its folder's name."""
    path = spec.collection.path if isinstance(spec, Searcher) else Path(spec)
    return Path(path).resolve().name


def open_collections(collections: Mapping[str, CollectionSpec] | list[CollectionSpec],
                     config: ServeConfig) -> dict[str, ServedCollection]:
    """Open every collection (paths or ready Searchers), loading each model once for all of them."""
    items = collections.items() if isinstance(collections, Mapping) else [
        (collection_name(c), c) for c in collections]
    served: dict[str, ServedCollection] = {}
    try:
        _open_each(items, config, served)
    except BaseException:
        close_collections(served)  # no follow thread or lease outlives a failed start
        raise
    if not served:
        raise ServeConfigError("no collection to serve")
    return served


def _open_each(items: Any, config: ServeConfig, served: dict[str, ServedCollection]) -> None:
    pool, cache = ModelPool(config.device), ByteLRU(config.thumbnail_cache_bytes)
    for name, spec in items:
        if not _NAME_RE.match(name):
            raise ServeConfigError(f"collection name {name!r} must be 1-64 letters, digits, '.', '_' or '-'")
        if name in served:
            raise ServeConfigError(f"two collections are named {name!r}: name them with NAME=PATH")
        searcher = spec if isinstance(spec, Searcher) else _open(spec, pool, config)
        source = searcher.collection.manifest.source
        served[name] = ServedCollection(name, searcher, ItemImages(name, source, cache, config.max_image_pixels),
                                        owned=searcher is not spec)


def close_collections(served: Mapping[str, ServedCollection]) -> None:
    """Close the Searchers the server opened (their follow threads stop, their leases go)."""
    for coll in served.values():
        coll.close()


def _open(path: str | os.PathLike, pool: ModelPool, config: ServeConfig) -> Searcher:
    from vlsearch.store.collection import Collection

    model = Collection.open(path).manifest.model
    encoder = pool.get(model.name, model.pretrained)
    return Searcher.open(path, mmap=config.mmap, device=config.device, encoder=encoder,
                         follow=False if config.pin_version else config.follow_interval,
                         on_refresh_error=functools.partial(_refresh_failed, path), **config.searcher_options)


def _refresh_failed(path: str | os.PathLike, exc: Exception) -> None:
    log.warning("collection %s: a new version could not be loaded, the served one stays: %s", path, exc)


def parse_specs(args: list[str]) -> dict[str, str]:
    """``["photos=/data/c1", "/data/c2"]`` -> ``{"photos": "/data/c1", "c2": "/data/c2"}``."""
    specs: dict[str, str] = {}
    for arg in args:
        name, sep, path = arg.partition("=")
        if not sep or os.path.exists(arg):
            name, path = collection_name(arg), arg
        if name in specs:
            raise ServeConfigError(f"two collections are named {name!r}: name them with NAME=PATH")
        specs[name] = path
    return specs


__all__ = ["Examples", "ModelPool", "SearchOptions", "ServedCollection", "close_collections", "columns_info",
           "open_collections", "parse_specs"]
