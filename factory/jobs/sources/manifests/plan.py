"""Cutting a run's inputs into chunks: the unit of work, of commit and of resume (img2dataset's shards).

A chunk is a line range of one manifest (a row range for Parquet) with an identity derived from the source URI
and that range, so the same inputs always give the same chunks. Planning reads each text manifest once as bytes
(no row is parsed) to find where every `chunk_rows`-th line starts, so a worker can open its chunk with one
ranged read; Parquet plans come from the file footer alone. The plan is saved under the run's output: a re-run
reuses it instead of scanning again, and refuses inputs that changed since the run started.

A manifest that cannot be planned (missing, not a manifest, a JSON array, a broken CSV header) becomes a
`SourceProblem`; the run goes on with the others and records the problem as a reject naming the file.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
from typing import IO

import structlog
from pydantic import BaseModel, ConfigDict, Field

from factory.errors import ConfigError, FactoryError, InputError
from factory.io.storage import Storage
from factory.jobs.sources.manifests.files import MAX_LINE_BYTES, Format, detect_format, header_problem

log = structlog.get_logger(__name__)

SCAN_BLOCK_BYTES = 8 << 20


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Chunk(_Frozen):
    """One chunk of one manifest: what a worker needs to read exactly its rows."""

    id: str = Field(description="Stable identity: a digest of the source URI and the line range")
    ordinal: int = Field(description="Position in the plan; earlier chunks own duplicate ids")
    source: str = Field(description="Manifest URI")
    format: Format
    first_line: int = Field(description="1-based line of the first row (Parquet: row index + 1)")
    last_line: int = Field(description="Line of the last row, inclusive")
    start: int | None = Field(default=None, description="Byte offset of first_line (None: gzip, read from the top)")
    end: int | None = Field(default=None, description="Byte offset just after last_line")
    columns: tuple[str, ...] | None = Field(default=None, description="CSV header, read once when planning")

    @property
    def rows(self) -> int:
        return self.last_line - self.first_line + 1


class SourceVersion(_Frozen):
    uri: str
    size: int
    version: str = Field(description="S3 ETag or local mtime: a changed file gets another")


class SourceProblem(_Frozen):
    source: str
    reason: str


class ChunkPlan(_Frozen):
    chunk_rows: int
    sources: tuple[SourceVersion, ...]
    chunks: tuple[Chunk, ...]
    problems: tuple[SourceProblem, ...] = ()

    @property
    def total_rows(self) -> int:
        return sum(chunk.rows for chunk in self.chunks)


def chunk_id(source: str, first_line: int, last_line: int) -> str:
    return hashlib.sha256(f"{source}#{first_line}-{last_line}".encode()).hexdigest()[:16]


def build_plan(manifests: list[str], storage: Storage, chunk_rows: int) -> ChunkPlan:
    """Versions of every manifest and its chunks, in input order."""
    sources: list[SourceVersion] = []
    chunks: list[Chunk] = []
    problems: list[SourceProblem] = []
    for uri in manifests:
        try:
            size, version = storage.stat(uri)
            sources.append(SourceVersion(uri=uri, size=size, version=version))
            ranges, columns = _plan_source(uri, storage, chunk_rows)
        except InputError as error:  # an outage (StorageUnavailable) stops planning: a re-run plans again
            problems.append(SourceProblem(source=uri, reason=str(error)))
            continue
        fmt = detect_format(uri)
        for first, last, start, end in ranges:
            chunks.append(Chunk(
                id=chunk_id(uri, first, last), ordinal=len(chunks), source=uri, format=fmt, first_line=first,
                last_line=last, start=start, end=end, columns=columns,
            ))
    return ChunkPlan(chunk_rows=chunk_rows, sources=tuple(sources), chunks=tuple(chunks), problems=tuple(problems))


def load_or_build_plan(manifests: list[str], storage: Storage, chunk_rows: int, plan_uri: str) -> ChunkPlan:
    """The run's saved plan when its inputs are unchanged; a new plan, saved, on the first attempt.

    Resuming over changed inputs would mix two versions of a manifest in one run, so it is refused.
    """
    if storage.exists(plan_uri):
        saved = ChunkPlan.model_validate_json(storage.read_bytes(plan_uri))
        fresh_versions = tuple(_versions(manifests, storage))
        if saved.chunk_rows == chunk_rows and saved.sources == fresh_versions:
            return saved
        raise ConfigError(
            f"the inputs of this run changed since it started ({_first_change(saved, fresh_versions, chunk_rows)}); "
            "finish it with the same inputs, or start a new run with another --run-id"
        )
    plan = build_plan(manifests, storage, chunk_rows)
    storage.write_bytes(plan_uri, plan.model_dump_json().encode())
    log.info("plan saved", chunks=len(plan.chunks), rows=plan.total_rows, problems=len(plan.problems))
    return plan


def _versions(manifests: list[str], storage: Storage):
    for uri in manifests:
        try:
            size, version = storage.stat(uri)
        except InputError:
            continue  # unreadable now as when planned: it is a problem of the plan, not a source
        yield SourceVersion(uri=uri, size=size, version=version)


def _first_change(saved: ChunkPlan, fresh: tuple[SourceVersion, ...], chunk_rows: int) -> str:
    if saved.chunk_rows != chunk_rows:
        return f"chunk_rows was {saved.chunk_rows}, now {chunk_rows}"
    before = {source.uri: source for source in saved.sources}
    after = {source.uri: source for source in fresh}
    for uri in sorted(set(before) | set(after)):
        if uri not in before:
            return f"{uri} is new"
        if uri not in after:
            return f"{uri} is gone"
        if before[uri] != after[uri]:
            return f"{uri} was modified"
    return "the manifest list changed"


# ---- scanning one manifest ---------------------------------------------------------------------------


Range = tuple[int, int, int | None, int | None]  # first line, last line, start byte, end byte


def _plan_source(uri: str, storage: Storage, chunk_rows: int) -> tuple[list[Range], tuple[str, ...] | None]:
    fmt = detect_format(uri)
    if fmt == "parquet":
        return _plan_parquet(uri, storage, chunk_rows), None
    gz = uri.lower().endswith(".gz")
    try:
        with storage.open_read(uri) as stream:
            source: IO[bytes] = gzip.GzipFile(fileobj=stream, mode="rb") if gz else stream  # type: ignore[assignment]
            return _scan_text(uri, fmt, source, chunk_rows, byte_offsets=not gz)
    except FactoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - gzip, network and botocore read errors alike
        raise InputError(f"{uri}: read failed while planning: {str(exc).splitlines()[0] if str(exc) else exc!r}") from exc


def _plan_parquet(uri: str, storage: Storage, chunk_rows: int) -> list[Range]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    fs, path = storage.arrow_filesystem(uri)
    try:
        rows = pq.ParquetFile(path, filesystem=fs).metadata.num_rows
    except (OSError, pa.ArrowException) as exc:
        raise InputError(f"{uri}: not a readable Parquet file: {str(exc).splitlines()[0]}") from exc
    return [(first, min(first + chunk_rows - 1, rows), None, None) for first in range(1, rows + 1, chunk_rows)]


def _scan_text(uri: str, fmt: Format, stream: IO[bytes], chunk_rows: int,
               byte_offsets: bool) -> tuple[list[Range], tuple[str, ...] | None]:
    """Line ranges of `chunk_rows` lines each. CSV chunks start after the header and only where no quoted
    field is open, so a multi-line cell never straddles two chunks."""
    columns: tuple[str, ...] | None = None
    ranges: list[Range] = []
    offset = 0
    number = 0
    first_line, chunk_start = 1, 0
    quotes_open = False
    header_lines: list[bytes] = []
    seen_content = False
    while True:
        data = stream.readline(MAX_LINE_BYTES + 1)
        if not data:
            break
        size = len(data)
        if size > MAX_LINE_BYTES and not data.endswith(b"\n"):
            while True:  # an over-long line is skipped by the reader as one line; count it the same way
                rest = stream.readline(1 << 16)
                size += len(rest)
                if not rest or rest.endswith(b"\n"):
                    break
            data = b""
        number += 1
        offset += size
        if fmt == "jsonl" and not seen_content:
            stripped = data.strip()
            if stripped:
                seen_content = True
                if stripped == b"[" or stripped.startswith(b"[{"):
                    raise InputError(f"{uri}: a JSON array, not JSON lines (write one object per line)")
        if fmt == "csv":
            quotes_open ^= data.count(b'"') % 2 == 1
            if columns is None:
                header_lines.append(data)
                if quotes_open:
                    continue
                columns = _csv_header(uri, b"".join(header_lines))
                first_line, chunk_start = number + 1, offset
                continue
            if quotes_open:
                continue
        if number - first_line + 1 >= chunk_rows:
            ranges.append((first_line, number, chunk_start if byte_offsets else None, offset if byte_offsets else None))
            first_line, chunk_start = number + 1, offset
    if fmt == "csv" and columns is None and header_lines:
        columns = _csv_header(uri, b"".join(header_lines))
    if number >= first_line:
        ranges.append((first_line, number, chunk_start if byte_offsets else None, offset if byte_offsets else None))
    return ranges, columns


def _csv_header(uri: str, raw: bytes) -> tuple[str, ...]:
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(f"{uri}: line 1 (header): not valid UTF-8 ({exc.reason} at byte {exc.start + 1})") from exc
    try:
        names = next(csv.reader(io.StringIO(text)), [])
    except csv.Error as exc:
        raise InputError(f"{uri}: line 1 (header): {exc}") from exc
    names = [name.strip() for name in names]
    problem = header_problem(names)
    if problem:
        raise InputError(f"{uri}: line 1 (header): {problem}")
    return tuple(names)
