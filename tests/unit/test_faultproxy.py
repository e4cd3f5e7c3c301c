"""The fault-injecting proxy (tests/faultproxy.py) in front of the moto S3 server: pass-through, faults, retries.

botocore's retry setting is easy to misread: ``retries={"max_attempts": N}`` means N *retries* (N + 1
attempts). A client that makes exactly one attempt needs ``total_max_attempts: 1`` (or ``max_attempts: 0``).
"""

from __future__ import annotations

import http.client
import io
import json
import os
import socket
import subprocess
import sys
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

import boto3
import botocore.exceptions
import botocore.retries.standard
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials

from tests.faultproxy import fault_proxy
from tests.s3server import ACCESS_KEY, REGION, SECRET_KEY, new_bucket

ONE_ATTEMPT = Config(retries={"total_max_attempts": 1, "mode": "standard"})
RETRYING = Config(retries={"mode": "standard", "max_attempts": 10})  # 10 retries: 11 attempts in all


def s3_client(url: str, config: Config, secret: str = SECRET_KEY, access: str = ACCESS_KEY):
    return boto3.session.Session().client("s3", endpoint_url=url, region_name=REGION, aws_access_key_id=access,
                                          aws_secret_access_key=secret, config=config)


@pytest.fixture
def bucket(s3_endpoint) -> str:
    return new_bucket(s3_endpoint, "proxy").removeprefix("s3://")


@pytest.fixture
def direct(s3_endpoint):
    """A client that talks to moto without the proxy, to see what really got stored."""
    return s3_client(s3_endpoint, ONE_ATTEMPT)


@pytest.fixture
def quick_backoff(monkeypatch):
    """Shorten botocore's waits between retries (about 1 s after each SlowDown), so tests stay fast.

    Only the length of the wait changes; which errors are retried, and how often, is botocore's own logic.
    """
    monkeypatch.setattr(botocore.retries.standard.ExponentialBackoff, "delay_amount", lambda self, context: 0.001)


def assert_counts_add_up(proxy) -> None:
    stats = proxy.stats()
    assert stats["requests"] == stats["errors_injected"] + stats["drops_injected"] + stats["forwarded"]
    assert len(proxy.hits) == stats["requests"]
    assert sum(hit.outcome == "error" for hit in proxy.hits) == stats["errors_injected"]
    assert sum(hit.outcome == "drop" for hit in proxy.hits) == stats["drops_injected"]


# ---- pass-through ------------------------------------------------------------------------------------------


def test_boto3_calls_pass_through(s3_endpoint, bucket, direct):
    with fault_proxy(s3_endpoint) as proxy:
        assert proxy.url.startswith("http://127.0.0.1:") and proxy.url != s3_endpoint
        client = s3_client(proxy.url, ONE_ATTEMPT)
        client.put_object(Bucket=bucket, Key="a.txt", Body=b"hello", ContentType="text/plain",
                          Metadata={"origin": "proxy"})
        client.put_object(Bucket=bucket, Key="dir/b.bin", Body=io.BytesIO(bytes(range(256)) * 40))
        client.upload_fileobj(io.BytesIO(b"uploaded"), bucket, "dir/c.bin")

        got = client.get_object(Bucket=bucket, Key="a.txt")
        assert got["Body"].read() == b"hello"
        assert got["ContentType"] == "text/plain" and got["Metadata"] == {"origin": "proxy"}
        ranged = client.get_object(Bucket=bucket, Key="dir/b.bin", Range="bytes=256-511")
        assert ranged["Body"].read() == bytes(range(256)) and ranged["ResponseMetadata"]["HTTPStatusCode"] == 206
        assert client.head_object(Bucket=bucket, Key="dir/b.bin")["ContentLength"] == 256 * 40
        listed = client.list_objects_v2(Bucket=bucket, Prefix="dir/")
        assert [item["Key"] for item in listed["Contents"]] == ["dir/b.bin", "dir/c.bin"]
        with pytest.raises(botocore.exceptions.ClientError) as missing:
            client.head_object(Bucket=bucket, Key="nope")
        assert missing.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404
        client.delete_object(Bucket=bucket, Key="a.txt")
        with pytest.raises(client.exceptions.NoSuchKey):
            client.get_object(Bucket=bucket, Key="a.txt")

        assert direct.get_object(Bucket=bucket, Key="dir/c.bin")["Body"].read() == b"uploaded"
        assert proxy.requests == proxy.forwarded == 10
        assert proxy.errors_injected == proxy.drops_injected == 0
        # boto3 sends its PUTs with "Expect: 100-continue"; the proxy answered it and relayed the body.
        assert any(hit.expect_continue for hit in proxy.hits if hit.method == "PUT")
        assert [hit.method for hit in proxy.hits] == ["PUT"] * 3 + ["GET"] * 2 + ["HEAD", "GET", "HEAD", "DELETE",
                                                                                    "GET"]
        assert_counts_add_up(proxy)


