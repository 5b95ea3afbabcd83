"""Where data lives: a local path or an fsspec URL (``s3://bucket/x``, ``file:///x``, ``memory://x``).

Sources, their records and manifests are all opened through :func:`open_location`, so a remote
location reads like a local one once its protocol's package (``s3fs`` for ``s3://``...) is installed.
"""

from __future__ import annotations

import os
import re
from typing import Any

from vlsearch.core.errors import FilesystemNotInstalledError, SourceError

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*(://|::)")


def is_url(location: str | os.PathLike) -> bool:
    """Whether a source or record location is an fsspec URL (``s3://b/x``, ``file:///x``), not a local path."""
    return isinstance(location, str) and _URL.match(location) is not None


def url_fs(url: str) -> tuple[Any, str]:
    """``(fsspec filesystem, path inside it)`` of a URL. :class:`FilesystemNotInstalledError` names
    the package to install when the protocol's implementation is missing; :class:`SourceError` for
    an unknown protocol."""
    import fsspec
    from fsspec.registry import known_implementations

    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as exc:
        protocol = (re.findall(r"([A-Za-z][A-Za-z0-9+.\-]*)://", url) or [url.split("::")[0]])[-1]
        package = known_implementations.get(protocol, {}).get("class", "").split(".")[0]
        raise FilesystemNotInstalledError(
            f"reading {protocol}:// URLs needs the {package or 'fsspec implementation'} package, which is not "
            f"installed ({exc})" + (f": pip install {package}" if package else "")) from None
    except ValueError as exc:
        raise SourceError(f"cannot read {url}: {exc} (not a protocol fsspec knows)") from None


def open_location(location: str | os.PathLike, mode: str = "rb") -> Any:
    """Open a local path or an fsspec URL for binary reading."""
    if is_url(location):
        fs, path = url_fs(location)
        return fs.open(path, mode)
    return open(location, mode)


def location_suffix(location: str | os.PathLike) -> str:
    """The lower-case extension of a path or URL (``".csv"``), or ``""``."""
    return os.path.splitext(os.fspath(location))[1].lower()
