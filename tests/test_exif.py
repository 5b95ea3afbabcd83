"""Photo metadata as columns (issue 35): taken_at, camera, lens, GPS, orientation from EXIF and
folder from the path; --no-gps; filters and shaping on them; sync; --refresh-metadata; hostile EXIF."""

from __future__ import annotations

import datetime as dt
import json
import struct

import numpy as np
import pillow_heif
import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from typer.testing import CliRunner

from indexing.embed import embed
from indexing.photos import NO_GPS
from indexing.shards import EmbedConfig
from vlsearch.app.cli import app
from vlsearch.app.options import EmbedOptions, WatchOptions
from vlsearch.app.serve import create_app
from vlsearch.query.results import hits_to_json_lines
from vlsearch.data.photo import EXIF_COLUMNS, PHOTO_SCHEMA, exif_values, folder_of, taken_at
from vlsearch.query.searcher import Searcher
from vlsearch.store.collection import Collection

runner = CliRunner()
UTC = dt.timezone.utc
PARIS = {"make": "Canon", "model": "EOS R5", "lens": "RF24-105mm F4 L", "date": "2024:06:15 14:30:00",
         "offset": "+02:00", "gps": ("N", (48.0, 51.0, 30.0), "W", (2.0, 21.0, 7.2))}


def _exif(make=None, model=None, lens=None, date=None, offset=None, gps=None, orientation=None) -> Image.Exif:
    exif = Image.Exif()
    for tag, value in ((0x010F, make), (0x0110, model), (0x0112, orientation)):
        if value is not None:
            exif[tag] = value
    sub = exif.get_ifd(0x8769)
    for tag, value in ((0x9003, date), (0x9011, offset), (0xA434, lens)):
        if value is not None:
            sub[tag] = value
    if gps is not None:
        exif.get_ifd(0x8825).update(zip((1, 2, 3, 4), gps))
    return exif


