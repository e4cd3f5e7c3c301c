"""One filesystem layer for local paths and ``s3://bucket/key`` URIs.

Everything the jobs read or write goes through `Storage`, so S3 costs nothing extra anywhere else
(the img2dataset habit). A `Storage` is shipped to Ray workers: it carries only its settings and builds
its boto3 client and pyarrow filesystem lazily, on the side that uses them.

Every failure a person can act on is an `InputError` whose one line names the URI and the reason.
"""

from __future__ import annotations

import errno
import http.client
import io
import mimetypes
import os
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from typing import IO, Any
from urllib.parse import urlsplit

from factory.errors import InputError, StorageUnavailable

S3_SCHEME = "s3://"
FILE_SCHEME = "file://"
DEFAULT_REGION = "us-east-1"

# S3 error codes, grouped by what a person should do about them.
_NOT_FOUND = frozenset({"NoSuchKey", "404", "NotFound"})
_DENIED = frozenset(
    {"AccessDenied", "403", "Forbidden", "AllAccessDisabled", "InvalidAccessKeyId", "SignatureDoesNotMatch"}
)
_PRECONDITION_FAILED = frozenset({"PreconditionFailed", "412"})
# Codes a store answers when it is briefly overloaded or failing; botocore retries them, and what is still
# failing after its attempts is an outage, not a bad input.
_UNAVAILABLE = frozenset({
    "SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "Throttling", "ThrottlingException",
    "RequestTimeTooSkewed", "500", "502", "503", "504",
})
# Calls per S3 request before an error is final (botocore's standard mode: exponential backoff with jitter).
DEFAULT_MAX_ATTEMPTS = 8
# Re-opened reads of one object body after its stream broke mid-way.
BODY_READ_ATTEMPTS = 5
# What link() says on filesystems without hard links (some FUSE and network mounts).
_NO_HARD_LINKS = frozenset({errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV, errno.EMLINK})


def is_s3(uri: str) -> bool:
    return uri.startswith(S3_SCHEME)


def is_remote(uri: str) -> bool:
    """True for any URI with a scheme other than file:// (s3, http, ...)."""
    return "://" in uri and not uri.startswith(FILE_SCHEME)


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("bucket", "a/b")``; the key may be empty."""
    rest = uri[len(S3_SCHEME) :]
    bucket, _, key = rest.partition("/")
    if len(bucket) < 3 or "?" in bucket or "#" in bucket:
        raise InputError(f"{uri}: not a valid s3://bucket/key URI")
    return bucket, key


def local_path(uri: str) -> str:
    """The absolute local path for a plain path or a ``file://`` URI."""
    if uri.startswith(FILE_SCHEME):
        uri = uri[len(FILE_SCHEME) :]
    elif is_remote(uri):
        raise InputError(f"{uri}: not a local path")
    return os.path.abspath(os.path.expanduser(uri))


def join(base: str, *parts: str) -> str:
    """Join path parts onto a local path or an s3:// URI with '/'.

    Parts often come from row ids and tenant names, so a part that would climb out of `base`
    ('..', an absolute path) is refused rather than trusted.
    """
    segments: list[str] = []
    for part in parts:
        text = str(part).replace("\\", "/")
        pieces = [s for s in text.split("/") if s not in ("", ".")]
        if ".." in pieces or text.startswith("/"):
            raise InputError(f"{part!r}: path part would leave {base}")
        segments.extend(pieces)
    if not segments:
        return base
    return base.rstrip("/") + "/" + "/".join(segments)


def _s3_error(uri: str, exc: Exception) -> InputError | StorageUnavailable:
    from botocore.exceptions import ClientError, NoCredentialsError, PartialCredentialsError

    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        if code in _UNAVAILABLE or int(status) >= 500:
            return StorageUnavailable(f"{uri}: S3 unavailable ({code or status}) after retries")
        if code == "NoSuchBucket":
            return InputError(f"{uri}: no such bucket")
        if code in _NOT_FOUND:
            return InputError(f"{uri}: no such file")
        if code in _DENIED:
            return InputError(f"{uri}: access denied ({code})")
        message = str(err.get("Message", "")).replace("\n", " ")
        return InputError(f"{uri}: S3 error {code}: {message}".rstrip(": "))
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if isinstance(exc, NoCredentialsError | PartialCredentialsError):
        return InputError(f"{uri}: {text}")
    # botocore's connection errors (endpoint unreachable, connection dropped, read timeouts) after its retries.
    return StorageUnavailable(f"{uri}: S3 unreachable after retries: {text}")


