"""Finding, streaming and validating manifests: JSONL, CSV and Parquet, local and on a real S3 endpoint."""

from __future__ import annotations

import csv
import gzip
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from factory.errors import InputError
from factory.io.storage import Storage, join
from factory.jobs.sources.manifests import files as manifests
from factory.jobs.sources.manifests.files import (
    ManifestRecord,
    Reject,
    detect_format,
    expand_manifest_uris,
    iter_manifest_records,
    validate_record,
)
from tests.s3server import new_bucket

ROWS = [
    {"id": "r1", "tenant": "acme", "prompt": "a red bicycle", "width": 256, "height": 256},
    {"id": "r2", "tenant": "acme", "image": "s3://imgs/cat.png", "question": "what color is the cat?"},
    {"id": "r3", "tenant": "globex", "prompt": "a lighthouse at dusk", "steps": 4, "seed": 7},
]
COLUMNS = ["id", "tenant", "prompt", "image", "question", "width", "height", "steps", "seed"]



@pytest.fixture(params=["local", "s3"])
def base(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path)
    return new_bucket(request.getfixturevalue("s3_endpoint"))


@pytest.fixture
def storage(s3_endpoint) -> Storage:
    # Built after the env points at moto, as a driver would build it; local paths ignore those settings.
    return Storage()


def jsonl_bytes(rows) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def csv_bytes(rows, columns=COLUMNS) -> bytes:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)  # missing keys become blank cells
    return buf.getvalue().encode()


def parquet_bytes(rows, columns=COLUMNS) -> bytes:
    table = pa.table({c: [r.get(c) for r in rows] for c in columns})
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=2)  # several row groups: batches must join up
    return buf.getvalue()


def valid_rows(uri, storage):
    out = []
    for record in iter_manifest_records(uri, storage):
        row, reject = validate_record(record)
        assert reject is None, reject
        out.append((record.line, row))
    return out


@pytest.mark.parametrize(
    ("name", "make", "first_line"),
    [
        ("m.jsonl", jsonl_bytes, 1),
        ("m.ndjson", jsonl_bytes, 1),
        ("m.jsonl.gz", lambda rows: gzip.compress(jsonl_bytes(rows)), 1),
        ("m.csv", csv_bytes, 2),  # the header is line 1
        ("m.csv.gz", lambda rows: gzip.compress(csv_bytes(rows)), 2),
        ("m.parquet", parquet_bytes, 1),
    ],
)
def test_all_formats_read_the_same_rows(base, storage, name, make, first_line):
    uri = join(base, "in", name)
    storage.write_bytes(uri, make(ROWS))
    got = valid_rows(uri, storage)
    assert [line for line, _ in got] == [first_line, first_line + 1, first_line + 2]
    rows = [row for _, row in got]
    assert [r.id for r in rows] == ["r1", "r2", "r3"]
    assert rows[0].width == 256 and rows[2].steps == 4 and rows[2].seed == 7
    # Blank CSV cells / nulls are absent, not empty strings.
    assert rows[0].image is None and rows[1].prompt is None and rows[1].width is None
    assert rows[1].question == "what color is the cat?"


def test_parquet_values_stay_python_values(tmp_path):
    path = tmp_path / "ints.parquet"
    pq.write_table(pa.table({"id": [10, 11], "tenant": ["t", "t"], "seed": [1, 2**40]}), path)
    records = list(iter_manifest_records(str(path), Storage()))
    assert records[0].raw == {"id": 10, "tenant": "t", "seed": 1}
    assert type(records[1].raw["seed"]) is int and records[1].line == 2
    row, _ = validate_record(records[0])
    assert row.id == "10"  # integer ids become their decimal text


