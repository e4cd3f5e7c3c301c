"""Manifest files (JSON lines, CSV, Parquet; local or s3://): finding them, streaming their rows, validating rows.

Reading never holds a whole file in memory: a manifest may have millions of rows. A broken line does not
stop the file; it becomes a record with an `error`, which `validate_record` turns into a `Reject`, so the
user gets the good rows processed and a list of bad lines with their numbers. Whole-file problems (missing,
unreadable, not a manifest at all) are `InputError`s.
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import gzip
import json
import math
import os
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import IO, Any, Literal

import structlog

from factory.errors import FactoryError, InputError, StorageUnavailable
from factory.io.storage import Storage, is_remote, is_s3, local_path
from factory.routing.parser import RequestError, parse_row
from factory.routing.requests import RowInput

log = structlog.get_logger(__name__)

Format = Literal["jsonl", "csv", "parquet"]

_FORMATS: dict[str, Format] = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
    ".csv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
}
_GZIPPABLE = frozenset({"jsonl", "csv"})
MANIFEST_SUFFIXES: tuple[str, ...] = tuple(_FORMATS) + tuple(
    f"{ext}.gz" for ext, fmt in _FORMATS.items() if fmt in _GZIPPABLE
)

# A manifest line is a row of a few short fields; a line this long is a broken file, not a row,
# and reading it whole would let one line exhaust a worker's memory.
MAX_LINE_BYTES = 4 * 1024 * 1024
PARQUET_BATCH_ROWS = 1024
_EXTRA_CELLS = "\0extra"  # DictReader's restkey: cannot clash with a real header name


@dataclass(frozen=True, slots=True)
class ManifestRecord:
    """One row of a manifest as read, before validation."""

    source: str
    line: int  # JSONL/CSV: 1-based line in the file (the CSV header is line 1); Parquet: row index + 1
    raw: dict[str, Any] | None = None
    error: str | None = None  # set when the line could not be read as a row; names the line


@dataclass(frozen=True, slots=True)
class Reject:
    """A row that will not be processed, and why: one line of the rejects table."""

    source: str
    line: int
    id: str | None
    field: str | None  # the first failing field or column; None when the line could not be read at all
    reason: str
    raw: str | None  # the row as JSON text

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---- finding manifests -------------------------------------------------------------------------------


def detect_format(uri: str) -> Format:
    """The manifest format from the file name (``.jsonl``/``.ndjson``/``.json``, ``.csv``, ``.parquet``/``.pq``,
    and ``.gz`` of the text formats)."""
    name = uri.rsplit("/", 1)[-1].lower()
    gz = name.endswith(".gz")
    stem = name[:-3] if gz else name
    ext = os.path.splitext(stem)[1]
    fmt = _FORMATS.get(ext)
    if fmt is None:
        raise InputError(f"{uri}: not a manifest file (expected one of {', '.join(MANIFEST_SUFFIXES)})")
    if gz and fmt not in _GZIPPABLE:
        raise InputError(f"{uri}: gzip is only read for JSON lines and CSV (Parquet compresses itself)")
    return fmt


def _is_manifest_name(path: str) -> bool:
    # Names starting with '.' or '_' are temp files and markers (_SUCCESS, .crc), as in Spark and Hadoop.
    name = path.rsplit("/", 1)[-1]
    return not name.startswith((".", "_")) and name.lower().endswith(MANIFEST_SUFFIXES)


def expand_manifest_uris(uris: Iterable[str], storage: Storage) -> list[str]:
    """Manifest files named by `uris`: files as given, directories and s3 prefixes expanded (recursively,
    sorted), local globs (``*``, ``?``, ``[...]``, ``**``) matched. Each file once, in order of first mention.

    An input that matches nothing is an `InputError` naming it: a job that silently reads fewer
    manifests than asked for is worse than one that does not start.
    """
    found: list[str] = []
    for uri in uris:
        found.extend(_expand_one(uri, storage))
    return list(dict.fromkeys(found))


def _expand_one(uri: str, storage: Storage) -> list[str]:
    listing_hint = f"no manifest files ({', '.join(MANIFEST_SUFFIXES)})"
    if is_s3(uri):
        if storage.exists(uri):
            detect_format(uri)
            return [uri]
        files = [f for f in storage.list_files(uri) if _is_manifest_name(f)]
        if not files:
            raise InputError(f"{uri}: no such file, and {listing_hint} under it")
        return files
    if is_remote(uri):
        raise InputError(f"{uri}: manifests are read from local paths or s3:// only")

    path = local_path(uri)
    if any(c in path for c in "*?["):
        files = []
        for match in sorted(glob.glob(path, recursive=True)):
            if os.path.isdir(match):
                files.extend(f for f in storage.list_files(match) if _is_manifest_name(f))
            elif _is_manifest_name(match):
                files.append(match)
        if not files:
            raise InputError(f"{uri}: the pattern matches {listing_hint}")
        return files
    if os.path.isdir(path):
        files = [f for f in storage.list_files(path) if _is_manifest_name(f)]
        if not files:
            raise InputError(f"{uri}: {listing_hint} in this directory")
        return files
    if os.path.isfile(path):
        detect_format(path)
        return [path]
    raise InputError(f"{uri}: no such file or directory")


# ---- reading rows ------------------------------------------------------------------------------------


def iter_manifest_records(uri: str, storage: Storage) -> Iterator[ManifestRecord]:
    """Stream the rows of one whole manifest file as `ManifestRecord`s (bad lines included, with `error` set)."""
    yield from iter_range_records(uri, storage)


def iter_range_records(
    uri: str, storage: Storage, first_line: int = 1, last_line: int | None = None, *, start: int | None = None,
    end: int | None = None, columns: tuple[str, ...] | None = None,
) -> Iterator[ManifestRecord]:
    """The rows on lines `first_line`..`last_line` of a manifest (Parquet: rows, counted from 1).

    With byte offsets (`start`, `end`: where `first_line` starts and `last_line` ends, from planning) only those
    bytes are read; without them (gzip) the file is read from its top. A CSV range past the header needs the
    header's `columns`. Decoding problems are `InputError`s; a store that keeps failing is `StorageUnavailable`.
    """
    fmt = detect_format(uri)
    if fmt == "parquet":
        yield from _iter_parquet(uri, storage, first_line, last_line)
        return
    line = first_line - 1
    try:
        stream = storage.open_range(uri, start, end) if start is not None and end is not None else storage.open_read(uri)
        with stream:
            source: IO[bytes] = stream
            if start is None and uri.lower().endswith(".gz"):
                source = gzip.GzipFile(fileobj=stream, mode="rb")  # type: ignore[assignment]
            if start is None and first_line > 1:
                _skip_lines(source, first_line - 1)
            reader = (_iter_jsonl(uri, source, first_line) if fmt == "jsonl"
                      else _iter_csv(uri, source, first_line, columns))
            for record in reader:
                if last_line is not None and record.line > last_line:
                    return
                line = record.line
                yield record
    except FactoryError:
        raise
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise InputError(f"{uri}: read failed after line {line}: {_one_line(exc)}") from exc


def _skip_lines(stream: IO[bytes], count: int) -> None:
    for _ in _iter_lines(stream, 1, count):
        pass


def _iter_lines(stream: IO[bytes], first: int = 1, limit: int | None = None) -> Iterator[tuple[int, bytes | None]]:
    """(line number, bytes) per line, numbered from `first`; bytes is None for a line over MAX_LINE_BYTES
    (skipped, not read whole). Stops after `limit` lines when given."""
    number = first - 1
    while limit is None or number - first + 1 < limit:
        data = stream.readline(MAX_LINE_BYTES + 1)
        if not data:
            return
        number += 1
        if len(data) > MAX_LINE_BYTES and not data.endswith(b"\n"):
            while True:
                rest = stream.readline(1 << 16)
                if not rest or rest.endswith(b"\n"):
                    break
            yield number, None
            continue
        yield number, data


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


# NaN/Infinity are not JSON; Python's parser accepts them unless told otherwise. One decoder for every line.
_JSON = json.JSONDecoder(parse_constant=_no_constants)


def _iter_jsonl(uri: str, stream: IO[bytes], first_line: int = 1) -> Iterator[ManifestRecord]:
    # Only the file's own start can reveal a JSON array (planning checks it before any chunk is read).
    seen_content = first_line > 1
    for number, data in _iter_lines(stream, first_line):
        if data is None:
            yield ManifestRecord(uri, number, error=f"line {number}: longer than {MAX_LINE_BYTES} bytes")
            continue
        try:
            # utf-8-sig on line 1 drops a byte-order mark some editors write.
            text = data.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as exc:
            reason = f"not valid UTF-8 ({exc.reason} at byte {exc.start + 1})"
            yield ManifestRecord(uri, number, error=f"line {number}: {reason}")
            continue
        stripped = text.strip()
        if not stripped:
            continue
        if not seen_content and (stripped == "[" or stripped.startswith("[{")):
            # One JSON document holding an array would otherwise give one error per line.
            raise InputError(f"{uri}: a JSON array, not JSON lines (write one object per line)")
        seen_content = True
        try:
            value = _JSON.decode(stripped)
        except json.JSONDecodeError as exc:
            yield ManifestRecord(uri, number, error=f"line {number}: invalid JSON: {exc.msg} (column {exc.colno})")
            continue
        except ValueError as exc:
            yield ManifestRecord(uri, number, error=f"line {number}: invalid JSON: {exc}")
            continue
        if not isinstance(value, dict):
            kind = "an array" if isinstance(value, list) else type(value).__name__
            yield ManifestRecord(uri, number, error=f"line {number}: expected a JSON object, got {kind}")
            continue
        yield ManifestRecord(uri, number, raw=value)


def header_problem(names: list[str]) -> str | None:
    """Why a CSV header cannot name a row's fields, or None."""
    dupes = sorted({n for n in names if names.count(n) > 1 and n})
    return f"column {dupes[0]!r} appears more than once" if dupes else None


