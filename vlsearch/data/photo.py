"""Photo metadata columns: when, with what and where a photo was taken (EXIF), and its folder.

Every image shard carries :data:`PHOTO_SCHEMA`'s columns, null where a file says nothing:

* ``taken_at``: EXIF DateTimeOriginal with OffsetTimeOriginal, as a ``timestamp[us, tz=UTC]``
  (normalised to UTC; a time with no recorded offset is taken as UTC). DuckDB reads it as a
  ``TIMESTAMP WITH TIME ZONE``, so ``where="taken_at >= '2024-06-01'"`` compares with midnight of
  the filtering process's time zone; hits carry it as a tz-aware ``datetime`` (ISO 8601 with
  ``+00:00`` in JSON).
* ``camera_make``, ``camera_model``, ``lens`` (LensModel): text.
* ``gps_lat``, ``gps_lon``: decimal degrees, negative south and west (null with ``--no-gps``).
* ``orientation``: the EXIF orientation tag (1-8); pixels, width and height are stored upright.
* ``folder``: the directory part of the stored path, ``""`` for a file at the source root (the
  column ``group_by``/``facets``/``where`` use; :func:`folder_of` is its one definition).

EXIF comes from the image the decoder already opened (:func:`exif_values` of an ``Image.Exif``),
so no second read of the file. Hostile EXIF is harmless: a value of the wrong type, out of range,
too long, or that makes Pillow raise leaves that column null, and the photo is still indexed.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from typing import Any, BinaryIO, Callable

import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from vlsearch.data.formats import SNIFF_BYTES, ready_for

#: The folder column (filled from the path where a shard lacks it: :func:`with_folder`).
FOLDER = "folder"
GPS_COLUMNS = ("gps_lat", "gps_lon")
PHOTO_SCHEMA = pa.schema([
    ("taken_at", pa.timestamp("us", tz="UTC")), ("camera_make", pa.string()), ("camera_model", pa.string()),
    ("lens", pa.string()), ("gps_lat", pa.float64()), ("gps_lon", pa.float64()), ("orientation", pa.int16()),
    (FOLDER, pa.string()),
])
#: EXIF columns (every photo column but ``folder``).
EXIF_COLUMNS = tuple(n for n in PHOTO_SCHEMA.names if n != FOLDER)
#: Longest text value kept; a longer one is garbage, not a camera name.
MAX_TEXT = 256

_EXIF_IFD, _GPS_IFD = 0x8769, 0x8825
_MAKE, _MODEL, _ORIENTATION = 0x010F, 0x0110, 0x0112
_DATE_ORIGINAL, _OFFSET_ORIGINAL, _LENS_MODEL = 0x9003, 0x9011, 0xA434
_DATE_RE = re.compile(r"(\d{4}):(\d{2}):(\d{2})[ T](\d{2}):(\d{2}):(\d{2})")
_OFFSET_RE = re.compile(r"([+-])(\d{2}):(\d{2})")


def folder_of(path: str) -> str:
    """The directory part of a stored path (``a/b/c.jpg`` -> ``a/b``; ``c.jpg`` -> ``""``)."""
    return path.rpartition("/")[0]


def with_folder(table: pa.Table) -> pa.Table:
    """``table`` (with a ``path`` column) whose ``folder`` is filled where null or absent: rows of
    shards written before the column (or synced into a collection that has older shards) get
    :func:`folder_of` their path, computed column-wise."""
    paths = table.column("path")
    computed = pc.replace_substring_regex(paths, r"^[^/]*$|/[^/]*$", "")
    if FOLDER not in table.column_names:
        return table.append_column(FOLDER, computed)
    stored = table.column(FOLDER)
    if stored.null_count == 0:
        return table
    return table.set_column(table.column_names.index(FOLDER), FOLDER, pc.coalesce(stored, computed))


def _guarded(read: Callable[[], Any]) -> Any:
    """``read()``, or None when the EXIF behind it makes Pillow (or the check) raise."""
    try:
        return read()
    except Exception:  # hostile EXIF in any shape must cost a column, never the photo
        return None


def _text(value: Any) -> str | None:
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    if not isinstance(value, str):
        return None
    value = value.strip("\x00 \t\r\n")
    return value if value and len(value) <= MAX_TEXT and value.isprintable() else None


def _orientation(value: Any) -> int | None:
    return int(value) if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 8 else None


def taken_at(date: Any, offset: Any) -> dt.datetime | None:
    """DateTimeOriginal (``YYYY:MM:DD HH:MM:SS``) at OffsetTimeOriginal (``+HH:MM``; none: UTC), in UTC."""
    date, offset = _text(date), _text(offset)
    match = _DATE_RE.fullmatch(date or "")
    if match is None:
        return None
    zone = dt.timezone.utc
    if offset is not None:
        off = _OFFSET_RE.fullmatch(offset)
        if off is None or int(off[2]) > 14 or int(off[3]) >= 60:
            return None  # a +99:00 zone makes the time itself unknown
        delta = dt.timedelta(hours=int(off[2]), minutes=int(off[3]))
        zone = dt.timezone(-delta if off[1] == "-" else delta)
    year, month, day, hour, minute, second = map(int, match.groups())
    if year < 1800:
        return None
    try:
        return dt.datetime(year, month, day, hour, minute, second, tzinfo=zone).astimezone(dt.timezone.utc)
    except ValueError:  # February 30th, hour 25...
        return None


def _degrees(value: Any, ref: Any, positive: str, negative: str, limit: float) -> float | None:
    ref = _text(ref)
    if ref not in (positive, negative) or not isinstance(value, tuple) or len(value) != 3:
        return None
    d, m, s = (float(v) for v in value)
    if not all(math.isfinite(v) and v >= 0 for v in (d, m, s)) or m >= 60 or s >= 60:
        return None
    degrees = d + m / 60 + s / 3600
    if degrees > limit:
        return None
    return -degrees if ref == negative else degrees


def exif_values(exif: Image.Exif | None) -> dict[str, Any]:
    """The EXIF columns (:data:`EXIF_COLUMNS`) from a Pillow ``Exif``; None where absent or invalid."""
    values: dict[str, Any] = dict.fromkeys(EXIF_COLUMNS)
    if exif is None:
        return values
    ifd0 = _guarded(lambda: dict(exif)) or {}
    sub = _guarded(lambda: dict(exif.get_ifd(_EXIF_IFD))) or {}
    gps = _guarded(lambda: dict(exif.get_ifd(_GPS_IFD))) or {}
    values["taken_at"] = _guarded(lambda: taken_at(sub.get(_DATE_ORIGINAL), sub.get(_OFFSET_ORIGINAL)))
    values["camera_make"] = _text(ifd0.get(_MAKE))
    values["camera_model"] = _text(ifd0.get(_MODEL))
    values["lens"] = _text(sub.get(_LENS_MODEL))
    values["orientation"] = _orientation(ifd0.get(_ORIENTATION))
    values["gps_lat"] = _guarded(lambda: _degrees(gps.get(2), gps.get(1), "N", "S", 90.0))
    values["gps_lon"] = _guarded(lambda: _degrees(gps.get(4), gps.get(3), "E", "W", 180.0))
    return values


def exif_of_file(fh: BinaryIO) -> dict[str, Any]:
    """The EXIF columns of an open image file, reading its headers only (no pixels decoded): what
    rows embedded earlier get without a decode. Unreadable or not an image: all None."""
    def read() -> dict[str, Any]:
        ready_for(fh.read(SNIFF_BYTES))
        fh.seek(0)
        with Image.open(fh) as img:
            return exif_values(img.getexif())

    return _guarded(read) or exif_values(None)


def photo_columns(paths: list[str], exif: list[dict[str, Any] | None], gps: bool = True) -> dict[str, list[Any]]:
    """:data:`PHOTO_SCHEMA`'s columns of rows with these stored ``paths`` and :func:`exif_values`
    (None: nothing known); GPS columns all null unless ``gps``."""
    rows = [e or {} for e in exif]
    columns = {name: [r.get(name) for r in rows] for name in EXIF_COLUMNS}
    if not gps:
        columns.update({name: [None] * len(rows) for name in GPS_COLUMNS})
    columns[FOLDER] = [folder_of(p) for p in paths]
    return columns


__all__ = ["EXIF_COLUMNS", "FOLDER", "GPS_COLUMNS", "PHOTO_SCHEMA", "exif_of_file", "exif_values", "folder_of",
           "photo_columns", "taken_at"]
