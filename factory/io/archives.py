"""Image archives as sources: local folders, s3:// prefixes, tar shards (WebDataset) and zip files.

Listing is lazy (a folder is walked and a prefix paged as they are consumed, in a stable sorted order, and can
start after a given key, which is how an interrupted listing resumes) and reading is one member at a time:
a tar shard is streamed from its first byte to its last (never seeked, never extracted, never loaded whole),
a zip file is read through its central directory with ranged reads, one member after another.

Nothing is ever extracted or written. A member is refused, with a reason, when its name is absolute, climbs
out with `..` or holds control characters, when it is a symbolic or hard link (never followed), a device, a
FIFO or a socket (a FIFO is never opened), when it is encrypted, or when it is larger than the byte cap.
Directories are not rows. Text and metadata companions (`.txt`, `.json`, `.cls`, ...: a WebDataset sample's
other members, or a kohya dataset's captions) are skipped. Every other file is recognised by its bytes, not its
name: whether it is an image is for the decoder to say.
"""

from __future__ import annotations

import errno
import glob as globlib
import io
import os
import posixpath
import re
import stat
import tarfile
import zipfile
import zlib
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

from factory.errors import ConfigError, InputError
from factory.io.storage import S3_SCHEME, Storage, is_s3, local_path, split_s3

SourceKind = Literal["folder", "prefix", "tar", "zip", "file"]

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
ZIP_SUFFIXES = (".zip",)
# Members skipped without a row: a WebDataset sample's other members, a kohya dataset's captions, notes.
COMPANION_SUFFIXES = (
    ".txt", ".caption", ".json", ".jsonl", ".cls", ".cls2", ".tags", ".csv", ".tsv", ".yaml", ".yml", ".md",
    ".xml", ".html", ".npy", ".npz", ".pth", ".safetensors", ".ds_store",
)
S3_READ_WINDOW = 8  # objects of an s3:// page read at once by a worker
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")


@dataclass(frozen=True)
class ArchiveSource:
    """One source as resolved from what the user wrote."""

    kind: SourceKind
    uri: str

    @property
    def label(self) -> str:
        """What row ids start with for members of an archive file (its name); folders and prefixes: nothing."""
        return posixpath.basename(self.uri.rstrip("/")) if self.kind in ("tar", "zip", "file") else ""


@dataclass
class Entry:
    """One member of a source, read: its name within the source, where it came from, and its bytes or why not."""

    name: str  # "" for a problem with the archive as a whole (missing, not a tar or zip, broken mid-way)
    uri: str  # the file or object read (for an archive member: the archive)
    data: bytes | None = None
    problem: str | None = None  # a reason to reject it, found without decoding
    companion: bool = False  # a caption or metadata file: not a row (its bytes read only when asked for)


# ---- resolving what the user wrote ------------------------------------------------------------------------


def expand_braces(pattern: str) -> list[str]:
    """`shard-{000..009}.tar` (zero padding kept), `{a,b}` lists, several braces: every name, in order."""
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    body, head, tail = match.group(1), pattern[:match.start()], pattern[match.end():]
    ranged = _RANGE.match(body)
    if ranged:
        first, last = ranged.group(1), ranged.group(2)
        width = len(first) if first.lstrip("-").startswith("0") and len(first) > 1 else 0
        low, high = int(first), int(last)
        step = 1 if high >= low else -1
        options = [str(n).zfill(width) for n in range(low, high + step, step)]
    else:
        options = body.split(",")
    return [name for option in options for name in expand_braces(head + option + tail)]


def _is_tar(uri: str) -> bool:
    return uri.lower().endswith(TAR_SUFFIXES)


def _is_zip(uri: str) -> bool:
    return uri.lower().endswith(ZIP_SUFFIXES)


def resolve_sources(uris: list[str], storage: Storage) -> list[ArchiveSource]:
    """Sources from folders, s3:// prefixes, tar shards (brace patterns, local globs) and zips, in order.

    A local path that does not exist is a `ConfigError` (a typo should stop the run before it starts); a shard
    named by a pattern that is missing is not: the worker that reads it rejects it, and the others run."""
    sources: list[ArchiveSource] = []
    for uri in uris:
        names = expand_braces(uri)
        patterned = len(names) > 1
        for name in names:
            if not is_s3(name) and any(ch in name for ch in "*?[") and not os.path.exists(local_path(name)):
                matched = sorted(globlib.glob(local_path(name)))
                if not matched:
                    raise ConfigError(f"archive source {name}: no file matches")
                sources.extend(_classify(path, storage, patterned=True) for path in matched)
            else:
                sources.append(_classify(name, storage, patterned=patterned))
    return list(dict.fromkeys(sources))  # a source named twice is listed once, where it first appears


