"""Opening images safely: any source form, any mode, EXIF orientation, bounded size.

Every format of :mod:`vlsearch.data.formats` (HEIC/HEIF through pillow-heif, registered when the
first one is met); animated images (GIF, WebP, APNG) give their first frame. The EXIF orientation
is applied here, the one place every caller (indexing, query images, thumbnails) opens images
through, so stored widths and heights are the upright size; the file's ``Image.Exif`` is kept
for :func:`file_exif` (the photo metadata columns read it without a second read of the file).

Used by query-side encoding (``Encoder.encode_images``) and by the offline decoder
(``indexing.decode``), so a picture is turned into pixels the same way everywhere.
:func:`split_preprocess` cuts a model's preprocess where the PIL work ends, so decode workers ship
uint8 pixels and the encoding process normalises whole batches (:class:`SplitPreprocess`).
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from vlsearch.core.inputs import ImageInput
from vlsearch.core.errors import DecodeError
from vlsearch.data.formats import SNIFF_BYTES, ready_for

try:  # libjpeg-turbo straight into a numpy array; optional: without it Pillow decodes the same scale
    import simplejpeg
except ImportError:  # pragma: no cover - depends on the environment
    simplejpeg = None

if TYPE_CHECKING:  # torch loads where pixels are made, not for opening an image
    import torch


#: Images above this many pixels are refused as decompression bombs (PIL's own default is 89M
#: with a warning only; we make it a hard error at a smaller, still generous bound).
MAX_PIXELS = 64_000_000

ImageFile.LOAD_TRUNCATED_IMAGES = False
#: ``Image.info`` key where :func:`open_image` records the upright size before any ``draft``.
ORIGINAL_SIZE_KEY = "vlsearch_original_size"
#: ``Image.info`` key where :func:`open_image` keeps the file's ``Image.Exif`` (None: unreadable).
EXIF_KEY = "vlsearch_exif"


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode (P+transparency, LA, CMYK, I;16, F, 1...) to 8-bit RGB.

    Transparent pixels are composited on white so palette/alpha images look as a viewer shows them.
    """
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # 16-bit / 32-bit grayscale: rescale to 8 bit instead of clipping.
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
        ready_for(_head(fp))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                img = Image.open(fp)
                w, h = img.size
                if w * h > max_pixels:
                    raise DecodeError("bomb", f"declared size {w}x{h} exceeds {max_pixels} pixels")
                if getattr(img, "is_animated", False):
                    img.seek(0)
                turbo = _turbo_decode(fp, img, draft_size)
                if turbo is not None:
                    img = turbo
                else:
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
    exif = image_exif(img)
    try:
        swap = exif is not None and exif.get(0x0112, 1) in (5, 6, 7, 8)
        img = ImageOps.exif_transpose(img)
    except Exception:  # malformed EXIF must not lose an otherwise good image
        swap = False
    out = to_rgb(img)
    out.info[ORIGINAL_SIZE_KEY] = (h, w) if swap else (w, h)
    out.info[EXIF_KEY] = exif
    return out


#: Pillow modes of the JPEGs :func:`_turbo_decode` decodes, and the colour space it asks for.
_TURBO_MODES = {"RGB": "RGB", "L": "GRAY"}


