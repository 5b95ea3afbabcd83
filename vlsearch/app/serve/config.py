"""``ServeConfig``: every knob of the server, checked once before anything starts."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from vlsearch.core.errors import ServeConfigError

#: Most results one request may ask for (``k + offset``).
MAX_RESULTS = 1000
MIN_TOKEN_LENGTH = 16
_LOOPBACK_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost")


@dataclass(frozen=True)
class ServeConfig:
    """How ``vlsearch serve`` runs.

    Binding anywhere but loopback needs ``token`` (checked in constant time on every API call)
    or an explicit ``no_auth=True``. ``cors_origins`` is empty: browsers on other origins get no
    CORS headers unless asked for. Uploads above ``max_upload_bytes`` get 413; images above
    ``max_image_pixels`` are refused as decompression bombs. Thumbnails are at most
    ``max_thumbnail_size`` pixels a side and cached up to ``thumbnail_cache_bytes``. Each
    collection follows the versions syncs commit unless ``pin_version``.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    token: str | None = None
    no_auth: bool = False
    cors_origins: tuple[str, ...] = ()
    max_upload_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    max_thumbnail_size: int = 512
    thumbnail_cache_bytes: int = 64 * 1024 * 1024
    max_results: int = MAX_RESULTS
    device: str = "cpu"
    mmap: bool = False
    #: Uvicorn's log level ("warning" keeps benchmarks and tests quiet).
    log_level: str = "info"
    searcher_options: dict = field(default_factory=dict, hash=False)
    #: Serve the version each collection has at start, whatever syncs commit (else the server
    #: moves to each new version, checking every ``follow_interval`` seconds).
    pin_version: bool = False
    follow_interval: float = 1.0
    #: ``serve --watch``: ``"[NAME=]SOURCE"`` folders (or manifests) synced into the served
    #: collections as they change (:mod:`vlsearch.app.serve.watching`).
    watch: tuple[str, ...] = ()
    #: Serve clip-retrieval's back-end API (``/indices-list``, ``/knn-service``, ``/metadata``:
    #: :mod:`vlsearch.app.serve.clip_retrieval`) beside ``/api``.
    clip_retrieval_api: bool = True
    #: Let ``/knn-service`` fetch a request's ``image_url`` (public http(s) addresses only, at most
    #: ``max_upload_bytes``, within ``url_fetch_timeout`` seconds): off, as it makes the server
    #: fetch URLs on a client's behalf (:mod:`vlsearch.app.serve.url_fetch`).
    allow_url_fetch: bool = False
    url_fetch_timeout: float = 10.0

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ServeConfigError(f"port must be in 0..65535, not {self.port}")
        for name in ("max_upload_bytes", "max_image_pixels", "max_thumbnail_size", "max_results"):
            if getattr(self, name) < 1:
                raise ServeConfigError(f"{name} must be >= 1, not {getattr(self, name)}")
        if self.watch and self.pin_version:
            raise ServeConfigError("--watch syncs the collection while --pin-version keeps serving its old version: "
                                   "give one or the other")
        if not self.url_fetch_timeout > 0:
            raise ServeConfigError(f"url_fetch_timeout must be a positive number of seconds, not {self.url_fetch_timeout}")
        if not self.follow_interval > 0:
            raise ServeConfigError(f"follow_interval must be a positive number of seconds, not {self.follow_interval}")
        if self.token is not None and self.no_auth:
            raise ServeConfigError("give either --token or --no-auth, not both")
        if self.token is not None and len(self.token) < MIN_TOKEN_LENGTH:
            raise ServeConfigError(f"the token must have at least {MIN_TOKEN_LENGTH} characters "
                                   "(e.g. `python -c 'import secrets; print(secrets.token_urlsafe())'`)")
        if not is_loopback(self.host) and self.token is None and not self.no_auth:
            raise ServeConfigError(
                f"refusing to serve on {self.host}, which is reachable from other machines, without access "
                "control: give --token TOKEN (clients send `Authorization: Bearer TOKEN`) or, to serve "
                "openly on purpose, --no-auth")
        for origin in self.cors_origins:
            if origin != "*" and not origin.startswith(("http://", "https://")):
                raise ServeConfigError(f"CORS origin {origin!r} must look like https://host[:port] (or be *)")


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine."""
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
