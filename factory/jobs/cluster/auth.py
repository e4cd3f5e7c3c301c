"""Whether the Ray a command runs on lets only holders of its token in, and where it listens.

Anyone who can call a Ray without auth can run code on it (CVE-2023-48022): the Jobs API, the GCS, and every Serve
replica's internal gRPC server, which unpickles what it is sent. Ray 2.60 checks tokens only where RAY_AUTH_MODE=token
was set on every node before `ray start`; a plain `ray start` runs with auth off. So every command that runs work on
Ray (run, caption, validate, serve, train) checks the cluster it joined, once, through `factory.jobs.cluster.connect`,
and refuses with one line when the cluster answers a caller that shows no token. An operator may allow that for a
machine whose Ray listens on loopback only (FACTORY_ALLOW_NO_AUTH=1); nowhere else.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from urllib.parse import urlsplit

import structlog

from factory.errors import UnsafeCluster

log = structlog.get_logger(__name__)

ALLOW_NO_AUTH_ENV = "FACTORY_ALLOW_NO_AUTH"
_PROBE_TIMEOUT_S = 10.0


def require_token_auth() -> None:
    """Refuse the Ray this process is connected to when it lets callers in without a token: disconnect (a private
    Ray is stopped with it) and raise `UnsafeCluster` (one line). Called by `connect()`; a command that joins Ray
    some other way calls it right after joining."""
    import ray

    node = ray._private.worker.global_worker.node
    if node is None:  # a Ray Client (ray://) connection: no GCS address to ask
        ray.shutdown()
        raise UnsafeCluster("cannot tell whether a Ray joined through Ray Client (ray://) checks tokens; join it "
                            "by its GCS address (host:6379) instead")
    gcs_address = node.gcs_address
    allowed = os.environ.get(ALLOW_NO_AUTH_ENV) == "1"
    try:
        open_to_anyone = accepts_calls_without_token(gcs_address)
        addresses = cluster_addresses(gcs_address) if open_to_anyone and allowed else {}
    except UnsafeCluster:
        ray.shutdown()
        raise
    refusal = auth_refusal(gcs_address, open_to_anyone=open_to_anyone, allowed=allowed,
                           exposed=beyond_loopback(addresses))
    if refusal is not None:
        ray.shutdown()
        raise UnsafeCluster(refusal)
    if open_to_anyone:
        log.warning("running on a Ray with token auth off, as FACTORY_ALLOW_NO_AUTH=1 allows (loopback only)",
                    gcs=gcs_address)


def accepts_calls_without_token(gcs_address: str) -> bool:
    """Whether the GCS at `gcs_address` answers a call that carries no token.

    The cluster's own word, not this process's RAY_AUTH_MODE: a client in token mode joins a cluster whose auth is
    off without noticing (the cluster ignores the token it sends). The call (GetClusterId) reads nothing of value
    and changes nothing. Any answer but OK or UNAUTHENTICATED leaves the question open, and the run is refused.
    """
    import grpc
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    channel = _channel_without_token(gcs_address)
    try:
        gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel).GetClusterId(
            gcs_service_pb2.GetClusterIdRequest(), timeout=_PROBE_TIMEOUT_S)
    except grpc.RpcError as error:
        if error.code() == grpc.StatusCode.UNAUTHENTICATED:
            return False
        raise UnsafeCluster(
            f"cannot tell whether the Ray at {gcs_address} checks tokens (a call without one got "
            f"{error.code().name}); refusing to run on it"
        ) from None
    finally:
        channel.close()
    return True


def wants_token(address: str) -> bool:
    """Whether `address` is a GCS that refuses a call without a token (False when it is not a GCS address at all,
    or does not answer)."""
    if "://" in address or ":" not in address:  # ray://, auto, local: not a GCS address
        return False
    try:
        return not accepts_calls_without_token(address)
    except UnsafeCluster:
        return False


def _channel_without_token(address: str):
    """A channel to `address` without Ray's token interceptor (ray._private.grpc_utils adds it in token mode), with
    Ray's TLS settings when RAY_USE_TLS is on, as every Ray client then needs."""
    import grpc

    if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
        from ray._common.tls_utils import load_certs_from_env

        chain, key, ca = load_certs_from_env()
        credentials = grpc.ssl_channel_credentials(certificate_chain=chain, private_key=key, root_certificates=ca)
        return grpc.secure_channel(address, credentials)
    return grpc.insecure_channel(address)