def draft_scale(size: tuple[int, int], draft_size: int | None) -> int:
    """The DCT scale denominator (1, 2, 4 or 8) Pillow's ``draft`` picks for a JPEG of ``size``:
    the largest that keeps both sides at least ``draft_size``."""
    if not draft_size:
        return 1
    fit = min(size[0] // draft_size, size[1] // draft_size)
    return next((s for s in (8, 4, 2) if fit >= s), 1)


def _turbo_decode(fp: io.BytesIO | Path, header: Image.Image, draft_size: int | None) -> Image.Image | None:
    """A baseline/progressive RGB or grayscale JPEG decoded by simplejpeg at the scale Pillow's
    ``draft`` would pick (the same pixels' size, 1.5x faster on 3000x2000 photos: no RGBX unpacking),
    carrying the header's EXIF and XMP so orientation and photo columns read as before. None when
    simplejpeg is absent or the file is not such a JPEG (Pillow decodes it). Corrupt or truncated
    data raises ``ValueError`` (simplejpeg is strict, like Pillow without ``LOAD_TRUNCATED_IMAGES``)."""
    colorspace = _TURBO_MODES.get(header.mode)
    if simplejpeg is None or header.format != "JPEG" or colorspace is None:
        return None
    data = fp.getvalue() if isinstance(fp, io.BytesIO) else fp.read_bytes()
    scale = draft_scale(header.size, draft_size)
    w, h = -(-header.size[0] // scale), -(-header.size[1] // scale)
    arr = simplejpeg.decode_jpeg(data, colorspace=colorspace, min_width=w, min_height=h)
    img = Image.fromarray(arr[:, :, 0] if colorspace == "GRAY" else arr, mode=header.mode)
    img.info.update({k: header.info[k] for k in ("exif", "xmp", "icc_profile") if k in header.info})
    return img


def image_exif(img: Image.Image) -> Image.Exif | None:
    """``img.getexif()``, or None when the EXIF block is malformed."""
    try:
        return img.getexif()
    except Exception:  # malformed EXIF: the image still opens, with no metadata
        return None


def file_exif(img: Image.Image) -> Image.Exif | None:
    """The EXIF of the image an :func:`open_image` result was made from (None: unreadable)."""
    return img.info.get(EXIF_KEY)


def _head(fp: io.BytesIO | Path) -> bytes:
    if isinstance(fp, io.BytesIO):
        head = fp.read(SNIFF_BYTES)
        fp.seek(0)
        return head
    try:
        with open(fp, "rb") as fh:
            return fh.read(SNIFF_BYTES)
    except OSError:  # Image.open reports it as it always has
        return b""


def original_size(img: Image.Image) -> tuple[int, int]:
    """Upright ``(width, height)`` of the file behind an :func:`open_image` result (before ``draft``)."""
    return tuple(img.info.get(ORIGINAL_SIZE_KEY, img.size))


def missing_file(path: str | os.PathLike) -> DecodeError:
    """The error for a path that does not exist: ``broken-symlink`` when it is a dangling link."""
    kind = "broken-symlink" if os.path.islink(path) else "missing"
    return DecodeError(kind, f"no such file: {path}")


def _as_file(src: ImageInput):
    if isinstance(src, (bytes, bytearray, memoryview)):
        if len(src) == 0:
            raise DecodeError("empty", "zero bytes")
        return io.BytesIO(bytes(src))
    path = Path(os.fsdecode(src)) if not isinstance(src, Path) else src
    if not path.exists():
        raise missing_file(path)
    if path.stat().st_size == 0:
        raise DecodeError("empty", f"zero-byte file: {path}")
    return path


#: Preprocess steps that take and return a PIL image (torchvision and open_clip class names).
_PIL_STEPS = {"Resize", "CenterCrop", "ResizeKeepRatio", "CenterCropOrPad"}
#: Steps that only convert the mode to RGB: :class:`_ToUint8` does that itself.
_RGB_STEPS = {"MaybeConvertMode", "_convert_to_rgb"}


#: Images per step of :meth:`SplitPreprocess.normalise` on a CPU.
NORMALISE_TILE = 4


class _ToUint8:
    """PIL image -> uint8 ``(3, H, W)`` tensor (a channels-last view of the HWC pixels)."""

    def __call__(self, img: Image.Image) -> torch.Tensor:
        import torch

        arr = np.array(img if img.mode == "RGB" else img.convert("RGB"), dtype=np.uint8)  # writable copy
        return torch.from_numpy(arr).permute(2, 0, 1)


@dataclass(frozen=True)
class SplitPreprocess:
    """A model preprocess in two parts: ``pil(image)`` -> uint8 ``(3, H, W)`` pixels (decode
    workers), :meth:`normalise` -> the float batch the model takes (encoding process).

    Together they give bit for bit what the whole preprocess gives; the worker skips the float
    conversion (one worker decodes 721 instead of 534 flickr8k images/s, benchmarks/RESULTS.md) and
    ships a quarter of the bytes.
    """

    pil: Callable[[Image.Image], torch.Tensor]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def normalise(self, pixels: torch.Tensor, dtype: torch.dtype | None = None, memory_format: Any = None,
                  tile: int | None = NORMALISE_TILE) -> torch.Tensor:
        """uint8 ``(B, 3, H, W)`` -> ``dtype`` (float32 by default) in ``memory_format`` (the input's by
        default), with the same float32 operations as ``ToTensor`` + ``Normalize`` and one rounding to
        ``dtype`` at the end, so a bf16 batch equals the float32 one cast to bf16.

        ``tile`` images at a time, written straight into the output: the float32 intermediate of a
        few images stays in cache, which halves a CPU batch's cost against whole-batch passes
        (``benchmarks/bench_encode.py``). None: the whole batch at once (a GPU runs one kernel per op).
        """
        import torch

        mean = torch.tensor(self.mean, dtype=torch.float32, device=pixels.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32, device=pixels.device).view(1, -1, 1, 1)
        out = torch.empty_like(pixels, dtype=dtype or torch.float32, memory_format=memory_format or torch.preserve_format)
        step = tile or max(len(pixels), 1)
        for start in range(0, len(pixels), step):
            out[start : start + step] = pixels[start : start + step].float().div_(255).sub_(mean).div_(std)
        return out


def split_preprocess(preprocess: Any) -> SplitPreprocess | None:
    """Cut a ``Compose([PIL steps..., ToTensor, Normalize])`` (open_clip's eval transform) into a
    :class:`SplitPreprocess`; None for any other preprocess (it is then run whole in the workers)."""
    from torchvision import transforms as T

    steps = list(getattr(preprocess, "transforms", None) or [])
    if len(steps) < 2 or not isinstance(steps[-2], T.ToTensor) or not isinstance(steps[-1], T.Normalize):
        return None
    names = [getattr(step, "__name__", type(step).__name__) for step in steps[:-2]]
    if any(name not in _PIL_STEPS | _RGB_STEPS for name in names):
        return None
    head = [step for step, name in zip(steps, names) if name in _PIL_STEPS]
    norm = steps[-1]
    if getattr(norm, "inplace", False):
        return None
    return SplitPreprocess(T.Compose([*head, _ToUint8()]), tuple(map(float, norm.mean)), tuple(map(float, norm.std)))
