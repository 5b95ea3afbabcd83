"""Which files are images, and what to do with those vlsearch cannot read.

A folder walk takes a file as an image when its extension is one of :data:`IMAGE_EXTENSIONS`
(those Pillow decodes, HEIC/HEIF through pillow-heif, and camera RAW files), or when its first
bytes say it is an image (:func:`sniff`) whatever its extension. The decoder then refuses, as a
failure row with the fix in its message, a RAW file from any source (:func:`refusal` kind ``raw``),
a file a folder walk took for its bytes (``unknown-extension``: rename it) and a HEIC/HEIF file
when pillow-heif is missing (``missing-decoder``): nothing that looks like an image is skipped
silently. (A manifest's images are decoded whatever their extension.)

pillow-heif's opener is registered with Pillow the first time a HEIC/HEIF file is opened
(:func:`heif_available`), not on import, so importing vlsearch leaves Pillow as it found it.
"""

from __future__ import annotations

import functools
import os

from vlsearch.core.errors import DecodeError

#: Extensions of files Pillow decodes (AVIF natively since Pillow 11.2; HEIC/HEIF through pillow-heif).
DECODABLE_EXTENSIONS = frozenset({
    ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".apng", ".webp", ".bmp", ".gif", ".tiff", ".tif",
    ".avif", ".heic", ".heif", ".hif",
})
#: Camera RAW files: taken as images so that each is reported, but not decoded.
RAW_EXTENSIONS = frozenset({
    ".cr2", ".cr3", ".crw", ".nef", ".nrw", ".arw", ".srf", ".sr2", ".dng", ".raf", ".orf", ".rw2",
    ".pef", ".srw", ".x3f", ".3fr", ".erf", ".kdc", ".mrw", ".rwl", ".iiq",
})
#: What a folder walk takes as an image by its name.
IMAGE_EXTENSIONS = DECODABLE_EXTENSIONS | RAW_EXTENSIONS
#: Files never opened to look for image bytes: captions, sidecars, manifests, videos, documents.
NOT_IMAGE_EXTENSIONS = frozenset({
    ".txt", ".json", ".xmp", ".aae", ".csv", ".tsv", ".parquet", ".tar", ".md", ".html", ".pdf",
    ".mov", ".mp4", ".m4v", ".avi", ".mkv", ".3gp", ".mp3", ".wav", ".m4a", ".zip", ".gz", ".db", ".ini",
})
#: Bytes :func:`sniff` looks at.
SNIFF_BYTES = 64

_HEIF_BRANDS = frozenset({b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"hevm", b"hevs", b"mif1", b"msf1"})
_AVIF_BRANDS = frozenset({b"avif", b"avis"})
#: The extension to rename a file to, by the format its bytes say.
_RENAME_TO = {"JPEG": ".jpg", "PNG": ".png", "GIF": ".gif", "WEBP": ".webp", "TIFF": ".tif", "BMP": ".bmp",
              "HEIF": ".heic", "AVIF": ".avif"}


def extension(name: str) -> str:
    """A file name's extension, lower case, with its dot ("" when it has none)."""
    return os.path.splitext(name)[1].lower()


def is_image_name(name: str) -> bool:
    """Whether a file name has an image extension (:data:`IMAGE_EXTENSIONS`, any case)."""
    return extension(name) in IMAGE_EXTENSIONS


def worth_sniffing(name: str) -> bool:
    """Whether a file without an image extension may still be an image (its bytes are looked at)."""
    ext = extension(name)
    return ext not in IMAGE_EXTENSIONS and ext not in NOT_IMAGE_EXTENSIONS and not name.startswith(".")


def _ftyp_brands(head: bytes) -> set[bytes]:
    """The major and compatible brands of an ISO base media ``ftyp`` box at the start of ``head``."""
    if head[4:8] != b"ftyp":
        return set()
    end = min(int.from_bytes(head[:4], "big"), len(head))
    return {head[8:12], *(head[i : i + 4] for i in range(16, end - 3, 4))}


def sniff(head: bytes) -> str | None:
    """The image format the first bytes of a file say (``JPEG``, ``PNG``, ``GIF``, ``WEBP``,
    ``TIFF``, ``BMP``, ``HEIF``, ``AVIF``, ``JPEG XL``), or None."""
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "TIFF"
    if head[:2] == b"BM" and len(head) >= 18 and int.from_bytes(head[14:18], "little") in (12, 40, 52, 56, 64, 108, 124):
        return "BMP"  # the info header size too: "BM" alone starts plenty of text files
    if head.startswith(b"\xff\x0a") or head.startswith(b"\x00\x00\x00\x0cJXL \r\n\x87\n"):
        return "JPEG XL"
    brands = _ftyp_brands(head)
    if brands & _AVIF_BRANDS:
        return "AVIF"
    if brands & _HEIF_BRANDS:
        return "HEIF"
    return None


@functools.cache
def _register_heif() -> bool:
    try:
        import pillow_heif
    except ImportError:
        return False
    pillow_heif.register_heif_opener()
    return True


def heif_available() -> bool:
    """Register pillow-heif's HEIC/HEIF opener with Pillow (once); False when it is not installed."""
    return _register_heif()


def missing_heif() -> DecodeError:
    """The failure of a HEIC/HEIF file when pillow-heif is not installed."""
    return DecodeError("missing-decoder", "a HEIC/HEIF image, and its decoder is not installed: pip install pillow-heif")


def ready_for(head: bytes) -> str | None:
    """Make sure Pillow can open a file starting with ``head`` (registering pillow-heif for HEIF);
    the format :func:`sniff` says. Raises :func:`missing_heif`'s error for HEIF without pillow-heif."""
    fmt = sniff(head)
    if fmt == "HEIF" and not heif_available():
        raise missing_heif()
    return fmt


def refusal(name: str, sniffed: str | None = None) -> DecodeError | None:
    """Why a file named ``name`` is not decoded, with the fix, or None. ``sniffed``: the image
    format its bytes say, when it was taken as an image for them and not for its extension."""
    ext = extension(name)
    if ext in RAW_EXTENSIONS:
        return DecodeError("raw", f"a camera RAW file ({ext}), which vlsearch does not decode: export it as JPEG, "
                                  "HEIC or TIFF (your camera's software, darktable, or `dcraw -T`) and index the export")
    if sniffed is None:
        return None
    rename = _RENAME_TO.get(sniffed)
    fix = f"rename it to {rename} to index it" if rename else "convert it to JPEG, PNG or HEIC to index it"
    return DecodeError("unknown-extension", f"a {sniffed} image by its bytes, under the extension "
                                            f"{ext or '(none)'} which vlsearch does not index: {fix}")


__all__ = ["DECODABLE_EXTENSIONS", "IMAGE_EXTENSIONS", "NOT_IMAGE_EXTENSIONS", "RAW_EXTENSIONS", "extension",
           "heif_available", "is_image_name", "missing_heif", "ready_for", "refusal", "sniff", "worth_sniffing"]