def _photo(path, seed=0, exif: Image.Exif | bytes | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(np.random.default_rng(seed).integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize((48, 32))
    raw = exif.tobytes() if isinstance(exif, Image.Exif) else exif
    if path.suffix == ".heic":
        pillow_heif.from_pillow(img).save(path, exif=raw)
    else:
        img.save(path, **({"exif": raw} if raw is not None else {}))


def _rows(coll_dir) -> dict[str, dict]:
    table = Collection.open(coll_dir).read_table(columns=["path", *PHOTO_SCHEMA.names])
    return {r["path"]: r for r in table.to_pylist()}


def _index(*args: str):
    result = runner.invoke(app, ["index", *map(str, args), "--workers", "0"])
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture
def tiny_args(tiny_checkpoint):
    return ["--model", "vlsearch-tiny", "--pretrained", str(tiny_checkpoint)]


def test_columns_from_jpeg_and_heic_exif_and_the_folder(tmp_path, tiny_encoder):
    src = tmp_path / "photos"
    _photo(src / "trips" / "paris" / "a.jpg", 0, _exif(**PARIS, orientation=1))
    _photo(src / "trips" / "b.heic", 1, _exif(make="Apple", model="iPhone 15", date="2024:01:02 03:04:05",
                                               offset="-05:00", gps=("S", (33.0, 52.0, 0.0), "E", (151.0, 12.0, 36.0))))
    _photo(src / "plain.png", 2)
    embed(src, tmp_path / "c", EmbedConfig(workers=0), encoder=tiny_encoder)
    rows = _rows(tmp_path / "c")
    a, b, plain = rows["trips/paris/a.jpg"], rows["trips/b.heic"], rows["plain.png"]
    assert a["taken_at"] == dt.datetime(2024, 6, 15, 12, 30, tzinfo=UTC)
    assert (a["camera_make"], a["camera_model"], a["lens"], a["orientation"]) == ("Canon", "EOS R5", "RF24-105mm F4 L", 1)
    assert a["gps_lat"] == pytest.approx(48.858333) and a["gps_lon"] == pytest.approx(-2.352)
    assert b["taken_at"] == dt.datetime(2024, 1, 2, 8, 4, 5, tzinfo=UTC)
    assert (b["camera_make"], b["camera_model"], b["lens"]) == ("Apple", "iPhone 15", None)
    assert b["gps_lat"] == pytest.approx(-33.866667) and b["gps_lon"] == pytest.approx(151.21)
    assert (a["folder"], b["folder"], plain["folder"]) == ("trips/paris", "trips", "")
    assert all(plain[c] is None for c in EXIF_COLUMNS)
    schema = pq.read_schema(Collection.open(tmp_path / "c").shard_paths()[0])
    assert all(schema.field(f.name).type == f.type for f in PHOTO_SCHEMA)


def test_filters_and_shaping_take_the_photo_columns(tmp_path, tiny_encoder):
    src = tmp_path / "photos"
    _photo(src / "trips" / "paris" / "june.jpg", 0, _exif(make="Canon", date="2024:06:15 14:30:00", offset="+02:00"))
    _photo(src / "trips" / "rome" / "july.jpg", 1, _exif(make="Sony", date="2024:07:01 09:00:00"))
    _photo(src / "trips" / "may.jpg", 2, _exif(make="Canon", date="2024:05:31 23:00:00", offset="+00:00"))
    _photo(src / "home" / "june.jpg", 3, _exif(make="Canon", date="2024:06:20 10:00:00"))
    embed(src, tmp_path / "c", EmbedConfig(workers=0), encoder=tiny_encoder)
    s = Searcher.open(tmp_path / "c", encoder=tiny_encoder)
    hits = s.search_text("a photo", k=10, exact=True, where="taken_at >= '2024-06-01' AND folder LIKE 'trips/%'")
    assert sorted(h.path for h in hits) == ["trips/paris/june.jpg", "trips/rome/july.jpg"]
    ordered = s.search_text("a photo", k=10, exact=True, order_by="taken_at DESC")
    assert [h.path for h in ordered] == ["trips/rome/july.jpg", "home/june.jpg", "trips/paris/june.jpg", "trips/may.jpg"]
    shaped = s.search_text("a photo", k=10, exact=True, group_by="folder", per_group=1, facets=["camera_make", "folder"])
    assert shaped.facets["camera_make"] == {"Canon": 3, "Sony": 1} and len(shaped) == 4
    assert set(shaped.facets["folder"]) == {"trips/paris", "trips/rome", "trips", "home"}
    hit = next(h for h in hits if h.path == "trips/paris/june.jpg")
    assert hit.metadata["taken_at"] == dt.datetime(2024, 6, 15, 12, 30, tzinfo=UTC)
    as_json = json.loads(hits_to_json_lines([hit]))  # the CLI's --json: ISO 8601, as the HTTP API gives it
    assert as_json["metadata"]["taken_at"] == "2024-06-15T12:30:00+00:00"
    with TestClient(create_app({"c": s})) as http:  # the page's hit cards read it from here
        body = http.post("/api/collections/c/search", json={"text": "a photo", "k": 10, "exact": True,
                                                            "where": "folder = 'trips/paris'"}).json()
    assert [h["metadata"]["taken_at"] for h in body["hits"]] == ["2024-06-15T12:30:00+00:00"]


def test_no_gps_keeps_location_out_and_later_syncs_honour_it(tmp_path, tiny_args):
    src = tmp_path / "photos"
    _photo(src / "a.jpg", 0, _exif(**PARIS))
    _index(src, tmp_path / "c", *tiny_args, "--no-gps")
    assert Collection.open(tmp_path / "c").manifest.source[NO_GPS] is True
    _photo(src / "b.jpg", 1, _exif(**PARIS))
    _index(src, tmp_path / "c")  # a sync without the flag: still no location
    rows = _rows(tmp_path / "c")
    assert set(rows) == {"a.jpg", "b.jpg"} and all(r["gps_lat"] is None and r["gps_lon"] is None for r in rows.values())
    assert rows["b.jpg"]["camera_make"] == "Canon"  # the rest of the EXIF is kept


def test_no_gps_on_a_collection_with_locations_clears_them(tmp_path, tiny_args):
    src = tmp_path / "photos"
    _photo(src / "a.jpg", 0, _exif(**PARIS))
    _index(src, tmp_path / "c", *tiny_args)
    assert _rows(tmp_path / "c")["a.jpg"]["gps_lat"] == pytest.approx(48.858333)
    _index(src, tmp_path / "c", "--no-gps")
    coll = Collection.open(tmp_path / "c")
    assert coll.manifest.source[NO_GPS] is True and _rows(tmp_path / "c")["a.jpg"]["gps_lat"] is None
    _index(src, tmp_path / "c", "--refresh-metadata")  # a refresh honours it too
    assert _rows(tmp_path / "c")["a.jpg"]["gps_lat"] is None and _rows(tmp_path / "c")["a.jpg"]["lens"] == PARIS["lens"]


def test_sync_fills_the_columns_of_new_and_renamed_rows(tmp_path, tiny_args):
    src = tmp_path / "photos"
    _photo(src / "a.jpg", 0, _exif(**PARIS))
    _index(src, tmp_path / "c", *tiny_args)
    _photo(src / "new" / "b.jpg", 1, _exif(make="Nikon", date="2023:12:31 23:59:59"))
    (src / "moved").mkdir()
    (src / "a.jpg").rename(src / "moved" / "a.jpg")  # reused vector, columns read again
    result = _index(src, tmp_path / "c")
    assert "+2 new" in result.output and "1 vectors reused" in result.output
    rows = _rows(tmp_path / "c")
    assert rows["new/b.jpg"]["camera_make"] == "Nikon" and rows["new/b.jpg"]["folder"] == "new"
    assert rows["new/b.jpg"]["taken_at"] == dt.datetime(2023, 12, 31, 23, 59, 59, tzinfo=UTC)
    assert rows["moved/a.jpg"]["folder"] == "moved" and rows["moved/a.jpg"]["lens"] == PARIS["lens"]


def test_refresh_metadata_fills_a_collection_made_before_the_columns(tmp_path, tiny_args):
    src = tmp_path / "photos"
    _photo(src / "trips" / "a.jpg", 0, _exif(**PARIS))
    _photo(src / "b.png", 1)
    _index(src, tmp_path / "c", *tiny_args)
    coll = Collection.open(tmp_path / "c")
    for path in coll.shard_paths():  # as an older vlsearch wrote it: no photo columns
        table = pq.read_table(path)
        pq.write_table(table.drop_columns(PHOTO_SCHEMA.names), path)
    before = Collection.open(tmp_path / "c")
    vectors = before.read_table(columns=["id", "embedding"]).sort_by("id")
    assert "taken_at" not in before.read_table().column_names
    assert "--refresh-metadata" in _index(src, tmp_path / "c").output  # a plain sync says what to run
    result = _index(src, tmp_path / "c", "--refresh-metadata")
    assert "photo metadata of 2 rows re-read" in result.output
    after = Collection.open(tmp_path / "c")
    assert after.manifest.version == before.manifest.version + 1
    assert after.read_table(columns=["id", "embedding"]).sort_by("id").equals(vectors)  # not re-encoded
    rows = _rows(tmp_path / "c")
    assert rows["trips/a.jpg"]["taken_at"] == dt.datetime(2024, 6, 15, 12, 30, tzinfo=UTC)
    assert rows["trips/a.jpg"]["folder"] == "trips" and rows["b.png"]["folder"] == ""
    s = Searcher.open(tmp_path / "c")
    assert [h.path for h in s.search_vector(np.ones(s.dim, np.float32), k=5, exact=True,
                                            where="camera_model = 'EOS R5'")] == ["trips/a.jpg"]


# ---- hostile EXIF ---------------------------------------------------------------------------------

SHORT, LONG, ASCII = 3, 4, 2


def _ifd(entries: list[tuple[int, int, int, bytes]], next_offset: int) -> bytes:
    """One little-endian IFD: ``(tag, type, count, 4 value bytes)`` entries, then the next IFD's offset."""
    return (struct.pack("<H", len(entries)) + b"".join(struct.pack("<HHI", t, k, n) + v for t, k, n, v in entries)
            + struct.pack("<I", next_offset))


def _tiff_exif(ifd0: list, sub: list | None = None) -> bytes:
    """APP1 EXIF bytes: IFD0 at offset 8, and ``sub`` as its ExifIFD right after it."""
    first = 8
    if sub is not None:
        ifd0 = [*ifd0, (0x8769, LONG, 1, struct.pack("<I", first + 2 + 12 * (len(ifd0) + 1) + 4))]
    data = _ifd(ifd0, 0) + (_ifd(sub, 0) if sub is not None else b"")
    return b"Exif\x00\x00" + b"II*\x00" + struct.pack("<I", first) + data


def _short(value: int) -> bytes:
    return struct.pack("<HH", value, 0)


def _wrong_types_exif() -> bytes:
    """Make as a SHORT, Model as a LONG, Orientation as text; DateTimeOriginal a LONG, its offset a SHORT."""
    return _tiff_exif([(0x010F, SHORT, 1, _short(12345)), (0x0110, LONG, 1, struct.pack("<I", 7)),
                       (0x0112, ASCII, 2, b"6\x00\x00\x00")],
                      [(0x9003, LONG, 1, struct.pack("<I", 20240615)), (0x9011, SHORT, 1, _short(2))])


def _cyclic_exif() -> bytes:
    """IFD0 whose ExifIFD and GPS pointers and next-IFD pointer all point back at IFD0 itself."""
    entries = [(0x010F, ASCII, 4, b"Cyc\x00"), (0x8769, LONG, 1, struct.pack("<I", 8)),
               (0x8825, LONG, 1, struct.pack("<I", 8))]
    return b"Exif\x00\x00" + b"II*\x00" + struct.pack("<I", 8) + _ifd(entries, 8)


def _huge_count_exif() -> bytes:
    """A Make entry claiming 2**31 characters, far past the end of the data."""
    body = struct.pack("<H", 1) + struct.pack("<HHII", 0x010F, 2, 2**31, 26)
    return b"Exif\x00\x00" + b"II*\x00" + struct.pack("<I", 8) + body + struct.pack("<I", 0)


HOSTILE = {
    "huge.jpg": _exif(make="A" * 60_000, model="M" * 300, date="2024:06:15 14:30:00"),
    "types.jpg": _wrong_types_exif(),
    "zone.jpg": _exif(make="Canon", date="2024:06:15 14:30:00", offset="+99:00", orientation=99),
    "zero.jpg": _exif(date="0000:00:00 00:00:00", gps=("N", (95.0, 0.0, 0.0), "X", (1.0, 2.0, 3.0))),
    "garbage.jpg": _exif(date="yesterday at noon", offset="soon", gps=("N", (1.0, 2.0), "E", (200.0, 0.0, 0.0))),
    "cyclic.jpg": _cyclic_exif(),
    "count.jpg": _huge_count_exif(),
    "noise.jpg": b"Exif\x00\x00" + bytes(np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8)),
}


def test_hostile_exif_leaves_the_column_null_and_the_photo_indexed(tmp_path, tiny_encoder):
    src = tmp_path / "photos"
    for seed, (name, exif) in enumerate(HOSTILE.items()):
        _photo(src / name, seed, exif)
    coll = embed(src, tmp_path / "c", EmbedConfig(workers=0, decode_timeout=10), encoder=tiny_encoder)
    assert coll.manifest.counts["images"] == len(HOSTILE) and coll.manifest.counts["failures"] == 0
    rows = _rows(tmp_path / "c")
    assert rows["huge.jpg"]["camera_make"] is None and rows["huge.jpg"]["camera_model"] is None
    assert rows["huge.jpg"]["taken_at"] == dt.datetime(2024, 6, 15, 14, 30, tzinfo=UTC)  # good values stay
    assert all(rows["types.jpg"][c] is None for c in EXIF_COLUMNS)
    assert rows["zone.jpg"]["taken_at"] is None and rows["zone.jpg"]["orientation"] is None
    assert rows["zone.jpg"]["camera_make"] == "Canon"
    assert all(rows["zero.jpg"][c] is None for c in ("taken_at", "gps_lat", "gps_lon"))
    assert all(rows["garbage.jpg"][c] is None for c in EXIF_COLUMNS)
    assert rows["cyclic.jpg"]["camera_make"] == "Cyc" and rows["cyclic.jpg"]["taken_at"] is None
    assert all(rows[n]["camera_make"] is None for n in ("count.jpg", "noise.jpg"))


@pytest.mark.parametrize("date, offset, expected", [
    ("2024:06:15 14:30:00", "+02:00", dt.datetime(2024, 6, 15, 12, 30, tzinfo=UTC)),
    ("2024:06:15 14:30:00", "-09:30", dt.datetime(2024, 6, 16, 0, 0, tzinfo=UTC)),
    ("2024:06:15 14:30:00", None, dt.datetime(2024, 6, 15, 14, 30, tzinfo=UTC)),  # no offset: taken as UTC
    ("2024:06:15 14:30:00\x00", b"+01:00", dt.datetime(2024, 6, 15, 13, 30, tzinfo=UTC)),
    ("2024:02:30 10:00:00", None, None), ("2024:06:15 25:00:00", None, None), ("0000:00:00 00:00:00", None, None),
    ("    :  :     :  :  ", None, None), ("2024:06:15 14:30:00", "+99:00", None), ("2024:06:15 14:30:00", "+02:60", None),
    ("2024:06:15 14:30:00", "Z", None), ("2024-06-15", None, None), (None, "+01:00", None), (1718461800, None, None),
])
def test_taken_at_parses_only_real_dates_and_zones(date, offset, expected):
    assert taken_at(date, offset) == expected


def test_exif_values_of_nothing_and_folders():
    assert exif_values(None) == dict.fromkeys(EXIF_COLUMNS)
    assert [folder_of(p) for p in ("a/b/c.jpg", "c.jpg", "x/y.heic")] == ["a/b", "", "x"]


def test_no_gps_is_an_option_of_index_embed_and_watch():
    assert EmbedOptions(no_gps=True).config().no_gps and not EmbedOptions().config().no_gps
    assert WatchOptions(no_gps=True).embed_config().no_gps
    for command in ("index", "embed", "watch"):
        assert "--no-gps" in runner.invoke(app, [command, "--help"], terminal_width=200).output, command