def test_csv_integer_ids_and_blank_cells(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("id,tenant,prompt,width,_note\n42,acme,a boat,,  \n43,acme,  ,512,hi\n")
    records = list(iter_manifest_records(str(path), Storage()))
    row, reject = validate_record(records[0])
    assert reject is None and row.id == "42" and row.width is None
    row, reject = validate_record(records[1])
    assert reject is None and row.prompt is None and row.width == 512


def test_broken_jsonl_lines_are_reported_and_reading_goes_on(tmp_path):
    lines = [
        json.dumps(ROWS[0]),  # 1
        "",  # 2 blank: skipped
        '{"id": "x", "tenant": ',  # 3 bad JSON
        "[1, 2]",  # 4 not an object
        '"just text"',  # 5 not an object
        '{"id": "n", "tenant": "t", "guidance": NaN}',  # 6 NaN is not JSON
        json.dumps(ROWS[2]),  # 7
    ]
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join(lines) + "\n")
    records = list(iter_manifest_records(str(path), Storage()))
    assert [(r.line, r.error is None) for r in records] == [
        (1, True),
        (3, False),
        (4, False),
        (5, False),
        (6, False),
        (7, True),
    ]
    errors = {r.line: r.error for r in records if r.error}
    assert errors[3].startswith("line 3: invalid JSON")
    assert errors[4] == "line 4: expected a JSON object, got an array"
    assert errors[5] == "line 5: expected a JSON object, got str"
    assert "NaN" in errors[6]
    reject = validate_record(records[1])[1]
    assert reject == Reject(str(path), 3, None, None, errors[3], None)


def test_broken_csv_lines_are_reported_and_reading_goes_on(tmp_path):
    path = tmp_path / "m.csv"
    path.write_bytes(
        b"id,tenant,prompt\n"
        b"a,acme,one\n"  # 2
        b"b,acme,two,extra\n"  # 3 too many fields
        b"\n"  # 4 blank
        b'c,acme,"multi\nline"\n'  # 5-6 quoted newline
        b"d,acme,caf\xe9\n"  # 7 latin-1, not UTF-8
        b"e,acme\n"  # 8 short row: the missing cell is absent
    )
    records = list(iter_manifest_records(str(path), Storage()))
    assert [(r.line, r.error) for r in records if r.error] == [
        (3, "line 3: 4 fields, the header has 3"),
        (7, "line 7: not valid UTF-8 (invalid continuation byte at byte 11)"),
    ]
    good = [validate_record(r)[0] for r in records if not r.error]
    assert [(g.id, g.prompt) for g in good] == [("a", "one"), ("c", "multi\nline"), ("e", None)]


def test_long_lines_are_skipped_not_read_whole(tmp_path, monkeypatch):
    monkeypatch.setattr(manifests, "MAX_LINE_BYTES", 100)
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps({"prompt": "x" * 500}) + "\n" + json.dumps(ROWS[1]) + "\n")
    records = list(iter_manifest_records(str(path), Storage()))
    assert [(r.line, r.error) for r in records] == [
        (1, None),
        (2, "line 2: longer than 100 bytes"),
        (3, None),
    ]


def test_reading_is_lazy(tmp_path):
    # A good first line followed by garbage that would fail a whole-file parse.
    path = tmp_path / "m.jsonl.gz"
    path.write_bytes(gzip.compress(jsonl_bytes(ROWS[:1]))[:-4] + b"broken-tail")
    records = iter_manifest_records(str(path), Storage())
    assert next(records).raw == ROWS[0]
    with pytest.raises(InputError, match=r"m.jsonl.gz: read failed after line 1"):
        list(records)


def test_whole_file_problems_are_input_errors(tmp_path):
    storage = Storage()
    array = tmp_path / "rows.json"
    array.write_text("[\n" + json.dumps(ROWS[0]) + "\n]\n")
    with pytest.raises(InputError, match="a JSON array, not JSON lines"):
        list(iter_manifest_records(str(array), storage))
    bad_parquet = tmp_path / "bad.parquet"
    bad_parquet.write_bytes(b"not parquet at all")
    with pytest.raises(InputError, match="bad.parquet: not a readable Parquet file"):
        list(iter_manifest_records(str(bad_parquet), storage))
    with pytest.raises(InputError, match="gone.parquet: no such file"):
        list(iter_manifest_records(str(tmp_path / "gone.parquet"), storage))
    with pytest.raises(InputError, match="gone.csv: no such file"):
        list(iter_manifest_records(str(tmp_path / "gone.csv"), storage))
    dupes = tmp_path / "dupes.csv"
    dupes.write_text("id,tenant,id\n1,a,2\n")
    with pytest.raises(InputError, match="column 'id' appears more than once"):
        list(iter_manifest_records(str(dupes), storage))


@pytest.mark.parametrize(
    ("uri", "fmt"),
    [
        ("a.jsonl", "jsonl"),
        ("s3://b/x/a.NDJSON", "jsonl"),
        ("a.json.gz", "jsonl"),
        ("a.csv", "csv"),
        ("a.CSV.GZ", "csv"),
        ("a.parquet", "parquet"),
        ("a.pq", "parquet"),
    ],
)
def test_detect_format(uri, fmt):
    assert detect_format(uri) == fmt


@pytest.mark.parametrize("uri", ["a.txt", "a.parquet.gz", "noext", "a.gz"])
def test_detect_format_refuses(uri):
    with pytest.raises(InputError, match=uri.replace(".", r"\.")):
        detect_format(uri)


def test_expand_directories_prefixes_and_globs(base, storage):
    for name in ["d/b.csv", "d/a.jsonl", "d/sub/c.parquet", "d/README.md", "d/_SUCCESS", "d/.hidden.jsonl", "e/x.pq"]:
        storage.write_bytes(join(base, name), b"")
    d = join(base, "d")
    expected = [join(base, n) for n in ["d/a.jsonl", "d/b.csv", "d/sub/c.parquet"]]
    assert expand_manifest_uris([d], storage) == expected
    # Files as given, each once, in order of first mention.
    e = join(base, "e/x.pq")
    assert expand_manifest_uris([e, d, join(base, "d/b.csv")], storage) == [e, *expected]


def test_expand_local_globs(tmp_path):
    storage = Storage()
    for name in ["p1/m.jsonl", "p2/m.csv", "p2/notes.txt", "q/m.jsonl"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("")
    got = expand_manifest_uris([str(tmp_path / "p*")], storage)
    assert got == [str(tmp_path / "p1/m.jsonl"), str(tmp_path / "p2/m.csv")]
    assert expand_manifest_uris([str(tmp_path / "**/*.jsonl")], storage) == [
        str(tmp_path / "p1/m.jsonl"),
        str(tmp_path / "q/m.jsonl"),
    ]
    with pytest.raises(InputError, match=r"zz\*: the pattern matches no manifest files"):
        expand_manifest_uris([str(tmp_path / "zz*")], storage)


def test_expand_names_what_is_missing(base, storage):
    missing = join(base, "nothing-here")
    with pytest.raises(InputError, match=f"{missing}: no such file"):
        expand_manifest_uris([missing], storage)
    notes = join(base, "notes.txt")
    storage.write_bytes(notes, b"")
    with pytest.raises(InputError, match="not a manifest file"):
        expand_manifest_uris([notes], storage)
    empty_dir = join(base, "only-readme")
    storage.write_bytes(join(empty_dir, "README.md"), b"")
    with pytest.raises(InputError, match="no manifest files"):
        expand_manifest_uris([empty_dir], storage)
    with pytest.raises(InputError, match="local paths or s3"):
        expand_manifest_uris(["http://example.com/m.jsonl"], storage)


def record(raw: dict, line: int = 5) -> ManifestRecord:
    return ManifestRecord("s3://b/m.jsonl", line, raw=raw)


@pytest.mark.parametrize(
    ("raw", "field", "reason"),
    [
        ({"id": "a", "tenant": "t", "width": 100}, "width", "must be a multiple of 16, got 100"),
        ({"id": "a", "tenant": "t", "colour": "red"}, "colour", "unknown field"),
        ({"id": "a", "prompt": "x"}, "tenant", "required"),
        ({"id": "a", "tenant": "t", "steps": 0}, "steps", "Input should be greater than or equal to 1, got 0"),
        ({"id": "a", "tenant": "t", "seed": "abc"}, "seed", "got 'abc'"),
        ({"id": True, "tenant": "t"}, "id", "must be text, not a boolean"),
        # The first failing field, in model order, is the one named.
        ({"id": "a", "tenant": "t", "zzz": 1, "height": 17, "width": 15}, "width", None),
    ],
)
def test_validate_record_names_first_failing_field(raw, field, reason):
    row, reject = validate_record(record(raw))
    assert row is None
    assert reject.field == field
    if reason:
        assert reason in reject.reason
    assert reject.source == "s3://b/m.jsonl" and reject.line == 5
    assert json.loads(reject.raw) == raw
    assert reject.id == (raw["id"] if isinstance(raw["id"], str) else None)


def test_validate_record_ignores_underscore_columns():
    row, reject = validate_record(record({"id": 7, "tenant": "t", "_note": "from sheet 2", "_row": 3}))
    assert reject is None and row.id == "7"
    reject = validate_record(record({"id": 9, "tenant": "t", "bogus": 1}))[1]
    assert reject.id == "9" and reject.to_dict()["field"] == "bogus"
