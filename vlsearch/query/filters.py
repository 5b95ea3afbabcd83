"""Metadata filters for search: ``where="width >= 1000 AND label = 'dog'"``.

A filter is a SQL boolean expression over the image shards' non-embedding columns (``id``,
``path``, ``width``, ``height``, ``captions`` and every extra metadata column), plus the
per-caption pseudo-column ``caption``. It is evaluated by DuckDB over an in-memory copy of those
columns (:class:`FilterEngine`); the result is the sorted array of matching image ids, which the
search then restricts itself to (see :mod:`vlsearch.query.subset`).

**A filter is data, never code.** :func:`compile_filter` parses the text with DuckDB's own
parser (``json_serialize_sql`` of ``SELECT id FROM images WHERE <filter>``) and accepts it only
if the statement is exactly that one SELECT and every node of the WHERE tree is an allowed kind
(:data:`ALLOWED_CLASSES`, :data:`ALLOWED_OPERATORS`, :data:`ALLOWED_FUNCTIONS`) naming known
columns. What runs is SQL regenerated from that checked tree (``json_deserialize_sql``), never
the user's text. As defence in depth the engine's connection has no file system or network
access, loads no extension and has its configuration locked.

Semantics of ``caption``: a filter that mentions ``caption`` is true for an image when it holds
for at least one of its captions (an image without captions is tested once, with
``caption = NULL``). ``captions`` is the list itself: ``len(captions) >= 5``,
``list_contains(captions, 'a dog.')``.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vlsearch.core.cache import ByteLRU
from vlsearch.core.errors import InvalidQueryError
from vlsearch.data.photo import with_folder

if TYPE_CHECKING:  # pragma: no cover
    from pathlib import Path

#: The table a filter reads, and its per-caption view (one row per caption).
TABLE, CAPTION_VIEW = "images", "image_captions"
#: The per-caption pseudo-column (see the module docstring).
CAPTION = "caption"
#: Longest accepted filter text (characters) and deepest expression tree.
MAX_FILTER_CHARS = 8192
MAX_DEPTH = 64
#: Checked filters kept per engine: 1 MiB, ~4,000 filters of one or two conditions (200-350 bytes each).
COMPILED_CACHE_BYTES = 1 << 20

#: Expression node kinds a filter may contain (DuckDB parse-tree classes).
ALLOWED_CLASSES = frozenset({
    "CONJUNCTION", "COMPARISON", "OPERATOR", "BETWEEN", "CONSTANT", "COLUMN_REF", "FUNCTION",
    "CAST", "TYPE", "CASE",
})
#: Node types of class OPERATOR: NOT, IS [NOT] NULL, [NOT] IN (list), COALESCE, list[i].
ALLOWED_OPERATORS = frozenset({
    "OPERATOR_NOT", "OPERATOR_IS_NULL", "OPERATOR_IS_NOT_NULL", "COMPARE_IN", "COMPARE_NOT_IN",
    "OPERATOR_COALESCE", "ARRAY_EXTRACT",
})
#: Scalar functions and operators (DuckDB names: ``~~`` is LIKE, ``~~*`` ILIKE, ``~~~`` GLOB,
#: ``regexp_full_match`` SIMILAR TO). No table function, no file/network/setting access.
ALLOWED_FUNCTIONS = frozenset({
    "+", "-", "*", "/", "//", "%", "**", "^", "||",
    "~~", "!~~", "~~*", "!~~*", "~~~", "regexp_full_match", "regexp_matches",
    "lower", "upper", "length", "len", "strlen", "trim", "starts_with", "ends_with", "suffix",
    "prefix", "contains", "abs", "round", "floor", "ceil", "sqrt", "least", "greatest", "nullif",
    "list_value", "list_contains", "list_has", "list_has_any", "list_has_all", "array_length",
    "array_contains",
})
_PREFIX = f"SELECT id FROM {TABLE} WHERE "
_TEMPLATE = _PREFIX + "TRUE"


@dataclass(frozen=True)
class CompiledFilter:
    """A checked filter: ``where`` as given, ``sql`` the statement regenerated from its checked
    parse tree (what the engine runs), ``columns`` it reads, ``per_caption`` whether it uses
    ``caption``."""

    where: str
    sql: str
    columns: tuple[str, ...]
    per_caption: bool

    def matching_ids(self, engine: "FilterEngine") -> np.ndarray:
        """Sorted unique int64 ids of the images that pass."""
        return engine.matching_ids(self)

    @property
    def nbytes(self) -> int:
        """Memory held by its strings (what a cache of compiled filters counts)."""
        return sum(sys.getsizeof(text) for text in (self.where, self.sql, *self.columns))


# ---- parsing and checking -------------------------------------------------------------------

_parser_lock = threading.Lock()
_parser: Any = None


def _locked_connection(threads: int = 1, memory_limit: str = "256MB") -> Any:
    """A DuckDB in-memory connection with no file/network access and no extension loading.
    Call :func:`_lock` on it once its tables exist."""
    import duckdb

    return duckdb.connect(":memory:", config={
        "enable_external_access": False, "autoload_known_extensions": False,
        "autoinstall_known_extensions": False, "allow_community_extensions": False,
        "threads": int(threads), "memory_limit": memory_limit,
    })


def _lock(con: Any) -> None:
    con.execute("SET lock_configuration = true")


def _serialize(sql: str) -> dict[str, Any]:
    """DuckDB's parse tree of ``sql`` as JSON (nothing is executed)."""
    global _parser
    with _parser_lock:
        if _parser is None:
            _parser = _locked_connection()
            _lock(_parser)
        text = _parser.execute("SELECT json_serialize_sql(?)", [sql]).fetchone()[0]
        return json.loads(text)


