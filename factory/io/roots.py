"""Which image references a tenant may read: its input roots, judged before any byte of the image is read.

One rule for manifest rows (when they are validated, and again just before the fetch) and for API requests. A
root is a local folder, an ``s3://bucket/prefix/`` or an ``http(s)://host/prefix/``. A reference is inside when
every form of it -- as written, and with its percent-escapes decoded (then decoded again, for double encoding;
each form against the roots decoded as often) -- lies under one of the roots:

- local paths and ``file://`` URIs are made absolute with `..` and repeated slashes normalised, and every
  symbolic link is followed (the real path of the file and of each root), so a link to a file or folder
  outside the root is outside;
- ``s3://`` keys must be in the root's bucket and start with its prefix at a '/' boundary (``s3://b/acme/``
  does not cover ``s3://b/acme-evil/x``), and a key with a ``.`` or ``..`` segment is refused outright: S3 keys
  are literal, but a proxy or S3-compatible store that normalises paths would read another object than the one
  judged;
- ``http(s)://`` references are judged only against http(s) roots; a tenant without any is left to the job's
  ``allow_http`` and the SSRF guard in `factory.io.images` (public internet content, not another tenant's data).

`InputRoots.check` returns the reference to read (for a local file, its real path), so what is fetched is
exactly what was judged.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from urllib.parse import unquote, urlsplit

from factory.errors import InputError
from factory.io.storage import FILE_SCHEME, S3_SCHEME, local_path, split_s3

# Decoding more often than this without reaching a fixed point is an attempt to hide something.
_MAX_DECODES = 3
_SEGMENT_SEPARATORS = re.compile(r"[/\\]")
_DOT_SEGMENTS = frozenset({".", ".."})
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class OutsideRoots(InputError):
    """An image reference that is not inside the roots its tenant may read."""


def _kind(uri: str) -> str:
    """local, s3 or http; anything else is refused."""
    if uri.startswith(S3_SCHEME):
        return "s3"
    scheme = uri.split("://", 1)[0].lower() if "://" in uri else ""
    if scheme in ("http", "https"):
        return "http"
    if not scheme or uri.startswith(FILE_SCHEME):
        return "local"
    raise InputError(f"{uri}: unsupported scheme {scheme!r} (use a local path, s3:// or http(s)://)")


def _dot_segment(path: str) -> bool:
    return any(segment in _DOT_SEGMENTS for segment in _SEGMENT_SEPARATORS.split(path))


def _split_http(uri: str) -> tuple[str, str]:
    """(scheme://host[:port] lower-cased, path) of an http(s) URI."""
    parts = urlsplit(uri)
    return f"{parts.scheme.lower()}://{parts.netloc.lower()}", parts.path or "/"


def normalise_root(root: str, base_dir: str | None = None) -> str:
    """A root as `InputRoots` keeps it: ``s3://bucket/prefix/``, ``http(s)://host/prefix/``, or an absolute local
    folder ending in '/' (relative to `base_dir`, else the working directory). A `ValueError` says what is wrong."""
    root = root.strip()
    if not root:
        raise ValueError("an input root must not be empty")
    try:
        kind = _kind(root)
    except InputError as error:
        raise ValueError(str(error)) from None
    if "%" in root:
        raise ValueError(f"{root}: percent-escapes are not allowed in an input root")
    if kind == "s3":
        try:
            bucket, prefix = split_s3(root)
        except InputError as error:
            raise ValueError(str(error)) from None
        if _dot_segment(prefix.rstrip("/")) or "//" in prefix or prefix.startswith("/"):
            raise ValueError(f"{root}: an s3 root must not have '.', '..' or empty segments")
        return f"{S3_SCHEME}{bucket}/{prefix.rstrip('/') + '/' if prefix.strip('/') else ''}"
    if kind == "http":
        origin, path = _split_http(root)
        if _dot_segment(path):
            raise ValueError(f"{root}: an http(s) root must not have '.' or '..' segments")
        return f"{origin}{path.rstrip('/')}/"
    path = root[len(FILE_SCHEME):] if root.startswith(FILE_SCHEME) else root
    path = os.path.expanduser(path)
    if not os.path.isabs(path):
        path = os.path.join(base_dir or os.getcwd(), path)
    return os.path.normpath(path).rstrip("/") + "/"


def _covers(outer: str, inner: str) -> bool:
    """Whether the normalised root `inner` lies under the normalised root `outer` (both end in '/')."""
    return inner.startswith(outer)


def folder_of(uri: str) -> str:
    """The folder holding a file (local path, file:// or s3:// URI), as a root. Taken as it is: a manifest's folder
    may hold a '%', which `normalise_root` refuses in roots an operator writes."""
    if uri.startswith(S3_SCHEME):
        return uri.rsplit("/", 1)[0] + "/"
    return os.path.dirname(local_path(uri)).rstrip("/") + "/"


def _decodings(text: str) -> list[str]:
    """`text`, then each percent-decoding of it that changes it (None when they do not settle)."""
    forms = [text]
    while "%" in forms[-1] and len(forms) <= _MAX_DECODES + 1:
        decoded = unquote(forms[-1])
        if decoded == forms[-1]:
            break
        forms.append(decoded)
    return forms


@dataclass(frozen=True)
class _Level:
    """The roots as one level of percent-decoding sees them: a reference decoded k times is judged against the
    roots decoded k times (for roots an operator wrote, which hold no '%', the roots themselves)."""

    local: tuple[str, ...]  # real paths: a root may itself be a link (e.g. /data -> /mnt/data)
    s3: tuple[str, ...]
    http: tuple[str, ...]

    @classmethod
    def of(cls, roots: tuple[str, ...]) -> _Level:
        kinds = [(root, _kind(root)) for root in roots]
        return cls(local=tuple(os.path.realpath(root) for root, kind in kinds if kind == "local"),
                   s3=tuple(root for root, kind in kinds if kind == "s3"),
                   http=tuple(root for root, kind in kinds if kind == "http"))


@dataclass(frozen=True)
class InputRoots:
    """The roots one tenant's image references must lie under. `owner` names the tenant in messages."""

    owner: str
    roots: tuple[str, ...]

    @classmethod
    def of(cls, owner: str, roots: Iterable[str], base_dir: str | None = None) -> InputRoots:
        return cls(owner, tuple(dict.fromkeys(normalise_root(root, base_dir) for root in roots)))

    def narrowed(self, limits: Iterable[str]) -> InputRoots:
        """Only what both allow: each root within a limit, or each limit within a root (an intersection of
        prefix trees). A server-wide list can narrow a tenant's roots this way, never widen them."""
        limits = [normalise_root(limit) for limit in limits]
        kept = [root for root in self.roots if any(_covers(limit, root) for limit in limits)]
        kept += [limit for limit in limits if any(_covers(root, limit) for root in self.roots)]
        return InputRoots(self.owner, tuple(dict.fromkeys(kept)))

    @cached_property
    def _levels(self) -> list[_Level]:
        decoded = [_decodings(root) for root in self.roots]
        levels: list[_Level] = []
        for depth in range(_MAX_DECODES + 1):
            at = tuple(forms[min(depth, len(forms) - 1)] for forms in decoded)
            same = depth and at == tuple(forms[min(depth - 1, len(forms) - 1)] for forms in decoded)
            levels.append(levels[-1] if same else _Level.of(at))
        return levels

    def check(self, reference: str) -> str:
        """The reference to read (a local file's real path, else the reference itself), or `OutsideRoots`."""
        kind = _kind(reference)
        forms = _decodings(reference)
        if len(forms) > _MAX_DECODES + 1:
            raise self._refused(reference, forms[-1], f"percent-encoded more than {_MAX_DECODES} times")
        if kind == "http" and not self._levels[0].http:
            return reference  # no http(s) roots: allow_http and the SSRF guard decide alone
        judge = {"local": self._inside_local, "s3": self._inside_s3, "http": self._inside_http}[kind]
        # Every form is judged; the one read is the reference as written (what Storage opens).
        return [judge(reference, form, self._levels[depth]) for depth, form in enumerate(forms)][0]

    # ---- one form of a reference -------------------------------------------------------------------------

    def _inside_local(self, reference: str, form: str, roots: _Level) -> str:
        try:
            path = local_path(form)
            real = os.path.realpath(path)
        except (InputError, ValueError, OSError) as error:  # an embedded NUL byte, a loop of links
            raise self._refused(reference, form, f"not a usable path ({error})") from None
        if not any(real == root or real.startswith(root.rstrip("/") + "/") for root in roots.local):
            raise self._refused(reference, form, None if real == os.path.normpath(path) else f"it resolves to {real}")
        return real

    def _inside_s3(self, reference: str, form: str, roots: _Level) -> str:
        try:
            bucket, key = split_s3(form)
        except InputError as error:
            raise self._refused(reference, form, str(error)) from None
        if _dot_segment(key):
            raise self._refused(reference, form, "an s3 key with a '.' or '..' segment is refused")
        if not key or not any(f"{S3_SCHEME}{bucket}/{key}".startswith(root) for root in roots.s3):
            raise self._refused(reference, form, None)
        return reference

    def _inside_http(self, reference: str, form: str, roots: _Level) -> str:
        origin, path = _split_http(form)
        if _dot_segment(path):
            raise self._refused(reference, form, "a URL with a '.' or '..' segment is refused")
        if not any(f"{origin}{path}".startswith(root) for root in roots.http):
            raise self._refused(reference, form, None)
        return reference

    def _refused(self, reference: str, form: str, detail: str | None) -> OutsideRoots:
        decoded = f" (decoded: {_shown(form)})" if form != reference else ""
        because = f": {detail}" if detail else ""
        allowed = ", ".join(self.roots) or "none"
        return OutsideRoots(f"{_shown(reference)}{decoded} is outside the inputs of {self.owner}{_shown(because)} "
                            f"(allowed: {allowed})")


def _shown(text: str) -> str:
    """`text` on one line: control characters (a newline in a manifest's image field) as escapes."""
    return _CONTROL.sub(lambda found: repr(found.group())[1:-1], text)