def _broken_stream(exc: BaseException) -> bool:
    """A body read that failed part-way through: worth opening the object again from where it broke."""
    from botocore.exceptions import BotoCoreError
    from urllib3.exceptions import HTTPError as Urllib3Error

    return isinstance(exc, OSError | BotoCoreError | Urllib3Error | http.client.HTTPException)


def _local_error(uri: str, exc: OSError) -> InputError:
    if isinstance(exc, FileNotFoundError):
        return InputError(f"{uri}: no such file")
    if isinstance(exc, PermissionError):
        return InputError(f"{uri}: access denied")
    if isinstance(exc, IsADirectoryError):
        return InputError(f"{uri}: is a directory")
    if isinstance(exc, NotADirectoryError):
        return InputError(f"{uri}: a parent is not a directory")
    return InputError(f"{uri}: {exc.strerror or exc}")


def _env_endpoint() -> str | None:
    # Same precedence as boto3: the service-specific variable wins over the global one.
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def _env_region() -> str:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or DEFAULT_REGION


class Storage:
    """Reads, writes and lists local paths and s3:// URIs.

    Settings are taken from the environment when the object is built (on the driver) and travel with it,
    so workers talk to the same endpoint even if their environment differs. Credentials are not captured:
    each side finds its own through the usual AWS chain (env vars, profile, instance role).
    """

    def __init__(self, endpoint_url: str | None = None, region: str | None = None,
                 max_attempts: int = DEFAULT_MAX_ATTEMPTS) -> None:
        self.endpoint_url = endpoint_url if endpoint_url is not None else _env_endpoint()
        self.region = region or _env_region()
        self.max_attempts = max_attempts
        self._init_cache()

    def _init_cache(self) -> None:
        self._lock = threading.Lock()
        self._s3_client: Any = None
        self._arrow_s3: Any = None

    # Clients hold sockets and locks: drop them when pickled, rebuild them on first use on the other side.
    def __getstate__(self) -> dict[str, Any]:
        return {"endpoint_url": self.endpoint_url, "region": self.region, "max_attempts": self.max_attempts}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.endpoint_url = state["endpoint_url"]
        self.region = state["region"]
        self.max_attempts = state.get("max_attempts", DEFAULT_MAX_ATTEMPTS)
        self._init_cache()

    def __repr__(self) -> str:
        return f"Storage(endpoint_url={self.endpoint_url!r}, region={self.region!r})"

    # ---- clients -------------------------------------------------------------------------------------

    @property
    def s3(self) -> Any:
        """The boto3 S3 client (thread-safe once built)."""
        if self._s3_client is None:
            with self._lock:
                if self._s3_client is None:
                    import boto3
                    from botocore.config import Config

                    # A session of our own: boto3's default session is shared and not thread-safe.
                    session = boto3.session.Session()
                    self._s3_client = session.client(
                        "s3",
                        endpoint_url=self.endpoint_url,
                        region_name=self.region,
                        config=Config(
                            max_pool_connections=32,
                            retries={"mode": "standard", "total_max_attempts": self.max_attempts},
                        ),
                    )
        return self._s3_client

    def _arrow_s3_fs(self) -> Any:
        if self._arrow_s3 is None:
            with self._lock:
                if self._arrow_s3 is None:
                    from pyarrow import fs as pafs

                    kwargs: dict[str, Any] = {
                        "region": self.region,
                        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=self.max_attempts),
                    }
                    if self.endpoint_url:
                        # pyarrow's S3FileSystem does not reliably honour AWS_ENDPOINT_URL: say it explicitly.
                        parts = urlsplit(self.endpoint_url)
                        kwargs["endpoint_override"] = parts.netloc or parts.path
                        kwargs["scheme"] = parts.scheme or "https"
                    self._arrow_s3 = pafs.S3FileSystem(**kwargs)
        return self._arrow_s3

    def arrow_filesystem(self, uri: str) -> tuple[Any, str]:
        """(pyarrow FileSystem, path within it) for pyarrow reads and writes (Parquet, datasets)."""
        if is_s3(uri):
            bucket, key = split_s3(uri)
            return self._arrow_s3_fs(), f"{bucket}/{key}".rstrip("/")
        from pyarrow import fs as pafs

        return pafs.LocalFileSystem(), local_path(uri)

    # ---- reads ---------------------------------------------------------------------------------------

    def read_bytes(self, uri: str, max_bytes: int | None = None) -> bytes:
        """The whole object. With `max_bytes`, a larger object is refused without reading all of it.

        botocore retries a failed request, not a body that breaks while streaming: that is read again here."""
        for attempt in range(1, BODY_READ_ATTEMPTS + 1):
            try:
                with self.open_read(uri) as stream:
                    data = stream.read() if max_bytes is None else stream.read(max_bytes + 1)
                break
            except Exception as exc:  # noqa: BLE001 - classified just below
                if isinstance(exc, InputError | StorageUnavailable) or not _broken_stream(exc):
                    raise
                if attempt == BODY_READ_ATTEMPTS:
                    raise StorageUnavailable(f"{uri}: read kept breaking ({_short(exc)})") from exc
                time.sleep(min(2.0, 0.1 * 2**attempt))
        if max_bytes is not None and len(data) > max_bytes:
            raise InputError(f"{uri}: larger than the {max_bytes} byte limit")
        return data

    def open_range(self, uri: str, start: int, end: int) -> IO[bytes]:
        """A buffered stream of bytes [start, end) of the object; a broken read resumes where it stopped."""
        return io.BufferedReader(_RangeReader(self, uri, start, end), buffer_size=1 << 20)

    def _open_body(self, uri: str, start: int, end: int) -> Any:
        if is_s3(uri):
            bucket, key = split_s3(uri)
            try:
                return self.s3.get_object(Bucket=bucket, Key=key, Range=f"bytes={start}-{end - 1}")["Body"]
            except Exception as exc:  # noqa: BLE001
                raise _s3_error(uri, exc) from exc
        stream = self.open_read(uri)
        stream.seek(start)
        return stream

    def stat(self, uri: str) -> tuple[int, str]:
        """(size in bytes, version): the S3 ETag, or the local modification time; a changed file gets another."""
        if is_s3(uri):
            bucket, key = split_s3(uri)
            try:
                head = self.s3.head_object(Bucket=bucket, Key=key)
            except Exception as exc:  # noqa: BLE001
                raise _s3_error(uri, exc) from exc
            return int(head["ContentLength"]), str(head.get("ETag", "")).strip('"')
        try:
            info = os.stat(local_path(uri))
        except OSError as exc:
            raise _local_error(uri, exc) from exc
        return info.st_size, str(info.st_mtime_ns)

    def open_read(self, uri: str) -> IO[bytes]:
        """A buffered binary stream (iterable by lines) that reads the object lazily."""
        if is_s3(uri):
            bucket, key = split_s3(uri)
            try:
                body = self.s3.get_object(Bucket=bucket, Key=key)["Body"]
            except Exception as exc:  # noqa: BLE001 - every boto failure becomes one line
                raise _s3_error(uri, exc) from exc
            # botocore's StreamingBody iterates in fixed chunks, not lines; a BufferedReader gives
            # readline/iteration and read(n) on top of its readinto.
            return io.BufferedReader(body, buffer_size=1 << 20)  # type: ignore[arg-type]
        path = local_path(uri)
        if os.path.isdir(path):
            raise InputError(f"{uri}: is a directory")
        try:
            return open(path, "rb")  # noqa: SIM115 - the caller owns the stream
        except OSError as exc:
            raise _local_error(uri, exc) from exc

    def exists(self, uri: str) -> bool:
        """True when a file (an S3 object, not a prefix) is at `uri`."""
        if not is_s3(uri):
            return os.path.isfile(local_path(uri))
        from botocore.exceptions import ClientError

        bucket, key = split_s3(uri)
        if not key:
            return False
        try:
            self.s3.head_object(Bucket=bucket, Key=key)
        except ClientError as exc:
            if str(exc.response.get("Error", {}).get("Code")) in _NOT_FOUND:
                return False
            raise _s3_error(uri, exc) from exc
        except Exception as exc:  # noqa: BLE001
            raise _s3_error(uri, exc) from exc
        return True

    def is_dir(self, uri: str) -> bool:
        """True for a local directory, or an S3 prefix with at least one object under it."""
        if not is_s3(uri):
            return os.path.isdir(local_path(uri))
        return next(iter(self.list_files(uri)), None) is not None

    def list_files(self, prefix_uri: str, suffixes: Iterable[str] | None = None) -> Iterator[str]:
        """Files under a directory / S3 prefix, recursively, in sorted (byte) order, lazily.

        `prefix_uri` names a folder: ``s3://b/data`` lists ``data/...``, not ``data.csv``. A folder or prefix
        that does not exist lists as empty, on both sides.
        `suffixes` (case-insensitive, e.g. ``(".jsonl", ".csv.gz")``) keeps only matching names.
        """
        wanted = tuple(s.lower() for s in suffixes) if suffixes is not None else None

        def keep(name: str) -> bool:
            return wanted is None or name.lower().endswith(wanted)

        if is_s3(prefix_uri):
            yield from self._list_s3(prefix_uri, keep)
        else:
            root = local_path(prefix_uri)
            # Like an S3 prefix with nothing under it: a folder not written yet lists as empty.
            if os.path.isdir(root):
                yield from _walk_sorted(root, keep)

    def list_prefix(self, uri_prefix: str) -> Iterator[str]:
        """Files whose URI starts with `uri_prefix` in its last segment (``.../part-abc-`` lists
        ``part-abc-*`` in that folder, not below it), sorted. One S3 listing of that prefix; one folder scan."""
        if is_s3(uri_prefix):
            yield from (uri for uri in self._list_s3(uri_prefix, lambda _: True, folder=False) if "/" not in
                        uri[len(uri_prefix):])
            return
        path = local_path(uri_prefix)
        folder, stem = os.path.split(path)
        try:
            with os.scandir(folder) as it:
                names = sorted(e.name for e in it if e.name.startswith(stem) and e.is_file(follow_symlinks=False))
        except FileNotFoundError:
            return
        except OSError as exc:
            raise _local_error(folder, exc) from exc
        yield from (os.path.join(folder, name) for name in names)

    def _list_s3(self, prefix_uri: str, keep: Any, folder: bool = True, after: str | None = None) -> Iterator[str]:
        """`after`: a key relative to the prefix; only keys after it are listed (a resumed listing)."""
        bucket, prefix = split_s3(prefix_uri)
        if folder and prefix and not prefix.endswith("/"):
            prefix += "/"
        start = {} if after is None else {"StartAfter": prefix + after}
        try:
            pages = self.s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix, **start)
            for page in pages:
                for obj in page.get("Contents", ()):
                    key = obj["Key"]
                    # Keys ending in '/' are folder markers made by consoles, not files.
                    if not key.endswith("/") and keep(key):
                        yield f"{S3_SCHEME}{bucket}/{key}"
        except Exception as exc:  # noqa: BLE001
            if isinstance(exc, InputError):
                raise
            raise _s3_error(prefix_uri, exc) from exc

    # ---- writes --------------------------------------------------------------------------------------

    def write_bytes(self, uri: str, data: bytes) -> None:
        """Write atomically: readers see the old object or the whole new one, never a part."""
        if is_s3(uri):
            bucket, key = split_s3(uri)
            try:
                self.s3.put_object(Bucket=bucket, Key=key, Body=data, **_content_type(key))
            except Exception as exc:  # noqa: BLE001
                raise _s3_error(uri, exc) from exc
            return
        path = local_path(uri)
        try:
            tmp = _write_temp(path, data)
            os.replace(tmp, path)
        except OSError as exc:
            raise _local_error(uri, exc) from exc

    def put_if_absent(self, uri: str, data: bytes) -> bool:
        """Write only if nothing is there yet. True if this call wrote it, False if something already was.

        This is what makes concurrent or repeated runs safe: exactly one writer wins and the first body stays.
        """
        if is_s3(uri):
            from botocore.exceptions import ClientError

            bucket, key = split_s3(uri)
            try:
                self.s3.put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*", **_content_type(key))
            except ClientError as exc:
                if str(exc.response.get("Error", {}).get("Code")) in _PRECONDITION_FAILED:
                    return False
                raise _s3_error(uri, exc) from exc
            except Exception as exc:  # noqa: BLE001
                raise _s3_error(uri, exc) from exc
            return True
        path = local_path(uri)
        try:
            tmp = _write_temp(path, data)
        except OSError as exc:
            raise _local_error(uri, exc) from exc
        try:
            # link() fails if the target exists and publishes a complete file in one step, which
            # O_EXCL alone would not (a reader could see the file half-written).
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        except OSError as exc:
            if exc.errno not in _NO_HARD_LINKS:
                raise _local_error(uri, exc) from exc
            return _put_exclusive(uri, path, data)
        finally:
            _unlink_quietly(tmp)

    def delete(self, uri: str) -> None:
        """Remove a file; removing one that is not there is not an error (as on S3)."""
        if is_s3(uri):
            bucket, key = split_s3(uri)
            try:
                self.s3.delete_object(Bucket=bucket, Key=key)
            except Exception as exc:  # noqa: BLE001
                raise _s3_error(uri, exc) from exc
            return
        try:
            os.remove(local_path(uri))
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise _local_error(uri, exc) from exc

    join = staticmethod(join)