def test_chunked_request_bodies_pass_through(s3_endpoint, bucket, direct):
    # moto does not check signatures by default (and lets an anonymous PUT through), so a hand-made unsigned
    # request is enough here.
    with fault_proxy(s3_endpoint) as proxy:
        host, port = proxy.url.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        for key in ("one.bin", "two.bin"):  # the second goes over the same kept-alive connection
            conn.request("PUT", f"/{bucket}/{key}", body=iter([b"hel", b"lo ", key.encode()]), encode_chunked=True)
            response = conn.getresponse()
            assert response.status == 200 and response.read() == b""
        conn.close()
        assert [hit.chunked for hit in proxy.hits] == [True, True]
        head = s3_client(proxy.url, ONE_ATTEMPT).head_object(Bucket=bucket, Key="two.bin")
        assert head["ContentLength"] == len(b"hello two.bin")
    assert direct.get_object(Bucket=bucket, Key="one.bin")["Body"].read() == b"hello one.bin"


def test_pyarrow_parquet_round_trip(s3_endpoint, bucket):
    table = pa.table({"id": list(range(500)), "name": [f"row-{i}" for i in range(500)]})
    with fault_proxy(s3_endpoint) as proxy:
        fs = pafs.S3FileSystem(endpoint_override=proxy.url.removeprefix("http://"), scheme="http",
                               access_key=ACCESS_KEY, secret_key=SECRET_KEY, region=REGION)
        pq.write_table(table, f"{bucket}/data/part-0.parquet", filesystem=fs)
        assert pq.read_table(f"{bucket}/data/part-0.parquet", filesystem=fs).equals(table)
        info = fs.get_file_info(f"{bucket}/data/part-0.parquet")
        assert info.type == pafs.FileType.File and info.size > 0
        # pyarrow writes with a multipart upload whose part goes up chunked, behind "Expect: 100-continue".
        assert any(hit.chunked and hit.expect_continue for hit in proxy.hits)
        assert proxy.requests == proxy.forwarded > 0
        assert_counts_add_up(proxy)


def test_pyarrow_survives_dropped_connections(s3_endpoint, bucket):
    table = pa.table({"x": list(range(100))})
    with fault_proxy(s3_endpoint, drop_rate=0.3, seed=3) as proxy:
        fs = pafs.S3FileSystem(endpoint_override=proxy.url.removeprefix("http://"), scheme="http",
                               access_key=ACCESS_KEY, secret_key=SECRET_KEY, region=REGION,
                               retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=10))
        pq.write_table(table, f"{bucket}/t.parquet", filesystem=fs)
        assert pq.read_table(f"{bucket}/t.parquet", filesystem=fs).equals(table)
        assert proxy.drops_injected > 0
        assert_counts_add_up(proxy)


def test_signatures_still_verify_through_the_proxy():
    """With moto's auth switched on, SigV4 requests through the proxy verify: the proxy keeps the signed Host."""
    code = (
        "from moto.server import ThreadedMotoServer\n"
        "import sys\n"
        "server = ThreadedMotoServer(ip_address='127.0.0.1', port=0, verbose=False)\n"
        "server.start()\n"
        "print(server.get_host_and_port()[1], flush=True)\n"
        "sys.stdin.read()\n"
    )
    # The first 4 requests go unauthenticated: they create the IAM user, its policy and key, and the bucket.
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "4"}
    with subprocess.Popen([sys.executable, "-c", code], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL, text=True) as server:
        try:
            _check_signatures(server)
        finally:
            server.kill()