def _iter_csv(uri: str, stream: IO[bytes], first_line: int = 1,
              columns: tuple[str, ...] | None = None) -> Iterator[ManifestRecord]:
    problems: dict[int, str] = {}  # line number -> why the line's bytes were unusable

    def text_lines() -> Iterator[str]:
        for number, data in _iter_lines(stream, first_line):
            if data is None:
                problems[number] = f"longer than {MAX_LINE_BYTES} bytes"
                yield "\n"
                continue
            try:
                yield data.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                # Keep feeding the csv parser so later lines keep their numbers; the row is rejected below.
                problems[number] = f"not valid UTF-8 ({exc.reason} at byte {exc.start + 1})"
                yield data.decode("utf-8", "replace")

    reader = csv.DictReader(text_lines(), fieldnames=list(columns) if columns is not None else None,
                            restkey=_EXTRA_CELLS)
    offset = first_line - 1  # the csv reader counts lines from 1 wherever it starts
    if columns is None:
        try:
            header = reader.fieldnames
        except csv.Error as exc:
            raise InputError(f"{uri}: line 1 (header): {exc}") from exc
        if not header:
            return
        if 1 in problems:
            raise InputError(f"{uri}: line 1 (header): {problems[1]}")
        names = [name.strip() for name in header]
        problem = header_problem(names)
        if problem:
            raise InputError(f"{uri}: line 1 (header): {problem}")
        reader.fieldnames = names
    names = list(reader.fieldnames or [])

    done = reader.line_num + offset
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            done = reader.line_num + offset
            yield ManifestRecord(uri, done, error=f"line {done}: {exc}")
            continue
        number = reader.line_num + offset
        bad = [problems.pop(n) for n in sorted(problems) if done < n <= number]
        done = number
        if bad:
            yield ManifestRecord(uri, number, error=f"line {number}: {bad[0]}")
            continue
        extra = row.pop(_EXTRA_CELLS, None)
        if extra is not None:
            yield ManifestRecord(
                uri, number, error=f"line {number}: {len(names) + len(extra)} fields, the header has {len(names)}"
            )
            continue
        # A trailing comma in the header gives a nameless column; spreadsheets do that, so drop it when empty.
        if "" in row and not (row[""] or "").strip():
            del row[""]
        yield ManifestRecord(uri, number, raw=row)


