"""A real S3 endpoint for tests: moto's server mode on loopback, spoken to over HTTP.

Used instead of in-process mocking so boto3 *and* pyarrow's S3FileSystem (which does not go through
botocore) hit the same server. moto keeps its state per process, so tests isolate themselves with
fresh bucket names (`new_bucket`), not fresh servers.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager


ACCESS_KEY = "testing"
SECRET_KEY = "testing"
REGION = "us-east-1"

# Variables that could point boto3 or pyarrow at real credentials or a real account.
_UNSET = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_REGION")


@contextmanager
def moto_server() -> Iterator[str]:
    """Run moto's S3 server on 127.0.0.1 and a free port; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    # werkzeug logs every request at INFO; with many small S3 calls that drowns real test output.
    access_log = logging.getLogger("werkzeug")
    old_level = access_log.level
    access_log.setLevel(logging.WARNING)
    # Port 0: the OS picks a free port at bind time, so there is no race with other test processes.
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()
        access_log.setLevel(old_level)


def aws_env(endpoint_url: str) -> dict[str, str]:
    """The environment that sends boto3 and factory's Storage to `endpoint_url` with test credentials."""
    return {
        "AWS_ENDPOINT_URL": endpoint_url,
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_DEFAULT_REGION": REGION,
        # No profile files and no instance-metadata lookups: they are slow and could find real credentials.
        "AWS_CONFIG_FILE": "/dev/null",
        "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
        "AWS_EC2_METADATA_DISABLED": "true",
    }


def point_environment_at(endpoint_url: str) -> None:
    """Point this process, and the Ray workers it starts later, at the test endpoint with test credentials."""
    for name in _UNSET:
        os.environ.pop(name, None)
    os.environ.update(aws_env(endpoint_url))


def create_bucket(endpoint_url: str, name: str) -> str:
    """Create `name` on the server and return ``s3://name``."""
    import boto3

    client = boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint_url,
        region_name=REGION,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
    )
    client.create_bucket(Bucket=name)
    return f"s3://{name}"


def new_bucket(endpoint_url: str, prefix: str = "test") -> str:
    """Create a bucket with a fresh name and return ``s3://<name>``."""
    return create_bucket(endpoint_url, f"{prefix}-{uuid.uuid4().hex[:12]}")