def _deserialize(tree: dict[str, Any]) -> str:
    with _parser_lock:
        return _parser.execute("SELECT json_deserialize_sql(?::JSON)", [json.dumps(tree)]).fetchone()[0]


@functools.lru_cache(maxsize=1)
def _template() -> dict[str, Any]:
    """The parse tree every filter's statement must equal, WHERE clause and positions aside."""
    return _strip_locations({**_serialize(_TEMPLATE)["statements"][0]["node"], "where_clause": None})


def _strip_locations(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _strip_locations(v) for k, v in node.items() if not k.startswith("query_location")}
    if isinstance(node, list):
        return [_strip_locations(v) for v in node]
    return node


def compile_filter(where: str, columns: pa.Schema | Iterable[str]) -> CompiledFilter:
    """Parse and check ``where`` against the table's ``columns`` (a schema or names).

    Raises InvalidQueryError naming the problem: bad syntax, more than one statement, anything
    that is not a boolean expression over known columns with allowed operators and functions.
    """
    if not isinstance(where, str):
        raise InvalidQueryError(f"a filter must be a string, got {type(where).__name__}")
    if not where.strip():
        raise InvalidQueryError("empty filter: give a condition such as \"width >= 1000\", or no filter")
    if len(where) > MAX_FILTER_CHARS:
        raise InvalidQueryError(f"filter is {len(where)} characters long, the limit is {MAX_FILTER_CHARS}")
    names = list(columns.names if isinstance(columns, pa.Schema) else columns)
    known = {n.lower(): n for n in names if n != "embedding"}
    if CAPTION not in known and "captions" in known:
        known[CAPTION] = CAPTION
    parsed = _serialize(_PREFIX + where)
    if parsed.get("error"):
        message = str(parsed.get("error_message") or "syntax error")
        if "Only SELECT statements" in message:  # a second statement after ';'
            message = "a filter is one condition; it cannot hold ';' and further statements"
        raise InvalidQueryError(f"invalid filter {where!r}: {message}")
    statements = parsed.get("statements") or []
    if len(statements) != 1:
        raise InvalidQueryError(f"invalid filter {where!r}: it must be one condition, not several statements")
    node = statements[0].get("node") or {}
    where_tree = node.get("where_clause") if node.get("type") == "SELECT_NODE" else None
    if where_tree is None or _strip_locations({**node, "where_clause": None}) != _template():
        raise InvalidQueryError(
            f"invalid filter {where!r}: only a condition is allowed (no ORDER BY, LIMIT, GROUP BY, UNION...)")
    used: set[str] = set()
    _check_node(where_tree, known, used, where, 0)
    per_caption = CAPTION in used and known[CAPTION] == CAPTION and CAPTION not in (n.lower() for n in names)
    if per_caption:
        node = {**node, "from_table": {**node["from_table"], "table_name": CAPTION_VIEW,
                                       "qualified_name": {"path": [CAPTION_VIEW]}}}
    sql = _deserialize({**parsed, "statements": [{**statements[0], "node": node}]})
    return CompiledFilter(where=where, sql=sql, columns=tuple(sorted(used)), per_caption=per_caption)