def _iter_parquet(uri: str, storage: Storage, first_row: int = 1, last_row: int | None = None
                  ) -> Iterator[ManifestRecord]:
    """Rows `first_row`..`last_row` (1-based), reading only the row groups that hold them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    fs, path = storage.arrow_filesystem(uri)
    try:
        pfile = pq.ParquetFile(path, filesystem=fs)
    except (OSError, pa.ArrowException) as exc:
        if not storage.exists(uri):
            raise InputError(f"{uri}: no such file") from exc
        raise InputError(f"{uri}: not a readable Parquet file: {_one_line(exc)}") from exc
    meta = pfile.metadata
    last_row = meta.num_rows if last_row is None else min(last_row, meta.num_rows)
    groups, group_first, row = [], 1, 0
    for index in range(meta.num_row_groups):
        count = meta.row_group(index).num_rows
        if group_first <= last_row and group_first + count - 1 >= first_row:
            if not groups:
                row = group_first - 1
            groups.append(index)
        group_first += count
    if not groups:
        return
    try:
        for batch in pfile.iter_batches(batch_size=PARQUET_BATCH_ROWS, row_groups=groups):
            # to_pylist gives plain Python values: ints stay ints, nulls are None.
            for values in batch.to_pylist():
                row += 1
                if row < first_row:
                    continue
                if row > last_row:
                    return
                yield ManifestRecord(uri, row, raw=values)
    except (OSError, pa.ArrowException) as exc:
        # pyarrow reports a corrupt page and an S3 failure (after its own retries) alike as OSError; only the
        # second says "AWS Error", and only it is worth running again.
        error = StorageUnavailable if "AWS Error" in str(exc) else InputError
        raise error(f"{uri}: read failed after row {row}: {_one_line(exc)}") from exc


# ---- validating rows ---------------------------------------------------------------------------------


def validate_record(record: ManifestRecord) -> tuple[RowInput | None, Reject | None]:
    """(RowInput, None) for a good row, (None, Reject) for a bad one. Columns starting with '_' are ignored
    (notes, bookkeeping); any other unknown column is a reject naming it."""
    if record.error is not None or record.raw is None:
        reason = record.error or "no row"
        return None, Reject(record.source, record.line, None, None, reason, None)
    data = {k: v for k, v in record.raw.items() if not (isinstance(k, str) and k.startswith("_"))}
    try:
        return parse_row(data), None
    except RequestError as error:
        return None, Reject(
            record.source, record.line, _row_id(record.raw), error.field, error.reason, _as_json(record.raw)
        )


def _row_id(raw: dict[str, Any]) -> str | None:
    value = raw.get("id")
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return None
    text = str(value).strip()
    return text[:256] or None


def _as_json(raw: dict[str, Any]) -> str:
    # default=str: Parquet can hand us dates, decimals and bytes; the reject table wants text, not a crash.
    return json.dumps(raw, ensure_ascii=False, default=str)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
