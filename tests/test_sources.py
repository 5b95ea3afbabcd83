from __future__ import annotations

import io
import json
import os
import tarfile

import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest
from PIL import Image

from vlsearch.data.manifest import read_manifest
from vlsearch.data.sources import FolderSource, ManifestSource, TarSource, open_source, stable_id
from vlsearch.core.errors import SourceError


def _jpeg(color=(200, 10, 10), size=(8, 6)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "JPEG")
    return buf.getvalue()


def _folder(root):
    (root / "b" / "deep").mkdir(parents=True)
    (root / "a.jpg").write_bytes(_jpeg())
    (root / "a.txt").write_text("a red square\n\n  second caption  \n")
    (root / "b" / "C.JPG").write_bytes(_jpeg())
    (root / "b" / "deep" / "d.TiF").write_bytes(_jpeg())
    (root / "b" / "notes.md").write_text("not an image")
    (root / "b" / "e.webp").write_bytes(_jpeg())
    return root


def test_folder_is_recursive_case_insensitive_sorted_with_sidecars(tmp_path):
    src = open_source(_folder(tmp_path))
    assert isinstance(src, FolderSource)
    recs = list(src)
    assert [r.path for r in recs] == ["a.jpg", "b/C.JPG", "b/e.webp", "b/deep/d.TiF"]
    assert recs[0].captions == ("a red square", "second caption")
    assert recs[1].captions == ()
    assert recs[0].location == str(tmp_path / "a.jpg")
    assert [r.id for r in recs] == [stable_id(p) for p in ["a.jpg", "b/C.JPG", "b/e.webp", "b/deep/d.TiF"]]
    assert src.describe()["type"] == "folder" and src.describe()["path"] == str(tmp_path)


def test_ids_are_stable_across_runs_and_independent_of_the_root(tmp_path):
    first = [r.id for r in open_source(_folder(tmp_path / "one"))]
    again = [r.id for r in open_source(tmp_path / "one")]
    moved = [r.id for r in open_source(_folder(tmp_path / "two"))]
    assert first == again == moved
    assert len(set(first)) == len(first)
    assert all(0 <= i < 2**63 for i in first)


