"""The decisions behind refusing a Ray (factory.jobs.cluster.auth), without Ray: which addresses are loopback, when
a cluster with token auth off is refused, and when a private Ray that listens beyond loopback is."""

from __future__ import annotations

import pytest

from factory.jobs.cluster.auth import ALLOW_NO_AUTH_ENV, auth_refusal, beyond_loopback, private_ray_refusal


@pytest.mark.parametrize("address", ["127.0.0.1", "127.0.0.1:6379", "127.3.2.1:80", "[::1]:8265", "::1",
                                     "::ffff:127.0.0.1", "localhost:6379"])
def test_loopback_addresses(address):
    assert beyond_loopback({"gcs": address}) == []


@pytest.mark.parametrize("address", ["0.0.0.0", "::", "[::]:8265", "10.0.0.5:6379", "192.168.1.2", "fe80::1%eth0",
                                     "head.ray.svc:6379", "example.com"])
def test_addresses_beyond_loopback_and_names_that_may_resolve_anywhere(address):
    assert beyond_loopback({"dashboard": address}) == [f"dashboard {address}"]


def test_a_cluster_that_checks_tokens_always_passes():
    assert auth_refusal("10.0.0.5:6379", open_to_anyone=False, allowed=False, exposed=["gcs 10.0.0.5:6379"]) is None


def test_a_cluster_with_auth_off_is_refused_unless_allowed():
    line = auth_refusal("127.0.0.1:6379", open_to_anyone=True, allowed=False, exposed=[])
    assert line is not None and "\n" not in line
    assert "127.0.0.1:6379 runs with token auth off" in line and "RAY_AUTH_MODE=token" in line
    assert f"{ALLOW_NO_AUTH_ENV}=1" in line
    assert auth_refusal("127.0.0.1:6379", open_to_anyone=True, allowed=True, exposed=[]) is None


def test_the_switch_is_not_honoured_beyond_loopback():
    exposed = beyond_loopback({"gcs": "127.0.0.1:6379", "node 1a2b": "127.0.0.1", "dashboard socket 0": "0.0.0.0"})
    line = auth_refusal("127.0.0.1:6379", open_to_anyone=True, allowed=True, exposed=exposed)
    assert line is not None and "\n" not in line
    assert f"{ALLOW_NO_AUTH_ENV}=1 is honoured only for a Ray on loopback" in line
    assert "dashboard socket 0 0.0.0.0" in line


def test_a_private_ray_beyond_loopback_is_refused():
    assert private_ray_refusal("127.0.0.1") is None
    line = private_ray_refusal("10.1.2.3")
    assert line is not None and "\n" not in line and "listens on 10.1.2.3" in line and "it was stopped" in line