def _check_signatures(server: subprocess.Popen) -> None:
    endpoint = f"http://127.0.0.1:{int(server.stdout.readline())}"
    iam = boto3.session.Session().client("iam", endpoint_url=endpoint, region_name=REGION,
                                         aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY)
    iam.create_user(UserName="tester")
    iam.put_user_policy(UserName="tester", PolicyName="all", PolicyDocument=json.dumps({
        "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
    key = iam.create_access_key(UserName="tester")["AccessKey"]
    credentials = Credentials(key["AccessKeyId"], key["SecretAccessKey"])
    name = f"signed-{uuid.uuid4().hex[:8]}"
    s3_client(endpoint, ONE_ATTEMPT).create_bucket(Bucket=name)

    with fault_proxy(endpoint) as proxy:
        good = s3_client(proxy.url, ONE_ATTEMPT, access=key["AccessKeyId"], secret=key["SecretAccessKey"])
        good.put_object(Bucket=name, Key="k", Body=b"signed")
        assert good.get_object(Bucket=name, Key="k")["Body"].read() == b"signed"
        bad = s3_client(proxy.url, ONE_ATTEMPT, access=key["AccessKeyId"], secret="wrong")
        with pytest.raises(botocore.exceptions.ClientError) as refused:
            bad.get_object(Bucket=name, Key="k")
        # So moto really checks signatures when auth is on (it does not by default).
        assert refused.value.response["Error"]["Code"] == "SignatureDoesNotMatch"
        assert proxy.forwarded == 3

        # Why the proxy keeps the Host header: a request signed for the proxy's address verifies upstream
        # with that Host, and fails once Host is rewritten to the upstream's address.
        signed = AWSRequest("GET", f"{proxy.url}/{name}/k")
        S3SigV4Auth(credentials, "s3", REGION).add_auth(signed)
        statuses = {}
        for host in (proxy.url, endpoint):
            headers = {**dict(signed.headers.items()), "Host": host.removeprefix("http://")}
            conn = http.client.HTTPConnection(*endpoint.removeprefix("http://").split(":"), timeout=10)
            conn.request("GET", f"/{name}/k", headers=headers)
            statuses[host] = conn.getresponse().status
            conn.close()
        assert statuses == {proxy.url: 200, endpoint: 403}


# ---- injected errors ---------------------------------------------------------------------------------------


def test_one_attempt_client_sees_slowdown_errors(s3_endpoint, bucket):
    with fault_proxy(s3_endpoint, error_rate=0.3, seed=1) as proxy:
        client = s3_client(proxy.url, ONE_ATTEMPT)
        failures = []
        for i in range(20):
            try:
                client.put_object(Bucket=bucket, Key=f"k{i}", Body=b"x")
            except botocore.exceptions.ClientError as exc:
                failures.append(exc.response)
        assert proxy.requests == 20  # one attempt each: no retries behind our back
        assert 0 < len(failures) == proxy.errors_injected < 20
        for response in failures:
            assert response["Error"] == {"Code": "SlowDown", "Message": "injected"}
            assert response["ResponseMetadata"]["HTTPStatusCode"] == 503
            assert response["ResponseMetadata"]["HTTPHeaders"]["content-type"] == "application/xml"
        assert_counts_add_up(proxy)


def test_retrying_client_survives_errors(s3_endpoint, bucket, direct, quick_backoff):
    with fault_proxy(s3_endpoint, error_rate=0.3, seed=2) as proxy:
        client = s3_client(proxy.url, RETRYING)
        for i in range(50):
            client.put_object(Bucket=bucket, Key=f"k{i}", Body=f"value {i}".encode())
            assert client.get_object(Bucket=bucket, Key=f"k{i}")["Body"].read() == f"value {i}".encode()
        assert proxy.errors_injected > 10
        assert proxy.forwarded == 100  # every put and get reached moto exactly once
        assert proxy.requests == 100 + proxy.errors_injected
        assert_counts_add_up(proxy)
    assert direct.list_objects_v2(Bucket=bucket)["KeyCount"] == 50


def test_fail_all_exhausts_the_retries(s3_endpoint, bucket, quick_backoff):
    with fault_proxy(s3_endpoint, fail_all=True) as proxy:
        client = s3_client(proxy.url, RETRYING)
        with pytest.raises(botocore.exceptions.ClientError, match=r"SlowDown.*reached max retries: 10"):
            client.put_object(Bucket=bucket, Key="never", Body=b"x")
        assert proxy.requests == proxy.errors_injected == 11 and proxy.forwarded == 0
        with pytest.raises(botocore.exceptions.ClientError) as failed:
            client.get_object(Bucket=bucket, Key="never")
        meta = failed.value.response["ResponseMetadata"]
        assert failed.value.response["Error"]["Code"] == "SlowDown"
        assert meta["HTTPStatusCode"] == 503 and meta["MaxAttemptsReached"] and meta["RetryAttempts"] == 10
        assert proxy.requests == 22
        assert_counts_add_up(proxy)


def test_max_attempts_counts_retries_not_attempts(s3_endpoint, bucket, quick_backoff):
    """The pitfall: botocore's ``max_attempts: 1`` is one retry, so two requests."""
    with fault_proxy(s3_endpoint, fail_all=True) as proxy:
        client = s3_client(proxy.url, Config(retries={"max_attempts": 1, "mode": "standard"}))
        with pytest.raises(botocore.exceptions.ClientError):
            client.head_object(Bucket=bucket, Key="k")
        assert proxy.requests == 2


def test_faults_limited_to_methods_and_switched_off_while_running(s3_endpoint, bucket, direct):
    direct.put_object(Bucket=bucket, Key="existing", Body=b"old")
    with fault_proxy(s3_endpoint, error_rate=1.0, methods={"put"}) as proxy:
        client = s3_client(proxy.url, ONE_ATTEMPT)
        assert client.get_object(Bucket=bucket, Key="existing")["Body"].read() == b"old"
        client.head_object(Bucket=bucket, Key="existing")
        with pytest.raises(botocore.exceptions.ClientError, match="SlowDown"):
            client.put_object(Bucket=bucket, Key="existing", Body=b"new")
        assert proxy.stats() == {"requests": 3, "errors_injected": 1, "drops_injected": 0, "forwarded": 2}

        proxy.error_rate = 0.0  # faults off part-way
        client.put_object(Bucket=bucket, Key="existing", Body=b"new")
        proxy.configure(methods=None, fail_all=True)
        with pytest.raises(botocore.exceptions.ClientError, match="SlowDown"):
            client.get_object(Bucket=bucket, Key="existing")
        proxy.faults_off()
        assert client.get_object(Bucket=bucket, Key="existing")["Body"].read() == b"new"
        assert proxy.stats() == {"requests": 6, "errors_injected": 2, "drops_injected": 0, "forwarded": 4}
        with pytest.raises(ValueError):
            proxy.configure(error_rate=0.7, drop_rate=0.7)


def test_same_seed_same_faults(s3_endpoint, bucket):
    def outcomes(seed: int) -> list[str]:
        with fault_proxy(s3_endpoint, error_rate=0.25, drop_rate=0.25, seed=seed) as proxy:
            client = s3_client(proxy.url, ONE_ATTEMPT)
            for i in range(24):
                try:
                    client.put_object(Bucket=bucket, Key=f"s{i}", Body=b"x")
                except (botocore.exceptions.ClientError, botocore.exceptions.ConnectionClosedError):
                    pass
            return [hit.outcome for hit in proxy.hits]

    first = outcomes(5)
    assert first == outcomes(5)
    assert {"error", "drop", "forward"} == set(first)
    assert first != outcomes(6)


def test_concurrent_clients_under_faults(s3_endpoint, bucket, direct, quick_backoff):
    with fault_proxy(s3_endpoint, error_rate=0.15, drop_rate=0.15, seed=4) as proxy:
        client = s3_client(proxy.url, Config(max_pool_connections=16, retries={"mode": "standard", "max_attempts": 10}))

        def round_trip(i: int) -> None:
            body = bytes([i]) * (1000 + 997 * i)
            client.put_object(Bucket=bucket, Key=f"c{i}", Body=body)
            assert client.get_object(Bucket=bucket, Key=f"c{i}")["Body"].read() == body

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(round_trip, range(40)))
        assert proxy.forwarded == 80 and proxy.errors_injected > 0 and proxy.drops_injected > 0
        assert_counts_add_up(proxy)
    assert direct.list_objects_v2(Bucket=bucket)["KeyCount"] == 40


# ---- dropped connections -----------------------------------------------------------------------------------


def test_one_attempt_client_sees_dropped_connections(s3_endpoint, bucket):
    with fault_proxy(s3_endpoint, drop_rate=0.3, seed=1) as proxy:
        client = s3_client(proxy.url, ONE_ATTEMPT)
        dropped = 0
        for i in range(20):
            try:
                client.put_object(Bucket=bucket, Key=f"k{i}", Body=b"x")
                client.get_object(Bucket=bucket, Key=f"k{i}")["Body"].read()
            except botocore.exceptions.ConnectionClosedError as exc:
                assert "Connection was closed before we received a valid response" in str(exc)
                dropped += 1
        assert 0 < dropped == proxy.drops_injected
        assert proxy.errors_injected == 0
        assert_counts_add_up(proxy)


def test_retrying_client_survives_dropped_connections(s3_endpoint, bucket, direct, quick_backoff):
    with fault_proxy(s3_endpoint, drop_rate=0.3, seed=2) as proxy:
        client = s3_client(proxy.url, RETRYING)
        for i in range(50):
            client.put_object(Bucket=bucket, Key=f"k{i}", Body=f"value {i}".encode())
            assert client.get_object(Bucket=bucket, Key=f"k{i}")["Body"].read() == f"value {i}".encode()
        assert proxy.drops_injected > 10 and proxy.forwarded == 100
        # Standard mode retries a PUT whose connection was dropped (the body is bytes, so it can be resent).
        dropped_puts = {hit.path for hit in proxy.hits if hit.method == "PUT" and hit.outcome == "drop"}
        assert dropped_puts
        assert_counts_add_up(proxy)
    assert direct.list_objects_v2(Bucket=bucket)["KeyCount"] == 50


def test_lost_put_response_after_the_put_was_applied(s3_endpoint, bucket, direct, quick_backoff):
    # phase="response": the PUT reaches moto and is stored; only its response is lost.
    with fault_proxy(s3_endpoint, drop_rate=1.0, methods={"PUT"}, phase="response") as proxy:
        with pytest.raises(botocore.exceptions.ConnectionClosedError):
            s3_client(proxy.url, ONE_ATTEMPT).put_object(Bucket=bucket, Key="lost", Body=b"stored anyway")
        assert direct.get_object(Bucket=bucket, Key="lost")["Body"].read() == b"stored anyway"
        assert proxy.drops_injected == proxy.forwarded == proxy.requests == 1

        proxy.configure(drop_rate=0.0, error_rate=0.5)  # and a 503 after the PUT was applied
        client = s3_client(proxy.url, RETRYING)
        for i in range(10):
            client.put_object(Bucket=bucket, Key=f"twice-{i}", Body=b"same body")
        assert proxy.errors_injected > 0
        assert proxy.forwarded == proxy.requests  # every attempt, failed or not, was applied upstream
    assert direct.list_objects_v2(Bucket=bucket, Prefix="twice-")["KeyCount"] == 10


# ---- lifecycle ---------------------------------------------------------------------------------------------


def test_stops_cleanly_and_cuts_idle_connections(s3_endpoint, bucket):
    with fault_proxy(s3_endpoint) as proxy:
        host, port = proxy.url.removeprefix("http://").split(":")
        idle = http.client.HTTPConnection(host, int(port), timeout=5)
        idle.request("GET", f"/{bucket}?list-type=2")
        assert idle.getresponse().read().startswith(b"<?xml")
    assert not [thread.name for thread in threading.enumerate() if thread.name.endswith(f":{port}")]
    # The kept-alive connection was closed by the proxy, and nothing listens on the port any more.
    with pytest.raises((http.client.HTTPException, OSError)):
        idle.request("GET", f"/{bucket}?list-type=2")
        idle.getresponse()
    with pytest.raises(OSError):
        socket.create_connection((host, int(port)), timeout=1).close()
