"""``ImageInput``: what a caller may pass as an image — a PIL image, a path, or encoded bytes.

Defined here, without importing PIL, so that light modules (the HTTP client) can name it."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Union

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

ImageInput = Union["Image.Image", str, os.PathLike, bytes, bytearray, memoryview]
