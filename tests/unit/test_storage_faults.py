"""Storage against an S3 endpoint that fails part of its requests: retried with backoff, never a partial object,
and one clear error once the retries are spent."""

from __future__ import annotations

import pytest

from factory.errors import StorageUnavailable
from factory.io.storage import Storage
from factory.jobs.engine.commit import publish
from tests.faultproxy import fault_proxy
from tests.s3server import new_bucket


@pytest.fixture
def flaky(s3_endpoint):
    # A 500 InternalError: botocore backs off ~50 ms for it, against ~1 s for a throttling code.
    with fault_proxy(s3_endpoint, error_rate=0.25, drop_rate=0.15, seed=3, error_status=500,
                     error_code="InternalError") as proxy:
        yield proxy


def test_reads_writes_and_listings_survive_errors_and_dropped_connections(s3_endpoint, flaky):
    bucket = new_bucket(s3_endpoint, "flaky")
    storage = Storage(endpoint_url=flaky.url)
    bodies = {f"{bucket}/d/part-{i:02d}.bin": bytes([i]) * (1000 + i) for i in range(20)}
    for uri, body in bodies.items():
        storage.write_bytes(uri, body)
    for uri, body in bodies.items():
        assert storage.read_bytes(uri) == body
        assert storage.stat(uri)[0] == len(body)
        with storage.open_range(uri, 10, 500) as stream:
            assert stream.read() == body[10:500]
    assert list(storage.list_files(f"{bucket}/d")) == sorted(bodies)
    assert list(storage.list_prefix(f"{bucket}/d/part-1")) == sorted(u for u in bodies if "/part-1" in u)
    assert flaky.errors_injected > 10 and flaky.drops_injected > 5


def test_a_put_whose_answer_was_lost_is_recognised_as_written(s3_endpoint):
    import random

    bucket = new_bucket(s3_endpoint, "lost")
    uri = f"{bucket}/results/part-1.parquet"
    # The proxy draws once per PUT, in order: pick a seed that drops the first PUT's answer and not the second's.
    seed = next(s for s in range(1000) if (lambda r: r.random() < 0.5 <= r.random())(random.Random(s)))
    with fault_proxy(s3_endpoint, drop_rate=0.5, seed=seed, methods={"PUT"}, phase="response") as proxy:
        # The PUT is stored and its answer lost; botocore's retry meets "already there" (412), and the writer
        # finds its own bytes there, which counts as written.
        publish(Storage(endpoint_url=proxy.url, max_attempts=2), uri, b"body")
        assert proxy.drops_injected == 1 and proxy.forwarded == 3  # two PUTs, then the GET that reads it back
    assert Storage().read_bytes(uri) == b"body"


def test_an_endpoint_that_keeps_failing_is_one_clear_error(s3_endpoint):
    bucket = new_bucket(s3_endpoint, "down")
    with fault_proxy(s3_endpoint, fail_all=True, error_status=500, error_code="InternalError") as proxy:
        storage = Storage(endpoint_url=proxy.url, max_attempts=3)
        with pytest.raises(StorageUnavailable, match=rf"{bucket}/x.parquet: S3 unavailable \(InternalError\)"):
            storage.write_bytes(f"{bucket}/x.parquet", b"data")
        assert proxy.requests == 3
    assert not Storage().exists(f"{bucket}/x.parquet")


def test_list_prefix_lists_one_folder_by_name_prefix(tmp_path, s3_endpoint):
    bucket = new_bucket(s3_endpoint, "prefix")
    for root in (str(tmp_path), f"{bucket}/root"):
        storage = Storage()
        for name in ("part-ab-1", "part-ab-2", "part-abc-1", "other", "sub/part-ab-3"):
            storage.write_bytes(f"{root}/{name}", b"x")
        assert list(storage.list_prefix(f"{root}/part-ab-")) == [f"{root}/part-ab-1", f"{root}/part-ab-2"]
        assert list(storage.list_prefix(f"{root}/missing/part-")) == []
