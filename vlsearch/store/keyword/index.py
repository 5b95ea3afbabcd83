"""Writing a shard's keyword index: which columns, which fields, and the atomic directory write."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Iterable, Sequence

import pyarrow as pa

from vlsearch.core.fsutil import write_json
from vlsearch.store.layout import FILE_COLUMNS, IMAGE_COLUMNS

KEYWORD_DIR = "keyword"
#: the fields every keyword index has (metadata columns add theirs)
CAPTION_FIELD, PATH_FIELD, META_FIELD, ID_FIELD = "caption", "path", "meta", "id"
RESERVED_FIELDS = (ID_FIELD, CAPTION_FIELD, PATH_FIELD, META_FIELD)
#: tantivy's stemming tokenizer: lower case, split on non-alphanumerics, English stems ("dogs" finds "dog")
TOKENIZER = "en_stem"
_FIELD_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
#: tantivy writer memory (its minimum is 15 MB per thread)
_WRITER_HEAP = 64_000_000


def keyword_dir_name(number: int) -> str:
    return f"part-{number:05d}"


def keyword_path(directory: Path, number: int) -> Path:
    """The keyword index directory of shard ``number``."""
    return Path(directory) / KEYWORD_DIR / keyword_dir_name(number)


#: the collection's choice of indexed metadata columns (absent: every text column), at its root
KEYWORD_CONFIG = "keyword.json"


def _is_text(kind: pa.DataType) -> bool:
    return (pa.types.is_string(kind) or pa.types.is_large_string(kind)
            or (pa.types.is_dictionary(kind) and pa.types.is_string(kind.value_type)))


def text_columns(schema: pa.Schema) -> list[str]:
    """The text metadata columns: every string or list<string> column (``tags``: each element is
    indexed) but the standard and file-hash columns."""
    skip = {*IMAGE_COLUMNS, *FILE_COLUMNS, "embedding"}
    return [f.name for f in schema if f.name not in skip
            and (_is_text(f.type) or ((pa.types.is_list(f.type) or pa.types.is_large_list(f.type))
                                      and _is_text(f.type.value_type)))]


def field_name(column: str) -> str:
    """The keyword field of a metadata column: its own name when a plain identifier that no standard
    field takes, else ``meta`` (searchable without a prefix either way)."""
    return column if _FIELD_RE.match(column) and column not in RESERVED_FIELDS else META_FIELD


def schema_for(fields: Iterable[str]):
    """The tantivy schema of an index with these text ``fields`` (besides ``id``)."""
    import tantivy

    builder = tantivy.SchemaBuilder()
    builder.add_integer_field(ID_FIELD, stored=False, indexed=False, fast=True)
    for name in fields:
        builder.add_text_field(name, stored=False, tokenizer_name=TOKENIZER)
    return builder.build()


def index_fields(columns: Sequence[str]) -> list[str]:
    """The text fields of an index over metadata ``columns`` (the standard ones first)."""
    return list(dict.fromkeys([CAPTION_FIELD, PATH_FIELD, *(field_name(c) for c in columns)]))


def indexed_columns(directory: Path, schema: pa.Schema) -> list[str]:
    """The metadata columns a shard's keyword index holds: those ``keyword.json`` names (that are
    text columns of ``schema``), else every text column."""
    available = text_columns(schema)
    config = Path(directory) / KEYWORD_CONFIG
    if not config.is_file():
        return available
    chosen = json.loads(config.read_text(encoding="utf-8")).get("columns")
    return available if chosen is None else [c for c in available if c in set(chosen)]


def set_indexed_columns(directory: Path, columns: Sequence[str] | None) -> None:
    """Record which metadata columns keyword indexes hold from now on (None: every text column)."""
    write_json(Path(directory) / KEYWORD_CONFIG, {"columns": None if columns is None else list(columns)})


def build_shard_index(directory: Path, number: int, images: pa.Table) -> Path:
    """Write the keyword index of shard ``number`` (rows ``images``, in order: document k is row k)
    into a temporary directory, then rename it into place (replacing a stale one left by a crash).
    Call before the shard's images file is written."""
    import tantivy

    columns = indexed_columns(directory, images.schema)
    fields = index_fields(columns)
    final = keyword_path(directory, number)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f"{final.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    ids = images.column("id").to_pylist()
    paths = images.column("path").to_pylist() if "path" in images.column_names else [None] * len(ids)
    captions = images.column("captions").to_pylist() if "captions" in images.column_names else [None] * len(ids)
    meta = [(field_name(c), images.column(c).to_pylist()) for c in columns]
    index = tantivy.Index(schema_for(fields), path=str(tmp))
    writer = index.writer(heap_size=_WRITER_HEAP, num_threads=1)  # one thread: one segment, docs in row order
    for row, image_id in enumerate(ids):
        doc = tantivy.Document()
        doc.add_integer(ID_FIELD, int(image_id))
        for caption in captions[row] or ():
            if caption:
                doc.add_text(CAPTION_FIELD, caption)
        if paths[row]:
            doc.add_text(PATH_FIELD, str(paths[row]))
        for name, values in meta:
            for text in values[row] if isinstance(values[row], list) else (values[row],):
                if text is not None:
                    doc.add_text(name, str(text))
        writer.add_document(doc)
    writer.commit()
    writer.wait_merging_threads()
    del writer, index
    for lock in tmp.glob(".tantivy-*.lock"):
        lock.unlink()
    _fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(final.parent)
    return final


def _fsync_dir(path: Path) -> None:
    for p in [*path.iterdir(), path] if path.name != KEYWORD_DIR else [path]:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def missing_keyword_shards(directory: Path, numbers: Iterable[int]) -> list[int]:
    """The shards among ``numbers`` that have no keyword index (collections written before it)."""
    return [n for n in numbers if not (keyword_path(directory, n) / "meta.json").is_file()]
