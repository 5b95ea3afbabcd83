from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from vlsearch.core.errors import DecodeError
from vlsearch.data.images import open_image, split_preprocess


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


def test_split_preprocess_gives_the_whole_preprocess_bit_for_bit(tiny_encoder):
    import torch

    split = split_preprocess(tiny_encoder.preprocess)
    assert split is not None and tiny_encoder.decode_transform.__class__ is split.pil.__class__
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((50, 80), (97, 31))]
    images.append(Image.new("L", (40, 40), 77))  # not RGB: converted like the preprocess does
    raw = torch.stack([tiny_encoder.decode_transform(img) for img in images])
    assert raw.dtype == torch.uint8 and raw.shape[1] == 3
    assert torch.equal(split.normalise(raw), torch.stack([tiny_encoder.preprocess(img) for img in images]))
    # the encoder takes either: uint8 pixels are normalised where the model runs
    np.testing.assert_allclose(tiny_encoder.encode_image_tensors(raw),
                               tiny_encoder.encode_image_tensors(split.normalise(raw)), atol=1e-6)


def test_normalise_tiles_into_the_models_dtype_and_layout_with_one_rounding(tiny_encoder):
    import torch

    from indexing.decode import stack_pixels
    split = split_preprocess(tiny_encoder.preprocess)
    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 256, (60, 90, 3), dtype=np.uint8)) for _ in range(7)]
    raw = stack_pixels([tiny_encoder.decode_transform(img) for img in images])
    assert raw.is_contiguous(memory_format=torch.channels_last)  # the workers' stack: no transposing copy
    whole = torch.stack([tiny_encoder.preprocess(img) for img in images])
    for tile in (1, 3, None):  # 7 images: a last, partial tile
        out = split.normalise(raw, torch.bfloat16, torch.contiguous_format, tile=tile)
        assert out.dtype == torch.bfloat16 and out.is_contiguous()
        assert torch.equal(out, whole.to(torch.bfloat16))  # float32 arithmetic, then one rounding
        cl = split.normalise(raw, tile=tile)
        assert cl.is_contiguous(memory_format=torch.channels_last) and torch.equal(cl, whole)
    assert split.normalise(raw[:0]).shape == (0, *raw.shape[1:])


def test_a_preprocess_that_does_not_split_runs_whole(tiny_encoder):
    import torch
    from torchvision import transforms as T

    from vlsearch.models.encoder import Encoder
    custom = T.Compose([T.Resize(8), T.Grayscale(3), T.ToTensor(), T.Normalize((0.5,) * 3, (0.5,) * 3)])
    assert split_preprocess(custom) is None  # Grayscale is not a known PIL-only step
    assert split_preprocess(lambda img: torch.zeros(3, 8, 8)) is None
    assert split_preprocess(T.Compose([T.Resize(8), T.ToTensor()])) is None  # no Normalize to move
    enc = Encoder(tiny_encoder.model, custom, tiny_encoder.tokenizer, tiny_encoder.info, tiny_encoder.device, "fp32")
    assert enc.decode_transform is custom
    with pytest.raises(TypeError, match="does not split"):
        enc.image_input(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))
