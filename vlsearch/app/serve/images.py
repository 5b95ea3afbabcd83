"""Images of indexed items, found by id: the full file, and thumbnails made on demand and cached.

A request names a collection and an item id, never a path. The path comes from the item's row in
the collection's shards and is joined to the source root recorded in the manifest; the real
path (symlinks resolved) must stay inside that root, be a regular file, and be an image PIL
recognises, else the item is reported as not found. Webdataset items are read from their tar
member, located through a per-tar member table (headers only, cached).
"""

from __future__ import annotations

import io
import os
import tarfile
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from PIL import Image, UnidentifiedImageError

from vlsearch.core.cache import ByteLRU
from vlsearch.core.errors import DecodeError, ItemNotFoundError
from vlsearch.data.formats import SNIFF_BYTES, ready_for
from vlsearch.data.images import open_image

#: Tar members (and files) above this size are not read into memory to be served.
MAX_MEMBER_BYTES = 64 * 1024 * 1024
THUMBNAIL_QUALITY = 85


@dataclass(frozen=True)
class ImageFile:
    """Where an item's image lies: a file, or ``(offset, size)`` inside a tar."""

    path: str
    member: tuple[int, int] | None = None

    def read(self) -> bytes:
        with open(self.path, "rb") as f:
            if self.member is None:
                size = os.fstat(f.fileno()).st_size
                if size > MAX_MEMBER_BYTES:
                    raise ItemNotFoundError(f"image of {size} bytes is too large to serve")
                return f.read()
            offset, size = self.member
            if size > MAX_MEMBER_BYTES:
                raise ItemNotFoundError(f"tar member of {size} bytes is too large to serve")
            f.seek(offset)
            return f.read(size)


def _inside(path: str, root: str) -> bool:
    return os.path.commonpath([path, root]) == root


@lru_cache(maxsize=64)
def _tar_members(tar: str, mtime_ns: int, size: int) -> dict[str, tuple[int, int]]:
    """``member name -> (data offset, size)`` of a tar's regular files (reads headers only)."""
    try:
        with tarfile.open(tar, mode="r:") as tf:
            return {m.name: (m.offset_data, m.size) for m in tf.getmembers() if m.isfile()}
    except (tarfile.TarError, OSError) as exc:
        raise ItemNotFoundError(f"cannot read tar {os.path.basename(tar)}: {exc}") from exc


class ItemImages:
    """Resolve an item record (from the shards) to its image, safely, for one collection."""

    def __init__(self, name: str, source: dict[str, Any], cache: ByteLRU, max_pixels: int):
        self.name = name
        self.kind = source.get("type")
        self.root = source.get("path")
        self.cache = cache
        self.max_pixels = max_pixels

    def locate(self, record: dict[str, Any]) -> ImageFile:
        """The image of ``record``; ItemNotFoundError if it is outside the source root or gone."""
        rel = record.get("path")
        if not self.root or self.kind not in ("folder", "manifest", "webdataset") or not rel:
            raise ItemNotFoundError(f"collection {self.name!r} records no image source, so it serves no images")
        if self.kind == "webdataset":
            return self._tar_member(rel, (record.get("key") or ""))
        root = self.root if self.kind == "folder" else os.path.dirname(self.root)
        return ImageFile(self._checked(os.path.join(root, rel), root, record["id"]))

    def _checked(self, path: str, root: str, item_id: int) -> str:
        real, real_root = os.path.realpath(path), os.path.realpath(root)
        if not _inside(real, real_root) or not os.path.isfile(real):
            raise ItemNotFoundError(f"the image of item {item_id} in {self.name!r} is missing or outside its source")
        return real

    def _tar_member(self, rel: str, key: str) -> ImageFile:
        tar_rel, _, base = rel.rpartition("/")
        root_is_tar = os.path.isfile(self.root)
        tar = self.root if root_is_tar else os.path.join(self.root, tar_rel)
        real = self._checked(tar, os.path.dirname(self.root) if root_is_tar else self.root, rel)
        if root_is_tar and real != os.path.realpath(self.root):
            raise ItemNotFoundError(f"item {rel!r} is not in the source tar of {self.name!r}")
        stat = os.stat(real)
        member = _tar_members(real, stat.st_mtime_ns, stat.st_size).get(os.path.join(os.path.dirname(key), base))
        if member is None:
            raise ItemNotFoundError(f"{rel!r} is no longer in its tar")
        return ImageFile(real, member)

    def image(self, record: dict[str, Any]) -> tuple[bytes, str]:
        """The item's encoded image and its media type (only files PIL recognises as images)."""
        data = self.locate(record).read()
        try:
            ready_for(data[:SNIFF_BYTES])  # HEIC/HEIF: pillow-heif's opener
            with Image.open(io.BytesIO(data)) as img:
                fmt = img.format
        except (DecodeError, UnidentifiedImageError, OSError) as exc:
            raise ItemNotFoundError(f"item {record['id']} of {self.name!r} is not a readable image") from exc
        return data, Image.MIME.get(fmt or "", "application/octet-stream")

    def thumbnail(self, record: dict[str, Any], size: int) -> bytes:
        """A JPEG at most ``size`` pixels a side, upright (EXIF orientation applied by
        :func:`open_image`), from the cache or made now."""
        key = (self.name, int(record["id"]), size)
        cached = self.cache.get(key)
        if cached is not None:
            return cached
        try:
            img = open_image(self.locate(record).read(), draft_size=size, max_pixels=self.max_pixels)
        except DecodeError as exc:
            raise ItemNotFoundError(f"item {record['id']} of {self.name!r} is not a readable image: {exc}") from exc
        img.thumbnail((size, size))
        out = io.BytesIO()
        img.save(out, format="JPEG", quality=THUMBNAIL_QUALITY)
        data = out.getvalue()
        self.cache.put(key, data)
        return data