def _classify(uri: str, storage: Storage, patterned: bool) -> ArchiveSource:
    if _is_tar(uri):
        return ArchiveSource("tar", uri)
    if _is_zip(uri):
        return ArchiveSource("zip", uri)
    if is_s3(uri):
        bucket, key = split_s3(uri)
        if not bucket:
            raise ConfigError(f"archive source {uri}: no bucket")
        return ArchiveSource("prefix", uri.rstrip("/"))
    path = local_path(uri)
    if os.path.isdir(path):
        try:
            os.scandir(path).close()
        except OSError as error:  # not "no objects found" once the run has planned nothing
            raise ConfigError(f"archive source {uri}: cannot list the folder: {os_reason(error)}") from None
        return ArchiveSource("folder", path)
    if os.path.isfile(path):
        if zipfile.is_zipfile(path):
            return ArchiveSource("zip", path)
        if _tar_by_content(path):
            return ArchiveSource("tar", path)
        return ArchiveSource("file", path)
    if patterned:
        return ArchiveSource("file", path)  # read (and rejected as missing) by its worker
    raise ConfigError(f"archive source {uri}: no such file or folder")


def _tar_by_content(path: str) -> bool:
    try:
        with open(path, "rb") as handle:
            handle.seek(257)
            return handle.read(5) == b"ustar"
    except OSError:
        return False


# ---- names ------------------------------------------------------------------------------------------------


def member_problem(name: str) -> str | None:
    """Why an archive member's name is refused (absolute, `..`, control characters), or None."""
    if not name:
        return "member has an empty name (refused)"
    if _CONTROL.search(name):
        return f"member name {name!r} has control characters (refused)"
    path = name.replace("\\", "/")
    if path.startswith("/") or re.match(r"^[A-Za-z]:", path):
        return f"member {name!r} has an absolute path (refused, never extracted)"
    if ".." in path.split("/"):
        return f"member {name!r} climbs out of the archive with '..' (refused, never extracted)"
    return None


def is_companion(name: str) -> bool:
    lowered = name.lower()
    return lowered.endswith(COMPANION_SUFFIXES) or posixpath.basename(lowered).startswith("._")


# ---- listing (for planning): names in a stable order, starting after a given one ------------------------


def _order(name: str) -> tuple[str, ...]:
    return tuple(name.split("/"))


def os_reason(error: OSError) -> str:
    """`permission denied (EACCES)`: the system's words for an OSError and its errno's name."""
    words = (error.strerror or str(error)).lower()
    name = errno.errorcode.get(error.errno) if error.errno is not None else None
    return f"{words} ({name})" if name else words


def _entries_of(folder: str) -> list[os.DirEntry]:
    with os.scandir(folder) as it:
        return sorted(it, key=lambda e: e.name)


def list_folder(root: str, after: str | None = None) -> Iterator[str]:
    """Every non-directory entry under `root`, relative, '/'-separated, sorted by path components, lazily.
    Symbolic links (to files or folders) are listed, never followed: the worker rejects them. So is a subfolder
    that cannot be listed: the worker's reject names it and why. A root that cannot be listed is an `InputError`."""
    start = _order(after) if after is not None else None

    def walk(prefix: str, entries: list[os.DirEntry]) -> Iterator[str]:
        for entry in entries:
            relative = f"{prefix}{entry.name}"
            if entry.is_dir(follow_symlinks=False):
                if start is None or _order(relative) >= start[:len(_order(relative))]:
                    try:
                        children = _entries_of(entry.path)
                    except OSError:
                        if start is None or _order(relative) > start:
                            yield relative
                        continue
                    yield from walk(relative + "/", children)
            elif start is None or _order(relative) > start:
                yield relative

    try:
        top = _entries_of(root)
    except OSError as error:
        raise InputError(f"{root}: cannot list the folder: {os_reason(error)}") from error
    yield from walk("", top)


def list_prefix(storage: Storage, prefix_uri: str, after: str | None = None) -> Iterator[str]:
    """Keys under an s3:// prefix (relative to it), page by page as consumed, in S3's (byte) order."""
    bucket, prefix = split_s3(prefix_uri)
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    base = len(f"{S3_SCHEME}{bucket}/{prefix}")
    for uri in storage._list_s3(prefix_uri, lambda _: True, after=after):
        yield uri[base:]


def zip_member_count(storage: Storage, uri: str) -> int:
    """Entries in a zip's central directory (read with ranged reads: the archive is never loaded whole)."""
    with open_seekable(storage, uri) as handle:
        try:
            return len(zipfile.ZipFile(handle).infolist())
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
            raise InputError(f"{uri}: not a readable zip file ({exc})") from exc