def _check_node(node: Any, known: dict[str, str], used: set[str], where: str, depth: int) -> None:
    """Walk the WHERE tree; raise InvalidQueryError at the first node that is not allowed."""
    if depth > MAX_DEPTH:
        raise InvalidQueryError(f"filter {where!r} is nested more than {MAX_DEPTH} levels deep")
    if isinstance(node, list):
        for child in node:
            _check_node(child, known, used, where, depth + 1)
        return
    if not isinstance(node, dict):
        return
    cls = node.get("class")
    if cls is not None:
        _check_expression(node, cls, known, used, where)
    for key, child in node.items():
        if isinstance(child, (dict, list)):
            _check_node(child, known, used, where, depth + 1)


def _check_expression(node: dict[str, Any], cls: str, known: dict[str, str], used: set[str], where: str) -> None:
    kind = node.get("type", "")
    if cls not in ALLOWED_CLASSES:
        what = {"SUBQUERY": "a subquery", "STAR": "* / COLUMNS(...)", "PARAMETER": "a parameter",
                "LAMBDA": "a lambda", "WINDOW": "a window or aggregate function"}.get(cls, cls.lower())
        raise InvalidQueryError(f"filter {where!r} uses {what}, which filters do not allow")
    if cls == "OPERATOR" and kind not in ALLOWED_OPERATORS:
        raise InvalidQueryError(f"filter {where!r} uses operator {kind}, which filters do not allow")
    if cls == "COLUMN_REF":
        parts = node.get("column_names") or []
        if len(parts) != 1:
            raise InvalidQueryError(f"filter {where!r}: qualified name {'.'.join(parts)!r} is not supported; "
                                    "name a column alone")
        name = known.get(parts[0].lower())
        if name is None:
            raise InvalidQueryError(f"filter {where!r} names unknown column {parts[0]!r}; columns: "
                                    f"{', '.join(sorted(known.values()))}")
        used.add(name)
    if cls == "FUNCTION":
        name = str(node.get("function_name", "")).lower()
        qualified = node.get("schema") or node.get("catalog")
        extras = node.get("filter") or (node.get("order_bys") or {}).get("orders") or node.get("distinct") \
            or node.get("export_state") or any(a.get("name") for a in node.get("arguments") or [])
        if name not in ALLOWED_FUNCTIONS or qualified or extras:
            raise InvalidQueryError(f"filter {where!r} calls {name!r}, which filters do not allow; allowed functions: "
                                    f"{', '.join(sorted(f for f in ALLOWED_FUNCTIONS if f.isidentifier()))}")


# ---- evaluation -------------------------------------------------------------------------------

