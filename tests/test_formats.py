"""Image formats (issue 35): HEIC/HEIF, AVIF, WebP, TIFF, animated first frames, EXIF orientation,
and files that look like images but are not indexed (RAW, unknown extension, HEIC without its
decoder), each counted and named with its fix."""

from __future__ import annotations

import io
import subprocess
import sys
import uuid

import fsspec
import numpy as np
import pillow_heif
import pytest
from PIL import Image
from typer.testing import CliRunner

from indexing.decode import decode_batches
from indexing.embed import embed
from indexing.shards import EmbedConfig
from vlsearch.app.cli import app
from vlsearch.app.serve.images import ItemImages
from vlsearch.core.cache import ByteLRU
from vlsearch.core.errors import DecodeError
from vlsearch.data import formats
from vlsearch.data.images import open_image
from vlsearch.data.sources import FolderSource
from vlsearch.query.searcher import Searcher
from vlsearch.store.arrays import embeddings_to_numpy
from vlsearch.store.collection import Collection

runner = CliRunner()
#: EXIF orientation 6: the stored pixels must be turned 90 degrees clockwise to be upright.
ROTATE_CW = 6


def _picture(seed: int, size=(64, 48)) -> Image.Image:
    """A distinct picture per seed: blocks of colour, smooth enough to survive lossy codecs."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return Image.fromarray(blocks).resize(size, Image.NEAREST)


def _save(img: Image.Image, path, **kwargs) -> None:
    if path.suffix == ".heic":
        pillow_heif.from_pillow(img).save(path, quality=95, **kwargs)
    else:
        img.save(path, **kwargs)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_every_format_is_indexed_and_found_by_its_own_picture(tmp_path, tiny_encoder):
    folder = tmp_path / "photos"
    folder.mkdir()
    names = ["a.jpg", "b.png", "c.webp", "d.tif", "e.avif", "f.heic", "g.gif", "h.bmp"]
    for seed, name in enumerate(names):
        _save(_picture(seed), folder / name)
    embed(folder, tmp_path / "c", EmbedConfig(workers=0), encoder=tiny_encoder)
    coll = Collection.open(tmp_path / "c")
    assert coll.manifest.counts["images"] == len(names) and coll.manifest.counts["failures"] == 0
    assert sorted(coll.read_table(columns=["path"]).column("path").to_pylist()) == names
    searcher = Searcher.open(tmp_path / "c", encoder=tiny_encoder)
    for name in names:
        assert searcher.search_image(folder / name, k=3, exact=True)[0].path == name, name


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "PNG"])
def test_an_animated_image_gives_its_first_frame(fmt):
    first, second = _picture(1), _picture(2)
    out = io.BytesIO()
    first.save(out, format=fmt, save_all=True, append_images=[second], duration=100, loop=0,
               **({"lossless": True} if fmt == "WEBP" else {}))
    with Image.open(io.BytesIO(out.getvalue())) as img:
        assert getattr(img, "n_frames", 1) == 2
        img.seek(1)  # a file left on another frame: open_image starts from the first again
        expected = np.asarray(Image.open(io.BytesIO(out.getvalue())).convert("RGB"))
    got = np.asarray(open_image(out.getvalue()))
    assert np.array_equal(got, expected)
    assert not np.array_equal(got, np.asarray(second.convert("RGB")))


def _sideways_jpeg(path, upright: Image.Image) -> None:
    """``upright`` stored turned 90 degrees counter-clockwise, with the orientation that undoes it."""
    exif = Image.Exif()
    exif[0x0112] = ROTATE_CW
    upright.rotate(90, expand=True).save(path, quality=100, subsampling=0, exif=exif)


def test_a_rotated_exif_jpeg_embeds_like_its_upright_pixels(tmp_path, tiny_encoder):
    upright = _picture(7, (80, 40))
    folder = tmp_path / "photos"
    folder.mkdir()
    _sideways_jpeg(folder / "sideways.jpg", upright)
    upright.save(folder / "upright.png")
    embed(folder, tmp_path / "c", EmbedConfig(workers=0), encoder=tiny_encoder)
    rows = {r["path"]: r for r in Collection.open(tmp_path / "c").read_table(
        columns=["path", "width", "height", "orientation"]).to_pylist()}
    assert (rows["sideways.jpg"]["width"], rows["sideways.jpg"]["height"]) == (80, 40)  # the upright size
    assert rows["sideways.jpg"]["orientation"] == ROTATE_CW and rows["upright.png"]["orientation"] is None
    record = next(r for r in FolderSource(folder) if r.path == "sideways.jpg")
    batch = next(iter(decode_batches([record], tiny_encoder.decode_transform, workers=0)))
    decoded = batch.pixels[0].float()
    error_upright = (decoded - tiny_encoder.decode_transform(upright).float()).abs().mean()
    error_sideways = (decoded - tiny_encoder.decode_transform(upright.rotate(90, expand=True)).float()).abs().mean()
    assert error_upright < 3 and error_sideways > 30  # JPEG noise only, against another picture
    table = Collection.open(tmp_path / "c").read_table(columns=["path", "embedding"])
    stored = dict(zip(table.column("path").to_pylist(), embeddings_to_numpy(table.column("embedding"))))
    truth = tiny_encoder.encode_images([upright])[0]
    sideways = tiny_encoder.encode_images([upright.rotate(90, expand=True)])[0]
    assert _cosine(stored["sideways.jpg"], truth) > 0.999
    assert _cosine(stored["sideways.jpg"], truth) > _cosine(stored["sideways.jpg"], sideways)
    hits = Searcher.open(tmp_path / "c", encoder=tiny_encoder).search_image(upright, k=2, exact=True)
    assert {h.path for h in hits} == {"sideways.jpg", "upright.png"} and min(h.score for h in hits) > 0.99


def test_thumbnails_are_upright(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    _sideways_jpeg(folder / "sideways.jpg", _picture(3, (80, 40)))
    images = ItemImages("c", {"type": "folder", "path": str(folder)}, ByteLRU(1 << 20), 10**8)
    thumb = Image.open(io.BytesIO(images.thumbnail({"id": 1, "path": "sideways.jpg"}, 32)))
    assert thumb.size == (32, 16)


def test_the_folder_walk_takes_every_format_raw_and_image_bytes_under_other_names(tmp_path):
    for name in ("a.HEIC", "b.avif", "c.webp", "d.tiff", "e.CR2", "f.nef", "g.dng"):
        (tmp_path / name).write_bytes(b"x")
    _picture(0).save(tmp_path / "scan.dat", format="JPEG")
    _picture(0).save(tmp_path / "noext", format="PNG")
    (tmp_path / "notes.dat").write_text("BM not a bitmap")
    (tmp_path / "a.txt").write_text("a caption")
    records = {r.path: r for r in FolderSource(tmp_path)}
    assert sorted(records) == ["a.HEIC", "b.avif", "c.webp", "d.tiff", "e.CR2", "f.nef", "g.dng", "noext", "scan.dat"]
    assert records["scan.dat"].sniffed == "JPEG" and records["noext"].sniffed == "PNG"
    assert records["a.HEIC"].sniffed is None and records["a.HEIC"].captions == ("a caption",)


def test_a_remote_folder_is_walked_the_same_way(tmp_path):
    fs, root = fsspec.filesystem("memory"), f"/vlsearch-formats-{uuid.uuid4().hex[:8]}"
    out = io.BytesIO()
    _picture(0).save(out, format="JPEG")
    try:
        for name in ("a.avif", "b.ARW", "c.txt"):
            fs.pipe(f"{root}/{name}", b"x")
        fs.pipe(f"{root}/scan.dat", out.getvalue())
        records = {r.path: r for r in FolderSource(f"memory://{root}")}
    finally:
        fs.rm(root, recursive=True)
    assert sorted(records) == ["a.avif", "b.ARW", "scan.dat"] and records["scan.dat"].sniffed == "JPEG"


def test_sniff_names_formats_by_their_bytes():
    for fmt in ("JPEG", "PNG", "GIF", "WEBP", "TIFF", "BMP", "AVIF"):
        out = io.BytesIO()
        _picture(0).save(out, format=fmt)
        assert formats.sniff(out.getvalue()[: formats.SNIFF_BYTES]) == fmt
    heic = io.BytesIO()
    pillow_heif.from_pillow(_picture(0)).save(heic)
    assert formats.sniff(heic.getvalue()[: formats.SNIFF_BYTES]) == "HEIF"
    mp4 = b"\x00\x00\x00\x18ftypmp42\x00\x00\x00\x00mp42isom"
    assert formats.sniff(mp4) is None and formats.sniff(b"BM plain text") is None


def test_importing_vlsearch_leaves_pillow_without_the_heif_opener():
    code = ("import sys, vlsearch, vlsearch.data.images, vlsearch.data.sources; from PIL import Image; "
            "Image.init(); print('pillow_heif' in sys.modules, 'HEIF' in Image.OPEN)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_a_heic_without_its_decoder_names_the_package(tmp_path, monkeypatch):
    path = tmp_path / "a.heic"
    _save(_picture(0), path)
    monkeypatch.setattr(formats, "heif_available", lambda: False)
    with pytest.raises(DecodeError, match="pip install pillow-heif") as info:
        open_image(path)
    assert info.value.kind == "missing-decoder"


def test_unreadable_images_are_counted_and_named_with_their_fix(tmp_path, tiny_checkpoint, monkeypatch):
    folder = tmp_path / "photos"
    folder.mkdir()
    _picture(0).save(folder / "good.jpg")
    _save(_picture(1), folder / "phone.heic")
    _picture(2).save(folder / "scan.dat", format="JPEG")
    (folder / "raw.CR2").write_bytes(b"II*\x00" + bytes(60))
    monkeypatch.setattr(formats, "heif_available", lambda: False)
    result = runner.invoke(app, ["index", str(folder), str(tmp_path / "c"), "--model", "vlsearch-tiny",
                                 "--pretrained", str(tiny_checkpoint), "--workers", "0"])
    assert result.exit_code == 0, result.output
    assert "1 images, 0 captions, 3 failures (" in result.output
    for words in ("1 raw", "1 missing-decoder", "1 unknown-extension", "phone.heic", "pip install pillow-heif",
                  "raw.CR2", "export it as JPEG", "scan.dat", "rename it to .jpg"):
        assert words in result.output, words
    failures = {r["path"]: r for r in Collection.open(tmp_path / "c").failures().to_pylist()}
    assert {p: r["kind"] for p, r in failures.items()} == {
        "phone.heic": "missing-decoder", "raw.CR2": "raw", "scan.dat": "unknown-extension"}
    assert "pip install pillow-heif" in failures["phone.heic"]["message"]

    monkeypatch.setattr(formats, "heif_available", formats._register_heif)  # installed now
    (folder / "phone.heic").touch()
    (folder / "late.CR2").write_bytes(b"II*\x00" + bytes(60))
    result = runner.invoke(app, ["index", str(folder), str(tmp_path / "c"), "--workers", "0"])
    assert result.exit_code == 0, result.output
    assert "1 failures (1 raw)" in result.output and "late.CR2" in result.output  # a sync names its new failures
    assert "phone.heic" in Collection.open(tmp_path / "c").read_table(columns=["path"]).column("path").to_pylist()
