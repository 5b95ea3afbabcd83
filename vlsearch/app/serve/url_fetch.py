"""Fetching a query image from a URL (``/knn-service``'s ``image_url``, only with ``serve
--allow-url-fetch``) without turning the server into a proxy into its own network (SSRF).

* Only ``http`` and ``https`` URLs, without credentials.
* The host is resolved once and **every** address it resolves to must be public
  (:func:`public_address`: not private, loopback, link-local, reserved, shared, multicast or
  unspecified; an IPv4-mapped IPv6 address is judged as its IPv4 address). The connection then goes
  to that checked address (HTTPS still verifies the certificate for the host name), so a second,
  different DNS answer cannot send it elsewhere.
* Redirects are followed by hand, at most :data:`MAX_REDIRECTS`, each one checked the same way.
* The body is read up to ``max_bytes`` (more is refused), within ``timeout`` seconds overall.

:class:`UrlFetcher` takes its resolver and opener as arguments: the seams tests use instead of the
network.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import time
from dataclasses import dataclass
from typing import Callable
from urllib.parse import urljoin, urlsplit

from vlsearch.core.errors import InvalidQueryError

from vlsearch.app.serve.errors import UploadTooLargeError

MAX_REDIRECTS = 3
_REDIRECTS = (301, 302, 303, 307, 308)
_CHUNK = 64 * 1024


@dataclass(frozen=True)
class Target:
    """One checked request: the URL's scheme, host and port, the address to connect to, and the
    path with its query."""

    scheme: str
    host: str
    port: int
    address: str
    path: str


#: ``(host, port) -> addresses`` it resolves to.
Resolver = Callable[[str, int], list[str]]
#: ``(target, max_bytes, timeout) -> (HTTP status, Location header or None, body)``.
Opener = Callable[[Target, int, float], tuple[int, "str | None", bytes]]


def resolve_host(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to (IPv4 and IPv6)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise InvalidQueryError(f"image_url: cannot resolve {host!r} ({exc})") from None
    return list(dict.fromkeys(str(info[4][0]).split("%")[0] for info in infos))


def public_address(address: str) -> bool:
    """Whether ``address`` is a public (globally routable, unicast) IP address."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS to a given address, with SNI and certificate checks for the URL's host name."""

    def __init__(self, host: str, port: int, address: str, timeout: float):
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self._address = address

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


def open_target(target: Target, max_bytes: int, timeout: float) -> tuple[int, str | None, bytes]:
    """GET ``target`` over the network, connecting to ``target.address`` only."""
    if target.scheme == "https":
        conn: http.client.HTTPConnection = _PinnedHTTPSConnection(target.host, target.port, target.address, timeout)
    else:
        conn = http.client.HTTPConnection(target.address, target.port, timeout=timeout)
    deadline = time.monotonic() + timeout
    try:
        host = target.host if target.port in (80, 443) else f"{target.host}:{target.port}"
        conn.request("GET", target.path, headers={"Host": host, "Accept": "image/*", "User-Agent": "vlsearch"})
        response = conn.getresponse()
        if response.status in _REDIRECTS:
            return response.status, response.getheader("Location"), b""
        declared = response.getheader("Content-Length")
        if declared is not None and declared.isdigit() and int(declared) > max_bytes:
            raise UploadTooLargeError(f"image_url: the image has {declared} bytes; this server takes at most {max_bytes}")
        chunks, size = [], 0
        while size <= max_bytes:
            if time.monotonic() > deadline:
                raise InvalidQueryError(f"image_url: the download took longer than {timeout:g} s")
            chunk = response.read(min(_CHUNK, max_bytes + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > max_bytes:
            raise UploadTooLargeError(f"image_url: the image is larger than this server's limit of {max_bytes} bytes")
        return response.status, None, b"".join(chunks)
    except (OSError, http.client.HTTPException) as exc:
        raise InvalidQueryError(f"image_url: cannot fetch it ({exc})") from None
    finally:
        conn.close()


class UrlFetcher:
    """Fetches images from public http(s) URLs (see the module docstring); InvalidQueryError (or
    UploadTooLargeError) says why a URL is refused."""

    def __init__(self, max_bytes: int, timeout: float, resolver: Resolver = resolve_host,
                 opener: Opener = open_target):
        self.max_bytes, self.timeout = max_bytes, timeout
        self.resolver, self.opener = resolver, opener

    def target(self, url: str) -> Target:
        """The checked target of ``url``: scheme, host, and a public address it resolves to."""
        try:
            parts = urlsplit(url)
            port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
        except ValueError as exc:
            raise InvalidQueryError(f"image_url is not a valid URL ({exc})") from None
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            raise InvalidQueryError(f"image_url must be an http or https URL, not {scheme or 'a bare path'}:")
        if not parts.hostname or parts.username is not None or parts.password is not None:
            raise InvalidQueryError("image_url must name a host (and carry no credentials)")
        addresses = self.resolver(parts.hostname, port)
        refused = [a for a in addresses if not public_address(a)]
        if not addresses or refused:
            raise InvalidQueryError(f"image_url: {parts.hostname} resolves to a private, loopback, link-local or "
                                    f"reserved address ({', '.join(refused) or 'none'}): refused")
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        return Target(scheme, parts.hostname, port, addresses[0], path)

    def fetch(self, url: str) -> bytes:
        """The body of ``url`` (following at most MAX_REDIRECTS redirects, each checked)."""
        deadline = time.monotonic() + self.timeout
        for _ in range(MAX_REDIRECTS + 1):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise InvalidQueryError(f"image_url: no answer within {self.timeout:g} s")
            status, location, body = self.opener(self.target(url), self.max_bytes, remaining)
            if status in _REDIRECTS and location:
                url = urljoin(url, location)
                continue
            if status != 200:
                raise InvalidQueryError(f"image_url answered HTTP {status}")
            if len(body) > self.max_bytes:
                raise UploadTooLargeError(f"image_url: the image is larger than this server's limit of "
                                          f"{self.max_bytes} bytes")
            return body
        raise InvalidQueryError(f"image_url redirected more than {MAX_REDIRECTS} times")