def cluster_addresses(gcs_address: str) -> dict[str, str]:
    """Where the connected Ray listens: its GCS, every live node's address (Ray binds a node's servers to it when it
    is loopback, to all interfaces otherwise), and where the dashboard's sockets are bound on this machine (Ray
    records the node's address for a dashboard on 0.0.0.0, so only the socket table tells)."""
    import ray

    addresses = {"gcs": gcs_address}
    for node in ray.nodes():
        if node.get("Alive"):
            addresses[f"node {node['NodeID'][:8]}"] = node["NodeManagerAddress"]
    dashboard = ray._private.worker.get_dashboard_url()
    if dashboard:
        port = urlsplit(f"//{dashboard}").port
        for number, host in enumerate(_listening_hosts(port)):
            addresses[f"dashboard socket {number}"] = host
    return addresses


def _listening_hosts(port: int | None) -> list[str]:
    import psutil

    if port is None:
        return []
    try:
        connections = psutil.net_connections(kind="inet")
    except psutil.AccessDenied:  # macOS without root: where it listens is unknown, so not known to be loopback
        return ["unknown (the socket table is not readable)"]
    return [connection.laddr.ip for connection in connections
            if connection.status == psutil.CONN_LISTEN and connection.laddr.port == port]


# The pure decisions below are tested without Ray (tests/unit/test_cluster_auth.py).


def beyond_loopback(addresses: Mapping[str, str]) -> list[str]:
    """`what address` for each address (an IP or host, with or without a port) that is not loopback. A name that
    is not an IP literal counts as beyond, except `localhost`: a name may resolve anywhere."""
    exposed = []
    for what, address in addresses.items():
        host = urlsplit(f"//{address}").hostname or address
        if host == "localhost":
            continue
        try:
            ip = ipaddress.ip_address(host.split("%")[0])  # fe80::1%eth0: a zone names an interface, not the host
        except ValueError:
            loopback = False
        else:  # ::ffff:127.0.0.1, as a dual-stack socket reports an IPv4 peer, is loopback too
            loopback = (ip.ipv4_mapped or ip).is_loopback if ip.version == 6 else ip.is_loopback
        if not loopback:
            exposed.append(f"{what} {address}")
    return exposed


def auth_refusal(gcs_address: str, *, open_to_anyone: bool, allowed: bool, exposed: list[str]) -> str | None:
    """The one line that refuses a cluster, or None to go on. A cluster that checks tokens always passes; one that
    does not passes only when the operator allowed it and every address it listens on is loopback."""
    if not open_to_anyone:
        return None
    if not allowed:
        return (f"the Ray at {gcs_address} runs with token auth off: anyone who reaches it can run code on it. "
                "Start every node with RAY_AUTH_MODE=token and the cluster's token (README: On a Ray cluster), or "
                f"set {ALLOW_NO_AUTH_ENV}=1 on a machine whose Ray listens on loopback only")
    if exposed:
        return (f"{ALLOW_NO_AUTH_ENV}=1 is honoured only for a Ray on loopback, and the Ray at {gcs_address} (token "
                f"auth off) listens beyond it ({', '.join(exposed)}); start it with RAY_AUTH_MODE=token")
    return None


def private_ray_refusal(node_ip: str) -> str | None:
    """The line that refuses the private Ray `factory run` started when it listens beyond loopback, or None."""
    exposed = beyond_loopback({"node": node_ip})
    if not exposed:
        return None
    return (f"the private Ray started for this command listens on {node_ip}, not on loopback only (a Ray upgrade "
            "may have changed how it picks its address); it was stopped. Run on a cluster with token auth instead "
            "(--address or RAY_ADDRESS)")
