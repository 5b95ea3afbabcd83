"""Opening images safely: any source form, any mode, EXIF orientation, bounded size.

Used by query-side encoding (``Encoder.encode_images``) and by the offline decoder
(``indexing.decode``), so a picture is turned into pixels the same way everywhere.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Union

from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from .errors import DecodeError

ImageInput = Union[Image.Image, str, os.PathLike, bytes, bytearray, memoryview]

#: Images above this many pixels are refused as decompression bombs (PIL's own default is 89M
#: with a warning only; we make it a hard error at a smaller, still generous bound).
MAX_PIXELS = 64_000_000

ImageFile.LOAD_TRUNCATED_IMAGES = False
#: ``Image.info`` key where :func:`open_image` records the upright size before any ``draft``.
ORIGINAL_SIZE_KEY = "vlsearch_original_size"


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode (P+transparency, LA, CMYK, I;16, F, 1...) to 8-bit RGB.

    Transparent pixels are composited on white so palette/alpha images look as a viewer shows them.
    """
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # 16-bit / 32-bit grayscale: rescale to 8 bit instead of clipping.
        import numpy as np

        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        scaled = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
        return Image.fromarray(scaled.astype("uint8"), mode="L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def open_image(src: ImageInput, *, draft_size: int | None = None, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Return an upright RGB PIL image from a PIL image, a file path, or encoded bytes.

    Raises :class:`DecodeError` with a ``kind`` of ``missing``, ``empty``, ``bomb``,
    ``unidentified`` or ``corrupt``. ``draft_size`` lets JPEG decoding downscale by 2/4/8 for
    speed when the image is much larger than the model input.
    """
    if isinstance(src, Image.Image):
        img = src
        img.load()
        w, h = img.size
    else:
        fp = _as_file(src)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                img = Image.open(fp)
                w, h = img.size
                if w * h > max_pixels:
                    raise DecodeError("bomb", f"declared size {w}x{h} exceeds {max_pixels} pixels")
                if getattr(img, "is_animated", False):
                    img.seek(0)
                if draft_size and img.format == "JPEG":
                    img.draft("RGB", (draft_size, draft_size))
                img.load()
        except DecodeError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise DecodeError("bomb", str(exc)) from exc
        except UnidentifiedImageError as exc:
            raise DecodeError("unidentified", "not an image file PIL can identify") from exc
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise DecodeError("corrupt", f"{type(exc).__name__}: {exc}") from exc
    try:
        swap = img.getexif().get(0x0112, 1) in (5, 6, 7, 8)
        img = ImageOps.exif_transpose(img)
    except Exception:  # malformed EXIF must not lose an otherwise good image
        swap = False
    out = to_rgb(img)
    out.info[ORIGINAL_SIZE_KEY] = (h, w) if swap else (w, h)
    return out


def original_size(img: Image.Image) -> tuple[int, int]:
    """Upright ``(width, height)`` of the file behind an :func:`open_image` result (before ``draft``)."""
    return tuple(img.info.get(ORIGINAL_SIZE_KEY, img.size))


def _as_file(src: ImageInput):
    if isinstance(src, (bytes, bytearray, memoryview)):
        if len(src) == 0:
            raise DecodeError("empty", "zero bytes")
        return io.BytesIO(bytes(src))
    path = Path(os.fsdecode(src)) if not isinstance(src, Path) else src
    if not path.exists():
        kind = "broken-symlink" if path.is_symlink() else "missing"
        raise DecodeError(kind, f"no such file: {path}")
    if path.stat().st_size == 0:
        raise DecodeError("empty", f"zero-byte file: {path}")
    return path