def test_missing_and_empty_sources_raise_clear_errors(tmp_path):
    with pytest.raises(SourceError, match="does not exist"):
        open_source(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("hi")
    with pytest.raises(SourceError, match="holds no images"):
        list(open_source(tmp_path / "empty"))
    (tmp_path / "x.doc").write_text("?")
    with pytest.raises(SourceError, match="not a folder"):
        open_source(tmp_path / "x.doc")


def test_csv_with_five_captions_per_image_groups_rows(tmp_path):
    (tmp_path / "img").mkdir()
    rows = []
    for name in ["z.jpg", "m.jpg", "a.jpg"]:
        (tmp_path / "img" / name).write_bytes(_jpeg())
        rows += [{"image": f"img/{name}", "caption": f"{name} caption {k}"} for k in range(5)]
    rows = rows[1::2] + rows[0::2]  # interleave: an image's rows are not adjacent
    pcsv.write_csv(pa.Table.from_pylist(rows), tmp_path / "captions.csv")
    src = open_source(tmp_path / "captions.csv")
    assert isinstance(src, ManifestSource) and src.size_hint() == 3
    recs = list(src)
    assert [r.path for r in recs] == ["img/a.jpg", "img/m.jpg", "img/z.jpg"]
    for rec in recs:
        name = rec.path.split("/")[1]
        assert sorted(rec.captions) == [f"{name} caption {k}" for k in range(5)]
        assert rec.location == str(tmp_path / rec.path)
        assert rec.id == stable_id(rec.path)
    assert src.describe()["caption_column"] == "caption"


@pytest.mark.parametrize("name, sep", [("captions.tsv", "\t"), ("captions.csv", ",")])
def test_tsv_and_csv_manifests_keep_captions_with_newlines(tmp_path, name, sep):
    rows = ["image" + sep + "caption" + sep + "year", "b.jpg" + sep + '"a dog,\non two lines"' + sep + "2001",
            "a.jpg" + sep + "a cat" + sep + "1999", "b.jpg" + sep + "a dog" + sep + "2001"]
    (tmp_path / name).write_text("\n".join(rows) + "\n")
    src = open_source(tmp_path / name)
    assert isinstance(src, ManifestSource)
    recs = list(src)
    assert [r.path for r in recs] == ["a.jpg", "b.jpg"]
    assert [r.path for r in open_source(tmp_path)] == ["a.jpg", "b.jpg"]  # the folder is read as its manifest
    assert recs[1].captions == ("a dog,\non two lines", "a dog")
    assert recs[0].metadata == {"year": 1999}  # metadata columns keep their inferred types
    with pytest.raises(SourceError, match="must be .csv, .tsv"):
        read_manifest(tmp_path / "captions.json")


def test_parquet_manifest_carries_typed_metadata(tmp_path):
    table = pa.table({
        "filepath": ["x.jpg", "y.jpg"],
        "text": ["an x", None],
        "score": pa.array([0.5, 0.25], pa.float32()),
        "label": pa.array([3, None], pa.int16()),
        "id": ["ext-1", "ext-2"],  # clashes with the shard's own id column
    })
    pq.write_table(table, tmp_path / "m.parquet")
    src = open_source(tmp_path / "m.parquet")
    assert src.image_column == "filepath" and src.caption_column == "text"
    assert src.metadata_schema == pa.schema([("score", pa.float32()), ("label", pa.int16()), ("source_id", pa.string())])
    recs = list(src)
    assert recs[0].metadata == {"score": 0.5, "label": 3, "source_id": "ext-1"}
    assert recs[1].metadata == {"score": 0.25, "label": None, "source_id": "ext-2"}
    assert recs[0].captions == ("an x",) and recs[1].captions == ()


def test_manifest_column_errors(tmp_path):
    pcsv.write_csv(pa.table({"foo": ["a.jpg"]}), tmp_path / "m.csv")
    with pytest.raises(SourceError, match="none of the image columns"):
        open_source(tmp_path / "m.csv")
    with pytest.raises(SourceError, match="no caption column 'cap'"):
        open_source(tmp_path / "m.csv", image_column="foo", caption_column="cap")
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(SourceError, match="cannot read manifest"):
        open_source(tmp_path / "bad.parquet")


def _tar(path, members: list[tuple[str, bytes]]):
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def test_webdataset_tars_stream_keys_with_txt_and_json(tmp_path):
    img = _jpeg()
    _tar(tmp_path / "shard-000.tar", [
        ("0001.jpg", img), ("0001.txt", b"a caption"),
        ("0002.png", img), ("0002.json", json.dumps({"caption": "from json", "w": 8}).encode()),
        ("0003.txt", b"orphan caption, no image"),
    ])
    _tar(tmp_path / "shard-001.tar", [("0001.jpg", img), ("0001.txt", b"other tar")])
    src = open_source(tmp_path)
    assert isinstance(src, TarSource)
    recs = list(src)
    assert [r.path for r in recs] == ["shard-000.tar/0001.jpg", "shard-000.tar/0002.png", "shard-001.tar/0001.jpg"]
    assert [r.captions for r in recs] == [("a caption",), ("from json",), ("other tar",)]
    assert recs[1].metadata == {"key": "0002", "json": json.dumps({"caption": "from json", "w": 8})}
    assert len({r.id for r in recs}) == 3  # the same key in two tars is two images
    offset, size = recs[0].tar_range
    with open(recs[0].location, "rb") as f:
        f.seek(offset)
        assert f.read(size) == img
    single = open_source(tmp_path / "shard-001.tar")
    assert [r.path for r in single] == ["shard-001.tar/0001.jpg"]
    assert [r.path for r in open_source(str(tmp_path / "shard-*.tar"))][0] == "shard-000.tar/0001.jpg"


def test_duplicate_webdataset_key_is_reported(tmp_path):
    img = _jpeg()
    _tar(tmp_path / "dup.tar", [("k.jpg", img), ("other.jpg", img), ("k.png", img)])
    with pytest.raises(SourceError, match="id .* of an earlier record"):
        list(open_source(tmp_path / "dup.tar"))


def test_non_utf8_file_names_are_indexed_with_escaped_paths(tmp_path):
    with open(os.path.join(os.fsencode(tmp_path), b"caf\xe9.jpg"), "wb") as f:
        f.write(_jpeg())
    (rec,) = list(open_source(tmp_path))
    assert rec.path == "caf\\xe9.jpg"
    assert os.path.exists(rec.location)
    assert rec.id == stable_id(b"caf\xe9.jpg")