# ---- reading members (in workers) ----------------------------------------------------------------------


def read_folder_entries(root: str, names: list[str], max_bytes: int, *, companions: bool = False
                        ) -> Iterator[Entry]:
    """`companions`: read the bytes of companions too (a trainer's captions), with the same checks as images."""
    for name in names:
        path = os.path.join(root, *name.split("/"))
        yield _read_local(path, name, max_bytes, companions)


def _read_local(path: str, name: str, max_bytes: int, companions: bool = False) -> Entry:
    entry = Entry(name=name, uri=path, companion=is_companion(name))
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        entry.problem = f"{path}: no such file (removed since it was listed)"
        return entry
    except OSError as exc:
        entry.problem = f"{path}: cannot read ({exc.strerror})"
        return entry
    kind = _kind(info.st_mode)
    if kind == "a directory":  # listed because it could not be listed itself
        entry.companion = False
        entry.problem = _unlistable(path)
        return entry
    if kind != "file":
        entry.companion = False
        entry.problem = f"{path}: {kind} (never followed or opened)"
        return entry
    if entry.companion and not companions:
        return entry
    if info.st_size > max_bytes:
        entry.problem = f"{path}: larger than the {max_bytes} byte limit ({info.st_size} bytes)"
        return entry
    try:
        # O_NOFOLLOW: a file swapped for a link after the lstat is still not followed.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        with os.fdopen(fd, "rb") as handle:
            entry.data = handle.read(max_bytes + 1)
    except OSError as exc:
        entry.problem = f"{path}: cannot read ({exc.strerror or exc})"
        return entry
    if len(entry.data) > max_bytes:
        entry.data, entry.problem = None, f"{path}: larger than the {max_bytes} byte limit"
    return entry


def _unlistable(path: str) -> str:
    try:
        os.scandir(path).close()
    except OSError as error:
        return f"{path}: folder cannot be listed: {os_reason(error)}"
    return f"{path}: folder could not be listed when its source was listed (re-run to read it)"


