"""Starting or joining Ray: the one door through which every command that runs work on Ray comes in."""

from __future__ import annotations

import json
import os
import secrets

import structlog

from factory.errors import UnsafeCluster
from factory.jobs.cluster.auth import private_ray_refusal, require_token_auth, wants_token

log = structlog.get_logger(__name__)

# What a job's workers and replicas need from the driver's environment: factory's own settings, and where the models
# are (HF_HOME, HF_HUB_CACHE, HF_HUB_OFFLINE, HF_ENDPOINT). No secret is forwarded: the runtime env is shown by the
# dashboard and the state API to anyone who can reach them. FLUX.1-dev is gated, and its token reaches workers the
# way S3 credentials do, from the node itself: HF_TOKEN in the pod or host environment (infra/), which Ray's workers
# inherit (a private Ray's too: its processes are the driver's children), or a token file, whose path
# (HF_TOKEN_PATH, default $HF_HOME/token on a shared mount) is forwarded since a path is no secret.
FORWARDED_ENV = ("FACTORY_HOME", "FACTORY_LOG_LEVEL", "FACTORY_LOG_JSON", "FACTORY_FAILPOINT",
                 "HF_HOME", "HF_HUB_OFFLINE", "HF_ENDPOINT", "HF_HUB_CACHE", "HF_TOKEN_PATH")


def connect(address: str | None = None) -> None:
    """Join the cluster at `address` (or $RAY_ADDRESS, as under `ray job submit`); else start a private one. Either
    way, refuse one that lets callers in without a token (factory.jobs.cluster.auth): every command that runs work
    on Ray comes through here.

    A private Ray listens on loopback only (GCS, raylet, object manager, core workers, dashboard and runtime-env
    agents, metrics), has no dashboard, and checks a token of its own (see _start_private_ray). Ray's, Ray Data's
    and Serve's own logs go to files, not the console; workers' warnings and errors still reach it (see
    factory.logs).
    """
    import ray

    from factory.logs import filter_forwarded_worker_output

    quiet_ray_data()
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    options = {
        "runtime_env": _worker_runtime_env(),
        # factory.logs routes the "ray" logger (to the log file); ray.init leaves it alone.
        "configure_logging": False,
        "log_to_driver": True,  # workers' warnings and errors reach the console, filtered below
    }
    if address:
        _join(address, **options)
    else:
        _start_private_ray(**options)
    require_token_auth()
    filter_forwarded_worker_output()  # workers: their warnings and errors, not Serve's or Ray Data's INFO
    quiet_ray_data()  # ray.init(configure_logging=False) cleared the "ray" logger's handlers; keep it routed


def _worker_runtime_env() -> dict | None:
    """Workers find the same tiny checkpoints and log settings as the driver, and set up logging when they
    start (Ray Data tasks never call configure_logging themselves). Keys that a submitted job's runtime_env
    already sets are left to it: ray.init refuses to merge two values for one key."""
    submitted: dict = {}
    try:
        submitted = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}").get("runtime_env") or {}
    except (ValueError, AttributeError):
        pass
    taken = set(submitted.get("env_vars") or {})
    env_vars = {key: os.environ[key] for key in FORWARDED_ENV
                if key in os.environ and key not in taken}
    runtime_env: dict = {"env_vars": env_vars} if env_vars else {}
    if "worker_process_setup_hook" not in submitted:
        runtime_env["worker_process_setup_hook"] = "factory.logs.setup_worker_logging"
    return runtime_env or None


def _join(address: str, **options) -> None:
    import ray
    from ray.exceptions import AuthenticationError

    try:
        ray.init(address=address, **options)
    except (AuthenticationError, ConnectionError):
        # Ray says only "Failed to connect" when its GCS refused this process's token, or the lack of one.
        if not wants_token(address):
            raise
        raise UnsafeCluster(
            f"the Ray at {address} wants its token, and this process has none or another: set RAY_AUTH_MODE=token "
            "and the cluster's token in RAY_AUTH_TOKEN or a file named by RAY_AUTH_TOKEN_PATH (README: On a Ray "
            "cluster)"
        ) from None


def _start_private_ray(**options) -> None:
    """A new Ray instance for this process alone, with every server of the node on loopback, checking a token.

    Token auth is as RAY_AUTH_MODE says, on when unset (ray.init's default for a new local instance). Where this
    process has no token of its own (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH), it gets a fresh random one, in its
    environment and its Ray's (the GCS, raylet and workers are its children) and nowhere else: Ray would otherwise
    write, or reuse, ~/.ray/auth_token, a token every `ray start` of the same user picks up later.

    Ray binds a node's servers (GCS, raylet and object manager, core workers, dashboard agent, runtime-env
    agent, metrics exporters, the headless dashboard and autoscaler monitor) to the node IP when that is a
    loopback address, and to all interfaces otherwise. On Linux, though, ray.init turns
    `_node_ip_address="127.0.0.1"` into the machine's routable address (services.resolve_ip_for_localhost)
    unless Ray clusters are disabled, as they are by default on macOS and Windows:
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, which Ray reads into ray_constants.ENABLE_RAY_CLUSTER when first
    imported (usually before this runs). Both are set for the duration of ray.init only, so this process can
    still join a real cluster later; the started processes get the node IP on their command lines.
    """
    import ray
    from ray._private import ray_constants
    from ray._private.authentication.authentication_token_setup import AUTH_MODE_ENV_VAR

    if os.environ.get(AUTH_MODE_ENV_VAR, "token").lower() == "token" and not (
            os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")):
        os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)  # 256 bits, as `ray get-auth-token --generate`
    variable = ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR
    saved_env, saved_flag = os.environ.get(variable), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[variable] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        # address="local": a new instance even when `ray start` left a cluster in /tmp/ray/ray_current_cluster
        # (ray.init() with no address would join that one instead).
        ray.init(address="local", include_dashboard=False, dashboard_host="127.0.0.1",
                 _node_ip_address="127.0.0.1", **options)
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        if saved_env is None:
            os.environ.pop(variable, None)
        else:
            os.environ[variable] = saved_env
    # Fail closed: a Ray upgrade that changed how it picks the node IP (tests/integration/test_console.py) would
    # otherwise leave this Ray's servers on every interface.
    refusal = private_ray_refusal(ray._private.worker._global_node.node_ip_address)
    if refusal is not None:
        ray.shutdown()
        raise UnsafeCluster(refusal)


def quiet_ray_data() -> None:
    """Ray Data's progress bars and execution banners would fight the job's progress line, and Ray, Ray Data and
    Serve each put a console handler on their logger when imported: import both here, so those exist, and route
    them through factory.logs (the log file; the console from ERROR up)."""
    import ray
    import ray.data
    import ray.serve  # noqa: F401  (Serve installs its default console logger at import)

    from factory.logs import route_library_logs

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.enable_operator_progress_bars = False
    context.print_on_execution_start = False
    route_library_logs()
