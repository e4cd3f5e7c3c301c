"""Reading input images by URI, and decoding them safely.

Local paths and s3:// always work (through `Storage`). http(s):// is off unless a job allows it, and even
then never reaches loopback, private, link-local, multicast or reserved addresses: rows come from users,
and a fetcher that follows any URL is a way into the cluster's own network (SSRF). Every resolved address
is checked and the connection goes to the checked address, so DNS cannot answer differently the second time.
"""

from __future__ import annotations

import http.client
import io
import ipaddress
import socket
import ssl
import time
from urllib.parse import urljoin, urlsplit

import structlog
from PIL import Image, ImageOps, UnidentifiedImageError

from factory.errors import InputError
from factory.io.storage import Storage, is_remote

log = structlog.get_logger(__name__)

DEFAULT_MAX_BYTES = 32 * 1024 * 1024
DEFAULT_TIMEOUT_S = 10.0
DEFAULT_MAX_PIXELS = 40_000_000
MAX_REDIRECTS = 5
_CHUNK = 64 * 1024
_USER_AGENT = "factory-fetch/0.1"

# Formats a content pipeline needs. Pillow can open many more; each extra decoder is attack surface.
# (Multi-picture JPEGs from phone cameras open through the JPEG opener.)
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")


def fetch_bytes(
    uri: str,
    storage: Storage,
    *,
    allow_http: bool = False,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> bytes:
    """The bytes at `uri` (local path, s3://, or http(s):// when allowed), at most `max_bytes` of them."""
    scheme = uri.split("://", 1)[0].lower() if "://" in uri else ""
    if scheme in ("http", "https"):
        if not allow_http:
            raise InputError(f"{uri}: http(s) inputs are off for this job (set allow_http: true to allow them)")
        return _fetch_http(uri, timeout_s=timeout_s, max_bytes=max_bytes)
    if is_remote(uri) and scheme != "s3":
        raise InputError(f"{uri}: unsupported scheme {scheme!r} (use a local path, s3:// or http(s)://)")
    return storage.read_bytes(uri, max_bytes=max_bytes)


def load_image(
    uri: str,
    storage: Storage,
    *,
    allow_http: bool = False,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Image.Image:
    """`fetch_bytes` then `decode_image`."""
    data = fetch_bytes(uri, storage, allow_http=allow_http, timeout_s=timeout_s, max_bytes=max_bytes)
    return decode_image(data, uri, max_pixels=max_pixels)


# ---- images -------------------------------------------------------------------------------------------


def decode_image(data: bytes, source: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode `data` into an RGB image, refusing non-images, corrupt or truncated files and decompression bombs.

    The pixel cap is checked on the header's size, before any pixel is decoded: a few KB of PNG can
    claim gigabytes of pixels. Pillow's own guard (an error only past 2 x MAX_IMAGE_PIXELS, ~179 M) is
    too loose to rely on.
    """
    try:
        img = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except Image.DecompressionBombError as exc:
        raise InputError(f"{source}: image too large ({exc})") from exc
    except UnidentifiedImageError as exc:
        raise InputError(f"{source}: not an image (or not one of {', '.join(IMAGE_FORMATS)})") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise InputError(f"{source}: corrupt image header ({exc})") from exc

    width, height = img.size
    if width <= 0 or height <= 0:
        raise InputError(f"{source}: image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise InputError(f"{source}: image too large: {width}x{height} pixels, limit is {max_pixels}")

    try:
        img.load()
        # Phone photos store their rotation in EXIF; the model should see them upright.
        img = ImageOps.exif_transpose(img)
    except Image.DecompressionBombError as exc:
        raise InputError(f"{source}: image too large ({exc})") from exc
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError) as exc:
        # Pillow reports truncation as OSError and broken streams as any of these.
        raise InputError(f"{source}: corrupt or truncated image ({exc})") from exc
    return _to_rgb(img)


def _to_rgb(img: Image.Image) -> Image.Image:
    # convert("RGB") drops alpha onto black, which turns transparent logos into black squares:
    # flatten onto white instead.
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


# ---- http ---------------------------------------------------------------------------------------------


def address_problem(ip: str) -> str | None:
    """Why `ip` must not be fetched from (e.g. "loopback"), or None for a public address."""
    addr = ipaddress.ip_address(ip.split("%", 1)[0])  # drop an IPv6 zone id
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1
    # Most specific first: Python counts link-local, 0.0.0.0/8 and 240/4 as "private" too.
    for kind in ("unspecified", "loopback", "link_local", "multicast", "reserved", "private"):
        if getattr(addr, f"is_{kind}"):
            return kind.replace("_", "-")
    if not addr.is_global:
        return "non-public"  # shared (100.64/10), documentation and other special ranges
    return None


def resolve_public(host: str, port: int) -> list[str]:
    """Every address `host` resolves to; an `InputError` if any of them is not public."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise InputError(f"{host}: cannot resolve host ({exc.strerror})") from exc
    ips = list(dict.fromkeys(info[4][0] for info in infos))
    if not ips:
        raise InputError(f"{host}: resolves to no address")
    for ip in ips:
        problem = address_problem(str(ip))
        if problem:
            log.warning("fetch.refused_host", host=host, address=str(ip), kind=problem)
            # Refuse the host, not just the address: a name that mixes public and private
            # answers is exactly what a rebinding attack looks like.
            raise InputError(f"{host}: resolves to {problem} address {ip}; refused")
    return [str(ip) for ip in ips]


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """An HTTP connection to a pre-checked address, keeping `host` for the Host header."""

    def __init__(self, host: str, port: int, ip: str, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self._ip = ip

    def connect(self) -> None:
        self.sock = socket.create_connection((self._ip, self.port), self.timeout)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS to a pre-checked address; the certificate is still verified against the host name."""

    def __init__(self, host: str, port: int, ip: str, timeout: float) -> None:
        self._tls = ssl.create_default_context()
        super().__init__(host, port, timeout=timeout, context=self._tls)
        self._ip = ip

    def connect(self) -> None:
        sock = socket.create_connection((self._ip, self.port), self.timeout)
        self.sock = self._tls.wrap_socket(sock, server_hostname=self.host)


def _fetch_http(uri: str, *, timeout_s: float, max_bytes: int) -> bytes:
    # One deadline for the whole fetch, redirects included: a per-read timeout alone lets a server
    # that drips one byte at a time hold a worker forever.
    deadline = time.monotonic() + timeout_s
    url = uri
    for _ in range(MAX_REDIRECTS + 1):
        status, location, body = _get_once(url, uri, deadline=deadline, max_bytes=max_bytes)
        if location is None:
            if status != 200:
                raise InputError(f"{uri}: HTTP {status}")
            return body
        url = urljoin(url, location)
        if urlsplit(url).scheme.lower() not in ("http", "https"):
            raise InputError(f"{uri}: redirected to a non-http URL; refused")
    raise InputError(f"{uri}: more than {MAX_REDIRECTS} redirects")


def _get_once(url: str, source: str, *, deadline: float, max_bytes: int) -> tuple[int, str | None, bytes]:
    """(status, redirect location or None, body) for one GET of `url`."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    host = parts.hostname
    if not host:
        raise InputError(f"{source}: URL has no host")
    if parts.username or parts.password:
        raise InputError(f"{source}: credentials in URLs are not supported")
    try:
        port = parts.port or (443 if scheme == "https" else 80)
    except ValueError as exc:
        raise InputError(f"{source}: bad port in {url}") from exc
    ip = resolve_public(host, port)[0]
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query

    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise InputError(f"{source}: timed out")
    conn_cls = _PinnedHTTPSConnection if scheme == "https" else _PinnedHTTPConnection
    conn = conn_cls(host, port, ip, remaining)
    try:
        conn.request("GET", target, headers={"User-Agent": _USER_AGENT, "Accept-Encoding": "identity"})
        # Kept here because getresponse() may hand the socket over to the response and forget it.
        sock = conn.sock
        resp = conn.getresponse()
        if resp.status in (301, 302, 303, 307, 308):
            location = resp.getheader("Location")
            if not location:
                raise InputError(f"{source}: HTTP {resp.status} without a Location")
            return resp.status, location, b""
        if resp.status != 200:
            return resp.status, None, b""
        length = resp.getheader("Content-Length")
        if length and length.isdigit() and int(length) > max_bytes:
            raise InputError(f"{source}: larger than the {max_bytes} byte limit ({length} bytes)")
        return resp.status, None, _read_capped(resp, sock, source, deadline=deadline, max_bytes=max_bytes)
    except (OSError, http.client.HTTPException) as exc:
        # socket.timeout and ssl errors are OSErrors.
        raise InputError(f"{source}: fetch failed: {exc or type(exc).__name__}") from exc
    finally:
        conn.close()


def _read_capped(
    resp: http.client.HTTPResponse,
    sock: socket.socket | None,
    source: str,
    *,
    deadline: float,
    max_bytes: int,
) -> bytes:
    buf = bytearray()
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise InputError(f"{source}: timed out while reading")
        if sock is not None:
            sock.settimeout(remaining)
        chunk = resp.read1(_CHUNK)
        if not chunk:
            return bytes(buf)
        buf += chunk
        # Checked while streaming: Content-Length can be absent or lie.
        if len(buf) > max_bytes:
            raise InputError(f"{source}: larger than the {max_bytes} byte limit")