def _kind(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISDIR(mode):
        return "a directory"
    return "not a regular file"


def read_prefix_entries(storage: Storage, prefix_uri: str, names: list[str], max_bytes: int, *,
                        companions: bool = False) -> Iterator[Entry]:
    """Objects of one page, `S3_READ_WINDOW` read at once (a bounded window: a page is never all in memory);
    `companions`: read the bytes of companions too."""
    base = prefix_uri.rstrip("/") + "/"

    def read(name: str) -> Entry:
        uri = base + name
        entry = Entry(name=name, uri=uri, companion=is_companion(name))
        if entry.companion and not companions:
            return entry
        try:
            entry.data = storage.read_bytes(uri, max_bytes=max_bytes)
        except InputError as exc:
            entry.problem = str(exc)
        return entry

    with ThreadPoolExecutor(S3_READ_WINDOW) as pool:
        window: deque[Future[Entry]] = deque()
        for name in names:
            window.append(pool.submit(read, name))
            if len(window) >= S3_READ_WINDOW:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()


def read_file_entry(storage: Storage, uri: str, max_bytes: int) -> Iterator[Entry]:
    name = posixpath.basename(uri)
    if is_s3(uri):
        entry = Entry(name=name, uri=uri)
        try:
            entry.data = storage.read_bytes(uri, max_bytes=max_bytes)
        except InputError as exc:
            entry.problem = str(exc)
        yield entry
    else:
        yield _read_local(uri, name, max_bytes)


def read_tar_entries(storage: Storage, uri: str, max_bytes: int, skip: frozenset[str] = frozenset(), *,
                     companions: bool = False) -> Iterator[Entry]:
    """Every member of a tar shard, streamed in order (`r|*`: gzip too). A member in `skip` (committed by an
    earlier attempt) is passed over without reading its bytes. A shard that breaks mid-way ends with one entry
    saying where. Companions are passed over too, or with `companions` read and yielded like any member."""
    try:
        stream = storage.open_read(uri)
    except InputError as exc:
        yield Entry(name="", uri=uri, problem=str(exc))  # the archive as a whole: its row is the archive's
        return
    last = None
    try:
        with stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
            for member in tar:
                last = member.name
                if member.isdir():
                    continue
                entry = Entry(name=member.name, uri=uri)
                entry.problem = member_problem(member.name)
                if entry.problem is None:
                    entry.problem = _tar_kind_problem(member)
                if entry.problem is None and is_companion(member.name):
                    entry.companion = True
                    if not companions:
                        continue
                if entry.problem is None and member.name in skip:
                    continue
                if entry.problem is None and member.size > max_bytes:
                    entry.problem = f"member {member.name!r}: larger than the {max_bytes} byte limit ({member.size} bytes)"
                if entry.problem is None:
                    handle = tar.extractfile(member)  # a reader over the stream, nothing written anywhere
                    entry.data = handle.read() if handle is not None else b""
                    if len(entry.data) < member.size:
                        entry.problem, entry.data = f"member {member.name!r}: truncated ({len(entry.data)} of {member.size} bytes)", None
                yield entry
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        where = f"after member {last!r}" if last else "at its start"
        what = "not a tar archive" if last is None else "truncated or corrupt"
        yield Entry(name="", uri=uri,
                    problem=f"{uri}: {what} {where} ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})")


def _tar_kind_problem(member: tarfile.TarInfo) -> str | None:
    if member.issym():
        return f"member {member.name!r} is a symbolic link to {member.linkname!r} (never followed)"
    if member.islnk():
        return f"member {member.name!r} is a hard link to {member.linkname!r} (never followed)"
    if member.ischr() or member.isblk():
        return f"member {member.name!r} is a device (refused)"
    if member.isfifo():
        return f"member {member.name!r} is a FIFO (refused)"
    if not member.isreg():
        return f"member {member.name!r} is not a regular file (refused)"
    return None


def read_zip_entries(storage: Storage, uri: str, first: int, last: int, max_bytes: int,
                     skip: frozenset[str] = frozenset()) -> Iterator[Entry]:
    """Members `first`..`last` (central-directory order, 0-based, inclusive) of a zip, one at a time."""
    try:
        handle = open_seekable(storage, uri)
    except InputError as exc:
        yield Entry(name="", uri=uri, problem=str(exc))
        return
    with handle:
        try:
            archive = zipfile.ZipFile(handle)
            infos = archive.infolist()[first:last + 1]
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
            yield Entry(name="", uri=uri, problem=f"{uri}: not a readable zip file ({exc})")
            return
        with archive:
            for info in infos:
                if info.is_dir():
                    continue
                entry = Entry(name=info.filename, uri=uri)
                entry.problem = member_problem(info.filename) or _zip_kind_problem(info)
                if entry.problem is None and is_companion(info.filename):
                    continue
                if entry.problem is None and info.filename in skip:
                    continue
                if entry.problem is None and info.file_size > max_bytes:
                    entry.problem = (f"member {info.filename!r}: larger than the {max_bytes} byte limit "
                                     f"({info.file_size} bytes)")
                if entry.problem is None:
                    try:
                        with archive.open(info) as member:
                            data = member.read(max_bytes + 1)  # the header's size can lie: cap the read too
                        if len(data) > max_bytes:
                            entry.problem = f"member {info.filename!r}: larger than the {max_bytes} byte limit"
                        else:
                            entry.data = data
                    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError,
                            RuntimeError, ValueError) as exc:
                        entry.problem = f"member {info.filename!r}: corrupt or unreadable ({exc})"
                yield entry


def _zip_kind_problem(info: zipfile.ZipInfo) -> str | None:
    mode = info.external_attr >> 16
    if mode and stat.S_ISLNK(mode):
        return f"member {info.filename!r} is a symbolic link (never followed)"
    if mode and (stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)):
        return f"member {info.filename!r} is not a regular file (refused)"
    if info.flag_bits & 0x1:
        return f"member {info.filename!r} is encrypted (refused)"
    return None


# ---- a seekable view of a local file or an S3 object (ranged GETs) ----------------------------------------


def open_seekable(storage: Storage, uri: str) -> io.BufferedReader:
    if not is_s3(uri):
        try:
            return open(local_path(uri), "rb")  # noqa: SIM115 - the caller owns it
        except OSError as exc:
            raise InputError(f"{uri}: {exc.strerror or exc}") from exc
    size, _ = storage.stat(uri)
    return io.BufferedReader(_RangedObject(storage, uri, size), buffer_size=1 << 20)


class _RangedObject(io.RawIOBase):
    """Reads of an S3 object as ranged GETs, so zipfile can seek to its central directory and to each member."""

    def __init__(self, storage: Storage, uri: str, size: int):
        self.storage, self.uri, self.size, self.position = storage, uri, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: self.size}[whence]
        self.position = max(0, base + offset)
        return self.position

    def readinto(self, buffer) -> int:
        if self.position >= self.size:
            return 0
        end = min(self.size, self.position + len(buffer))
        with self.storage.open_range(self.uri, self.position, end) as stream:
            data = stream.read(end - self.position)
        buffer[:len(data)] = data
        self.position += len(data)
        return len(data)