def _short(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class _RangeReader(io.RawIOBase):
    """Bytes [start, end) of one object. A body that breaks part-way (a dropped connection, a reset) is opened
    again from the first byte not yet returned, a bounded number of times."""

    def __init__(self, storage: Storage, uri: str, start: int, end: int) -> None:
        super().__init__()
        self.storage, self.uri, self.position, self.end = storage, uri, start, end
        self.body: Any = None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        wanted = min(len(buffer), self.end - self.position)
        if wanted <= 0:
            return 0
        for attempt in range(1, BODY_READ_ATTEMPTS + 1):
            try:
                if self.body is None:
                    self.body = self.storage._open_body(self.uri, self.position, self.end)
                data = self.body.read(wanted)
                if not data:
                    raise EOFError(f"the stream ended at byte {self.position}, before byte {self.end}")
                buffer[: len(data)] = data
                self.position += len(data)
                return len(data)
            except (InputError, StorageUnavailable):
                raise
            except Exception as exc:  # noqa: BLE001 - a broken stream, retried below
                self._drop_body()
                if attempt == BODY_READ_ATTEMPTS or not (_broken_stream(exc) or isinstance(exc, EOFError)):
                    raise StorageUnavailable(f"{self.uri}: read failed at byte {self.position}: {_short(exc)}") from exc
                time.sleep(min(2.0, 0.1 * 2**attempt))
        return 0  # pragma: no cover - the loop returns or raises

    def _drop_body(self) -> None:
        if self.body is not None:
            try:
                self.body.close()
            except Exception:  # noqa: BLE001 - already broken
                pass
            self.body = None

    def close(self) -> None:
        self._drop_body()
        super().close()


def _content_type(key: str) -> dict[str, str]:
    # So images open in a browser from a console or presigned link instead of downloading as octet-stream.
    kind, _ = mimetypes.guess_type(key)
    return {"ContentType": kind} if kind else {}


def _walk_sorted(root: str, keep: Any) -> Iterator[str]:
    # Sorting each folder's entries by name, with '/' appended to folders, makes this depth-first walk
    # yield full paths in plain string order -- the same order S3 lists keys in -- without collecting them.
    try:
        with os.scandir(root) as it:
            entries = sorted(it, key=lambda e: e.name + "/" if e.is_dir(follow_symlinks=True) else e.name)
    except OSError as exc:
        raise _local_error(root, exc) from exc
    for entry in entries:
        if entry.is_dir(follow_symlinks=True):
            yield from _walk_sorted(entry.path, keep)
        elif entry.is_file(follow_symlinks=True) and keep(entry.name):
            yield entry.path


def _current_umask() -> int:
    # Reading the umask means setting it; put it straight back.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _write_temp(path: str, data: bytes) -> str:
    """Write `data` to a hidden temp file beside `path` (same filesystem, so rename/link is atomic)."""
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".", suffix=".tmp")
    try:
        # mkstemp makes the file private (0600); outputs get the permissions any new file would get.
        os.fchmod(fd, 0o666 & ~_current_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    except BaseException:
        _unlink_quietly(tmp)
        raise
    return tmp


def _put_exclusive(uri: str, path: str, data: bytes) -> bool:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    except OSError as exc:
        raise _local_error(uri, exc) from exc
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return True


def _unlink_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass
