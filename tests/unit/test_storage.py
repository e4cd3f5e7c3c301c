"""Storage (local and a real S3 endpoint over HTTP) and fetching/decoding input images."""

from __future__ import annotations

import http.server
import io
import os
import pickle
import struct
import threading
import time
import zlib
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from factory.errors import InputError
from factory.io import images
from factory.io.images import address_problem, decode_image, fetch_bytes, load_image
from factory.io.storage import Storage, join
from tests.s3server import new_bucket



@pytest.fixture(params=["local", "s3"])
def base(request, tmp_path) -> str:
    """A fresh empty folder: a tmp dir, or a new bucket on the moto server."""
    if request.param == "local":
        return str(tmp_path / "root")
    return new_bucket(request.getfixturevalue("s3_endpoint"))


@pytest.fixture
def storage(s3_endpoint) -> Storage:
    # Built after the env points at moto, as a driver would build it; local paths ignore those settings.
    return Storage()


# ---- storage -----------------------------------------------------------------------------------------


def test_write_read_exists_delete(base, storage):
    uri = join(base, "a", "b.bin")
    assert not storage.exists(uri)
    storage.write_bytes(uri, b"first")
    assert storage.exists(uri)
    assert storage.read_bytes(uri) == b"first"
    storage.write_bytes(uri, b"second")
    assert storage.read_bytes(uri) == b"second"
    storage.delete(uri)
    assert not storage.exists(uri)
    storage.delete(uri)  # deleting what is not there is fine, as on S3


def test_put_if_absent_keeps_first_body(base, storage):
    uri = join(base, "marker", "row-1.json")
    assert storage.put_if_absent(uri, b"one") is True
    assert storage.put_if_absent(uri, b"two") is False
    assert storage.read_bytes(uri) == b"one"


def test_list_files_is_recursive_sorted_lazy_and_filtered(base, storage):
    names = ["b.csv", "a/x.jsonl", "a.txt", "a/deeper/y.JSONL", "c/z.parquet"]
    for name in names:
        storage.write_bytes(join(base, name), name.encode())
    listing = storage.list_files(base)
    assert isinstance(listing, Iterator)
    got = [uri[len(base.rstrip("/")) + 1 :] for uri in listing]
    # Plain string order, identical for local folders and S3 keys.
    assert got == sorted(names)
    jsonl = list(storage.list_files(join(base, "a"), suffixes=[".jsonl"]))
    assert [u.rsplit("/", 1)[1] for u in jsonl] == ["y.JSONL", "x.jsonl"]


def test_missing_file_is_one_line_naming_the_uri(base, storage):
    uri = join(base, "nope.txt")
    with pytest.raises(InputError, match="no such file") as err:
        storage.read_bytes(uri)
    assert uri in str(err.value) and "\n" not in str(err.value)


def test_read_bytes_cap(base, storage):
    uri = join(base, "big.bin")
    storage.write_bytes(uri, b"x" * 100)
    assert storage.read_bytes(uri, max_bytes=100) == b"x" * 100
    with pytest.raises(InputError, match="byte limit"):
        storage.read_bytes(uri, max_bytes=99)


def test_parquet_round_trip_through_arrow_filesystem(base, storage):
    fs, path = storage.arrow_filesystem(join(base, "tables", "t.parquet"))
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    pq.write_table(pa.table({"id": [1, 2, 3], "prompt": ["a", "b", None]}), path, filesystem=fs)
    assert pq.read_table(path, filesystem=fs).to_pylist()[2] == {"id": 3, "prompt": None}
    assert storage.exists(join(base, "tables", "t.parquet"))


def test_storage_pickles_after_use(base, storage):
    uri = join(base, "p.txt")
    storage.write_bytes(uri, b"hi")  # builds the client, which must not travel
    clone = pickle.loads(pickle.dumps(storage))
    assert clone.read_bytes(uri) == b"hi"
    assert clone.endpoint_url == storage.endpoint_url


def test_local_writes_leave_no_temp_files(tmp_path):
    storage = Storage()
    target = tmp_path / "out" / "f.txt"
    storage.write_bytes(str(target), b"1")
    storage.put_if_absent(str(target), b"2")
    storage.put_if_absent(str(tmp_path / "out" / "g.txt"), b"3")
    assert sorted(os.listdir(tmp_path / "out")) == ["f.txt", "g.txt"]
    assert target.read_bytes() == b"1"


def test_local_errors(tmp_path):
    storage = Storage()
    with pytest.raises(InputError, match="is a directory"):
        storage.read_bytes(str(tmp_path))
    # A folder not written yet lists as empty, as an S3 prefix does.
    assert list(storage.list_files(str(tmp_path / "missing"))) == []


def test_s3_errors_name_the_reason(s3_endpoint, storage):
    with pytest.raises(InputError, match=r"s3://no-such-bucket-here/k: no such bucket"):
        storage.read_bytes("s3://no-such-bucket-here/k")
    with pytest.raises(InputError, match="no such bucket"):
        list(storage.list_files("s3://no-such-bucket-here/prefix"))
    with pytest.raises(InputError, match="not a valid s3"):
        storage.read_bytes("s3://ab/k")
    bucket = new_bucket(s3_endpoint)
    assert list(storage.list_files(join(bucket, "empty"))) == []


def test_s3_objects_get_a_content_type(s3_endpoint, storage):
    bucket = new_bucket(s3_endpoint)
    storage.write_bytes(join(bucket, "a.png"), b"x")
    storage.put_if_absent(join(bucket, "b.json"), b"{}")
    head = storage.s3.head_object
    assert head(Bucket=bucket[5:], Key="a.png")["ContentType"] == "image/png"
    assert head(Bucket=bucket[5:], Key="b.json")["ContentType"] == "application/json"


def test_s3_settings_come_from_env(s3_endpoint, monkeypatch):
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    storage = Storage()
    assert storage.endpoint_url == s3_endpoint and storage.region == "eu-west-1"
    fs, path = storage.arrow_filesystem("s3://bucket/a/b.parquet")
    assert path == "bucket/a/b.parquet" and fs.region == "eu-west-1"


def test_join_refuses_escaping_parts():
    assert join("s3://bkt", "a", "b/c.png") == "s3://bkt/a/b/c.png"
    assert join("s3://bkt/", "x") == "s3://bkt/x"
    assert join("/tmp/out/", "t", "1.png") == "/tmp/out/t/1.png"
    for bad in ("..", "a/../../b", "/etc/passwd"):
        with pytest.raises(InputError):
            join("/tmp/out", bad)


# ---- fetch -------------------------------------------------------------------------------------------


def _png(size=(32, 24), mode="RGB", color=(200, 10, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="PNG")
    return buf.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims a size and has no pixel data: decoding it would fail, reading its size does not."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def test_fetch_local_and_s3(s3_endpoint, storage, tmp_path):
    data = _png()
    local = tmp_path / "img.png"
    local.write_bytes(data)
    assert fetch_bytes(str(local), storage) == data
    uri = join(new_bucket(s3_endpoint), "images", "img.png")
    storage.write_bytes(uri, data)
    img = load_image(uri, storage)
    assert img.mode == "RGB" and img.size == (32, 24)
    with pytest.raises(InputError, match="byte limit"):
        fetch_bytes(uri, storage, max_bytes=10)
    with pytest.raises(InputError, match="unsupported scheme"):
        fetch_bytes("ftp://example.com/x.png", storage)


class _Server:
    """A loopback HTTP server with scripted answers; counts the requests that reached it."""

    def __init__(self) -> None:
        self.hits: list[str] = []
        routes = self.routes = {}
        hits = self.hits

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                hits.append(self.path)
                status, headers, body, delay = routes.get(self.path, (404, {}, b"", 0))
                if delay:
                    time.sleep(delay)
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def web() -> Iterator[_Server]:
    server = _Server()
    yield server
    server.close()


def test_http_is_off_unless_allowed(web, storage):
    web.routes["/a.png"] = (200, {}, _png(), 0)
    with pytest.raises(InputError, match="http\\(s\\) inputs are off"):
        fetch_bytes(f"{web.url}/a.png", storage)
    assert web.hits == []


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_http_to_loopback_is_refused_even_when_allowed(web, storage, host):
    web.routes["/a.png"] = (200, {}, _png(), 0)
    url = web.url.replace("127.0.0.1", host) + "/a.png"
    with pytest.raises(InputError, match="loopback"):
        fetch_bytes(url, storage, allow_http=True)
    assert web.hits == []  # refused before connecting


@pytest.mark.parametrize(
    ("ip", "problem"),
    [
        ("127.0.0.1", "loopback"),
        ("::1", "loopback"),
        ("::ffff:127.0.0.1", "loopback"),
        ("10.1.2.3", "private"),
        ("192.168.0.5", "private"),
        ("169.254.169.254", "link-local"),  # cloud metadata endpoint
        ("fe80::1", "link-local"),
        ("224.0.0.1", "multicast"),
        ("240.0.0.1", "reserved"),
        ("0.0.0.0", "unspecified"),
        ("100.64.0.1", "non-public"),
        ("8.8.8.8", None),
        ("2001:4860:4860::8888", None),
    ],
)
def test_address_problem(ip, problem):
    assert address_problem(ip) == problem


@pytest.fixture
def loopback_is_public(monkeypatch):
    """Let the fetcher reach the test server (and only it) so the streaming paths can be exercised."""
    real = images.address_problem
    monkeypatch.setattr(images, "address_problem", lambda ip: None if ip == "127.0.0.1" else real(ip))


def test_http_fetch_streams_with_cap_redirects_and_timeout(web, storage, loopback_is_public):
    data = _png()
    web.routes["/ok.png"] = (200, {"Content-Length": str(len(data))}, data, 0)
    web.routes["/hop"] = (302, {"Location": "/ok.png"}, b"", 0)
    web.routes["/huge"] = (200, {}, b"x" * 5000, 0)  # no Content-Length: only the streaming cap can stop it
    web.routes["/to-private"] = (302, {"Location": "http://10.0.0.1/secret"}, b"", 0)
    web.routes["/slow"] = (200, {}, b"x", 1.5)
    assert fetch_bytes(f"{web.url}/ok.png", storage, allow_http=True) == data
    assert fetch_bytes(f"{web.url}/hop", storage, allow_http=True) == data
    with pytest.raises(InputError, match="byte limit"):
        fetch_bytes(f"{web.url}/huge", storage, allow_http=True, max_bytes=1000)
    with pytest.raises(InputError, match="private address 10.0.0.1"):
        fetch_bytes(f"{web.url}/to-private", storage, allow_http=True)
    with pytest.raises(InputError, match="HTTP 404"):
        fetch_bytes(f"{web.url}/missing", storage, allow_http=True)
    started = time.monotonic()
    with pytest.raises(InputError, match="timed out|fetch failed"):
        fetch_bytes(f"{web.url}/slow", storage, allow_http=True, timeout_s=0.3)
    assert time.monotonic() - started < 1.2


def test_decode_image_to_rgb():
    img = decode_image(_png(mode="RGBA", color=(0, 0, 0, 0)), "t.png")
    assert img.mode == "RGB" and img.getpixel((0, 0)) == (255, 255, 255)  # transparency flattened onto white
    assert decode_image(_png(mode="L", color=7), "g.png").mode == "RGB"


def test_decode_refuses_bombs_before_decoding():
    # 8000 x 6000 = 48 M pixels, under Pillow's own warning threshold: only our cap stands in the way.
    with pytest.raises(InputError, match=r"bomb.png: image too large: 8000x6000"):
        decode_image(_png_header_only(8000, 6000), "bomb.png")
    # Far past Pillow's own limit as well.
    with pytest.raises(InputError, match="huge.png: image too large"):
        decode_image(_png_header_only(60000, 60000), "huge.png")
    with pytest.raises(InputError, match="limit is 100"):
        decode_image(_png(size=(11, 10)), "small-cap.png", max_pixels=100)


def test_decode_refuses_corrupt_truncated_and_non_images():
    good = _png(size=(64, 64))
    noise = Image.effect_noise((64, 64), 50).convert("RGB")
    buf = io.BytesIO()
    noise.save(buf, format="JPEG")
    jpeg = buf.getvalue()
    for data, name in [(good[: len(good) // 2], "half.png"), (jpeg[: len(jpeg) // 2], "half.jpg")]:
        with pytest.raises(InputError, match=f"{name}: corrupt or truncated"):
            decode_image(data, name)
    with pytest.raises(InputError, match="notes.txt: not an image"):
        decode_image(b"hello, I am text", "notes.txt")
    with pytest.raises(InputError, match="header-only.png: corrupt or truncated"):
        decode_image(_png_header_only(10, 10), "header-only.png")
