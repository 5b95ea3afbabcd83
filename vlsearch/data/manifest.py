"""The one reader of manifest tables (image paths, captions, metadata) for indexing and training.

A manifest is a CSV (``.csv``), TSV (``.tsv``) or Parquet (``.parquet``/``.pq``) table at a local
path or an fsspec URL. CSV and TSV have a header row; a quoted value may hold newlines (a
multi-line caption) and the delimiter. Column types are inferred (Parquet keeps its own) except
the ``text_columns`` a caller names, read as text as written (``007`` stays ``"007"``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from contextlib import nullcontext

import pyarrow as pa

from vlsearch.core.errors import SourceError
from vlsearch.data.locations import is_url, location_suffix, open_location

#: File extensions of manifests, with the CSV delimiter of each text format.
CSV_DELIMITERS = {".csv": ",", ".tsv": "\t"}
PARQUET_SUFFIXES = (".parquet", ".pq")
MANIFEST_SUFFIXES = (*CSV_DELIMITERS, *PARQUET_SUFFIXES)


def is_manifest(location: str | os.PathLike) -> bool:
    """Whether a file's extension is a manifest's (see :data:`MANIFEST_SUFFIXES`)."""
    return location_suffix(location) in MANIFEST_SUFFIXES


def read_manifest(location: str | os.PathLike, text_columns: Sequence[str] = ()) -> pa.Table:
    """The table of the manifest at ``location`` (a path or an fsspec URL).

    ``text_columns`` (those present; CSV/TSV only) are read as strings instead of inferred types.
    Raises :class:`SourceError` for another extension or an unreadable / malformed file.
    """
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    suffix = location_suffix(location)
    if suffix not in MANIFEST_SUFFIXES:
        raise SourceError(f"manifest {location} must be {', '.join(MANIFEST_SUFFIXES[:-1])} or "
                          f"{MANIFEST_SUFFIXES[-1]}")
    try:
        with open_location(location) if is_url(location) else nullcontext(location) as src:
            if suffix in PARQUET_SUFFIXES:
                return pq.read_table(src)
            parse = pcsv.ParseOptions(delimiter=CSV_DELIMITERS[suffix], newlines_in_values=True)
            convert = pcsv.ConvertOptions(column_types={name: pa.string() for name in text_columns})
            return pcsv.read_csv(src, parse_options=parse, convert_options=convert)
    except (pa.ArrowException, OSError) as exc:  # ArrowInvalid & co on a malformed file
        raise SourceError(f"cannot read manifest {location}: {exc}") from exc
