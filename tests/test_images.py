from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from vlsearch.errors import DecodeError
from vlsearch.images import open_image


def _bytes(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize(
    "img,fmt",
    [
        (Image.new("CMYK", (20, 10), (0, 255, 255, 0)), "JPEG"),
        (Image.new("L", (20, 10), 128), "PNG"),
        (Image.fromarray(np.full((10, 20), 40000, np.uint16)), "PNG"),
        (Image.new("RGBA", (20, 10), (255, 0, 0, 0)), "PNG"),
        (Image.new("1", (20, 10), 1), "PNG"),
    ],
)
def test_every_mode_becomes_rgb(img, fmt):
    out = open_image(_bytes(img, fmt))
    assert out.mode == "RGB" and out.size == (20, 10)


def test_transparent_palette_is_composited_on_white():
    img = Image.new("P", (8, 8), 0)
    img.putpalette([0, 0, 0] * 256)
    out = open_image(_bytes(img, "PNG", transparency=0))
    assert out.getpixel((0, 0)) == (255, 255, 255)


def test_exif_rotation_is_applied():
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    out = open_image(_bytes(img, "JPEG", exif=exif))
    assert out.size == (20, 40)


@pytest.mark.parametrize(
    "data,kind",
    [(b"", "empty"), (b"\x00garbage" * 10, "unidentified"), (b"hello, I am text", "unidentified")],
)
def test_bad_bytes_raise_typed_errors(data, kind):
    with pytest.raises(DecodeError) as info:
        open_image(data)
    assert info.value.kind == kind


def test_truncated_jpeg_is_corrupt():
    data = _bytes(Image.new("RGB", (64, 64), (1, 2, 3)), "JPEG")
    with pytest.raises(DecodeError) as info:
        open_image(data[: len(data) // 2])
    assert info.value.kind == "corrupt"


def test_decompression_bomb_is_refused_before_decoding():
    data = _bytes(Image.new("L", (3000, 3000)), "PNG")
    with pytest.raises(DecodeError) as info:
        open_image(data, max_pixels=1_000_000)
    assert info.value.kind == "bomb"


def test_missing_and_broken_symlink(tmp_path):
    with pytest.raises(DecodeError, match="missing"):
        open_image(tmp_path / "nope.jpg")
    (tmp_path / "link.jpg").symlink_to(tmp_path / "gone.jpg")
    with pytest.raises(DecodeError) as info:
        open_image(tmp_path / "link.jpg")
    assert info.value.kind == "broken-symlink"
