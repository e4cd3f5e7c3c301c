"""Reading input images by URI, and decoding them safely.

Local paths and s3:// always work (through `Storage`), within a tenant's input roots when the caller gives them
(`factory.io.roots`). http(s):// is off unless a job allows it, and even then never reaches loopback, private,
link-local, multicast or reserved addresses: rows come from users, and a fetcher that follows any URL is a way
into the cluster's own network (SSRF). Every resolved address is checked and the connection goes to the checked
address, so DNS cannot answer differently the second time.
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
from factory.io.roots import InputRoots
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
    roots: InputRoots | None = None,
) -> bytes:
    """The bytes at `uri` (local path, s3://, or http(s):// when allowed), at most `max_bytes` of them. With
    `roots`, a reference outside them is refused before anything is opened (`OutsideRoots`), and a local file is
    read at the real path that was judged: a link swapped since the row was validated cannot lead out."""
    if roots is not None:
        uri = roots.check(uri)
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


def _open_image(data: bytes, source: str) -> Image.Image:
    """Pillow's lazy open (header only), with every way it fails as one line naming the source."""
    try:
        return Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except Image.DecompressionBombError as exc:
        raise InputError(f"{source}: image too large ({exc})") from exc
    except UnidentifiedImageError as exc:
        raise InputError(f"{source}: not an image (or not one of {', '.join(IMAGE_FORMATS)})") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise InputError(f"{source}: corrupt image header ({exc})") from exc


def _open_within(data: bytes, source: str, max_pixels: int) -> Image.Image:
    """`_open_image`, refusing an image whose header claims no pixels or more than `max_pixels`."""
    img = _open_image(data, source)
    width, height = img.size
    if width <= 0 or height <= 0:
        raise InputError(f"{source}: image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise InputError(f"{source}: image too large: {width}x{height} pixels, limit is {max_pixels}")
    return img


def decode_image(data: bytes, source: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode `data` into an RGB image, refusing non-images, corrupt or truncated files and decompression bombs.

    The pixel cap is checked on the header's size, before any pixel is decoded: a few KB of PNG can
    claim gigabytes of pixels. Pillow's own guard (an error only past 2 x MAX_IMAGE_PIXELS, ~179 M) is
    too loose to rely on.
    """
    img = _open_within(data, source, max_pixels)

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


# ---- images from archives: decoded once, by rule, to what the model reads ------------------------------
#
# Every image an archive job reads goes through `prepare_image`, in the job's workers (never in the replica):
# decoded under the pixel cap, brought to 8-bit RGB by the rules below, and shrunk to the model's pixel budget.
# The rules that applied are recorded with the row (`rule`, joined with '+', or 'none'):
#
#   first-frame      animated GIF/WebP/APNG or multi-page TIFF: the first frame (what a thumbnail shows)
#   exif-rotate      EXIF orientation applied, so the model sees the photo upright (width/height are upright)
#   cmyk-to-rgb      CMYK (print JPEGs and TIFFs) converted to RGB
#   16bit-to-8bit    16-bit samples scaled to 8 bits (v * 255 / 65535, not clipped)
#   alpha-over-white transparency flattened onto white (a transparent logo stays a logo, not a black square)
#   palette-to-rgb   palette images without transparency expanded to RGB
#   grayscale-to-rgb one-channel images (L, 1) repeated into three
#   <mode>-to-rgb    any other colour space Pillow decodes (YCbCr, LAB, HSV) converted to RGB
#
# Refused, with the reason as the row's error: zero-byte files, bytes that are no image format in
# IMAGE_FORMATS, corrupt or truncated images, images over the pixel cap (decompression bombs, checked on the
# header before any pixel is decoded), and 32-bit float images (no meaningful 8-bit rule).

_ANIMATED_RULE, _EXIF_RULE = "first-frame", "exif-rotate"
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


class PreparedImage:
    """An archive image ready for the model: 8-bit RGB within the pixel budget, and what was done to it."""

    __slots__ = ("image", "format", "width", "height", "rule")

    def __init__(self, image: Image.Image, format: str, width: int, height: int, rule: str):
        self.image = image
        self.format = format  # PNG, JPEG, ... as decoded (from the bytes, not the name)
        self.width = width  # upright size of the full image, before fitting the budget
        self.height = height
        self.rule = rule


def fit_size(width: int, height: int, max_pixels: int) -> tuple[int, int]:
    """The largest size with the same aspect ratio and at most `max_pixels` pixels (the size itself if it fits)."""
    if width * height <= max_pixels:
        return width, height
    scale = (max_pixels / (width * height)) ** 0.5
    return max(1, int(width * scale)), max(1, int(height * scale))


def fit_pixels(image: Image.Image, max_pixels: int) -> Image.Image:
    """`image` shrunk (never enlarged) to at most `max_pixels` pixels, aspect ratio kept."""
    size = fit_size(*image.size, max_pixels)
    if size == image.size:
        return image
    return image.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)


def prepare_image(data: bytes, source: str, *, max_pixels: int = DEFAULT_MAX_PIXELS,
                  budget_pixels: int | None = None) -> PreparedImage:
    """Decode archive bytes by the rules above; `budget_pixels` bounds what the model will get."""
    if not data:
        raise InputError(f"{source}: empty file (0 bytes)")
    img = _open_within(data, source, max_pixels)
    fmt = img.format or "unknown"
    width, height = img.size
    if img.mode == "F":
        raise InputError(f"{source}: 32-bit float pixels are not supported (no 8-bit rule for them)")
    rules: list[str] = []
    try:
        if getattr(img, "n_frames", 1) > 1:
            rules.append(_ANIMATED_RULE)
            img.seek(0)
        if budget_pixels is not None and fmt == "JPEG":
            # JPEG can decode at 1/2, 1/4 or 1/8 scale directly: far less work for a large photo.
            img.draft(img.mode, fit_size(width, height, budget_pixels))
        orientation = img.getexif().get(0x0112, 1)
        img.load()
        if orientation not in (None, 1):
            img = ImageOps.exif_transpose(img)
            rules.append(_EXIF_RULE)
        if fmt == "PNG" and len(data) > 24 and data[24] == 16 and img.mode not in _SIXTEEN_BIT_MODES:
            rules.append("16bit-to-8bit")  # 16-bit RGB(A) PNGs: Pillow has scaled them to 8 bits already
        img = _rgb_by_rule(img, rules)
    except Image.DecompressionBombError as exc:
        raise InputError(f"{source}: image too large ({exc})") from exc
    except InputError:
        raise
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, KeyError) as exc:
        raise InputError(f"{source}: corrupt or truncated image ({exc})") from exc
    if budget_pixels is not None:
        img = fit_pixels(img, budget_pixels)
    # Width and height are the full image's, upright (orientations 5-8 turn it a quarter), whatever the draft.
    upright = (height, width) if _EXIF_RULE in rules and orientation in (5, 6, 7, 8) else (width, height)
    return PreparedImage(img, fmt, upright[0], upright[1], "+".join(rules) or "none")


def _rgb_by_rule(img: Image.Image, rules: list[str]) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in _SIXTEEN_BIT_MODES:
        import numpy as np

        rules.append("16bit-to-8bit")
        samples = np.asarray(img, dtype=np.float64)
        eight = np.clip(np.rint(samples * (255.0 / 65535.0)), 0, 255).astype(np.uint8)
        rules.append("grayscale-to-rgb")
        return Image.fromarray(eight, mode="L").convert("RGB")
    if mode == "CMYK":
        rules.append("cmyk-to-rgb")
        return img.convert("RGB")
    if mode in _ALPHA_MODES or (mode == "P" and "transparency" in img.info) or (
            mode in ("L", "RGB") and "transparency" in img.info):
        rules.append("alpha-over-white")
        return _to_rgb(img.convert("RGBA"))
    if mode == "P":
        rules.append("palette-to-rgb")
        return img.convert("RGB")
    if mode in ("L", "1"):
        rules.append("grayscale-to-rgb")
        return img.convert("RGB")
    rules.append(f"{mode.lower()}-to-rgb")
    return img.convert("RGB")