def read_metadata(shard_paths: Sequence["Path"], collection: Any = None) -> pa.Table:
    """Every non-embedding column of the image shards, in shard order (the embedding is never read);
    with ``collection``, only its live rows (a deleted or replaced row never matches a filter).
    ``folder`` is filled from ``path`` for rows of shards written before that column."""
    tables = []
    for path in shard_paths:
        pf = pq.ParquetFile(path)
        table = pf.read(columns=[n for n in pf.schema_arrow.names if n != "embedding"])
        live = None if collection is None else collection.live_mask(path, table.column("id").to_numpy().astype(np.int64))
        tables.append(table if live is None else table.filter(pa.array(live)))
    if not tables:
        return pa.table({"id": pa.array([], pa.int64())})
    table = pa.concat_tables(tables, promote_options="permissive")
    return with_folder(table) if "path" in table.column_names else table


class FilterEngine:
    """A locked DuckDB connection holding one collection version's metadata (no embeddings).

    Thread-safe (one query at a time). Build one per collection version: the table is a copy,
    taken when the engine is built. Memory: about the size of the metadata columns in Arrow
    (``nbytes``), ~60 MiB for 1M images with short paths.
    """

    def __init__(self, table: pa.Table, threads: int | None = None):
        self.columns = tuple(table.column_names)
        self.schema = table.schema
        self.num_rows = table.num_rows
        self.nbytes = table.nbytes
        limit = max(1 << 30, 4 * table.nbytes)
        self._con = _locked_connection(threads or min(4, os.cpu_count() or 1), f"{limit >> 20}MB")
        self._con.register("_source", table)
        self._con.execute(f"CREATE TABLE {TABLE} AS SELECT * FROM _source")
        self._con.unregister("_source")
        if "captions" in self.columns and CAPTION not in (c.lower() for c in self.columns):
            self._con.execute(
                f"CREATE VIEW {CAPTION_VIEW} AS SELECT *, unnest(CASE WHEN len(captions) > 0 THEN captions "
                f"ELSE [NULL::VARCHAR] END) AS {CAPTION} FROM {TABLE}")
        _lock(self._con)
        self._lock = threading.Lock()
        self._compiled = ByteLRU(COMPILED_CACHE_BYTES)

    @classmethod
    def from_shards(cls, shard_paths: Sequence["Path"], collection: Any = None, **options: Any) -> "FilterEngine":
        return cls(read_metadata(shard_paths, collection), **options)

    def compile(self, where: str) -> CompiledFilter:
        """:func:`compile_filter` against this table's columns, remembered per filter text
        (parsing costs ~1 ms; up to ``COMPILED_CACHE_BYTES`` of filters are kept)."""
        compiled = self._compiled.get(where) if isinstance(where, str) else None
        if compiled is None:
            compiled = self._compiled.put(where, compile_filter(where, self.columns))
        return compiled

    def matching_ids(self, compiled: CompiledFilter) -> np.ndarray:
        """Sorted unique int64 ids of the rows passing ``compiled`` (read-only array)."""
        import duckdb

        with self._lock:
            try:
                result = self._con.execute(compiled.sql).fetchnumpy()
            except duckdb.Error as exc:
                reason = str(exc).strip().splitlines()[0]
                raise InvalidQueryError(f"filter {compiled.where!r} cannot be evaluated: {reason}") from exc
        ids = np.asarray(result["id"], dtype=np.int64)
        if compiled.per_caption or (len(ids) > 1 and not np.all(ids[1:] > ids[:-1])):
            ids = np.unique(ids)
        ids.flags.writeable = False
        return ids

    def select(self, sql: str, **tables: pa.Table) -> pa.Table:
        """Run a SELECT that vlsearch wrote (never a user's text: see :mod:`vlsearch.query.shaping`)
        over the table, with ``tables`` (Arrow) visible under their names for this one query."""
        with self._lock:
            for name, table in tables.items():
                self._con.register(name, table)
            try:
                return self._con.sql(sql).to_arrow_table()
            finally:
                for name in tables:
                    self._con.unregister(name)

    def close(self) -> None:
        self._con.close()
