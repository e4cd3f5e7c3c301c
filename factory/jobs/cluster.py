"""Starting or joining Ray, and deploying the replicas a job needs."""

from __future__ import annotations

import json
import os
import re
import secrets
import time
from typing import Any

import structlog

from factory.errors import ConfigError, ModelError, UnsafeCluster
from factory.jobs.cluster_auth import private_ray_refusal, require_token_auth, wants_token

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
    way, refuse one that lets callers in without a token (factory.jobs.cluster_auth): every command that runs work
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


def running_fingerprint(app_name: str) -> str | None:
    """The config fingerprint of the replicas `app_name` runs now, or None when it is not running."""
    from ray import serve

    from factory.routing.replica import DEPLOYMENT_NAME

    try:
        status = serve.status().applications.get(app_name)
        if status is None or status.status != "RUNNING":
            return None
        handle = serve.get_deployment_handle(DEPLOYMENT_NAME, app_name)
        return handle.deployed_fingerprint.remote().result(timeout_s=30)
    except Exception:  # no Serve yet, another app layout, a replica mid-restart: deploy afresh
        return None


def app_exists(app_name: str) -> bool:
    from ray import serve

    try:
        return app_name in serve.status().applications
    except Exception:  # Serve not started on this cluster yet
        return False


def default_app_name(job: str) -> str:
    return f"factory-{job}"


def deploy(spec, app_name: str, registry=None, *, owned: bool) -> None:
    """Deploy the replica app for this job's profile and sizing, reuse it when it already runs that config, or
    refuse: an app the job does not own (one it names) that serves another config belongs to someone else."""
    from ray import serve

    from factory.routing.app import replica_fingerprint, replica_setup
    from factory.routing.replica import SERVE_DEFINITION_LOCK, build_replica_app

    config, sizing = replica_setup(spec.profile, spec.serve, spec.safety, spec.performance, registry, spec.revisions)
    fingerprint = replica_fingerprint(config, sizing)  # the same as a `factory serve` fleet's (joinable)
    if running_fingerprint(app_name) == fingerprint:
        # serve.run from Python restarts every replica even for an identical app; a warm one is reused.
        log.info("reusing running replicas", app=app_name)
        return
    if not owned and app_exists(app_name):
        raise ConfigError(
            f"serve.app_name: the Serve app {app_name!r} is serving another config (profile, sizing, safety or "
            "adapters differ); leave serve.app_name unset to run in the job's own app, or name another app"
        )
    if not spec.serve.gpus_on_demand:
        check_gpus(spec.profile, sizing["num_gpus"], spec.serve.replicas, _cluster_gpus())
    with SERVE_DEFINITION_LOCK:  # another job in this process may be deploying too
        app = build_replica_app(config, fingerprint=fingerprint, **sizing)
        serve.start(http_options={"host": "127.0.0.1"})
        # route_prefix=None: batch jobs talk to replicas through handles only. serve.run(blocking=False) would
        # still wait, with no deadline, for the app to be RUNNING; _run(_blocking=False) returns once the
        # deployment is registered, and wait_until_ready waits with one.
        serve._run(app, name=app_name, route_prefix=None, _blocking=False)
    log.info("replicas deploying", app=app_name, replicas=spec.serve.replicas, profile=spec.profile)


def _cluster_gpus() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0))


def check_gpus(profile: str, per_replica: float, replicas: int, cluster_gpus: float) -> None:
    """Refuse a deploy whose replicas can never be placed; warn when only some of them can.

    Without this, Serve waits for GPUs a cluster does not have, and the job with it (until serve.ready_timeout_s).
    """
    if per_replica <= 0:
        return
    if cluster_gpus < per_replica:
        raise ConfigError(
            f"serve.num_gpus: profile {profile!r} needs {_gpus(per_replica)} per replica, the Ray cluster has "
            f"{_gpus(cluster_gpus)}; run it on a cluster with GPUs, set serve.num_gpus: 0 to run the profile "
            "on CPU, or serve.gpus_on_demand: true if the cluster adds GPU nodes when asked"
        )
    if cluster_gpus < per_replica * replicas:
        log.warning("the cluster's GPUs fit fewer replicas than serve.replicas; Serve starts the replicas that fit",
                    profile=profile, replicas=replicas, gpus_per_replica=per_replica, cluster_gpus=cluster_gpus)


def _gpus(count: float) -> str:
    return f"{count:g} GPU" + ("" if count == 1 else "s")


def wait_until_ready(app_name: str, timeout_s: float, poll_s: float = 1.0) -> None:
    """Return once the app's replicas can take requests; raise `ModelError` (one line) when its deploy failed or
    its replicas are not running within `timeout_s`, so a run never waits on replicas that cannot start."""
    from ray import serve

    deadline = time.monotonic() + timeout_s
    while True:
        app = serve.status().applications.get(app_name)
        failure = deploy_failure(app_name, app)
        if failure is not None:
            raise ModelError(failure)
        if is_ready(app):
            return
        if time.monotonic() >= deadline:
            raise ModelError(not_ready_line(app_name, timeout_s, app))
        time.sleep(poll_s)


# The pure functions below read Serve's status objects (ray.serve.schema.ApplicationStatusOverview and its
# DeploymentStatusOverview values) by attribute only, so they are tested without Ray.


def is_ready(app: Any) -> bool:
    """RUNNING; or every deployment has a running replica and the rest only wait for resources (a cluster that fits
    fewer replicas than asked for, see check_gpus): Serve keeps such an app DEPLOYING for as long as that lasts."""
    if app is None:
        return False
    if _status(app) == "RUNNING":
        return True
    deployments = list(app.deployments.values())
    return bool(deployments) and all(
        _replicas_in(deployment, "RUNNING") > 0
        and (_status(deployment) == "HEALTHY" or waiting_for(deployment.message) is not None)
        for deployment in deployments
    )


def deploy_failure(app_name: str, app: Any) -> str | None:
    """One line saying why the app's deploy failed, or None while it has not."""
    if app is None or _status(app) != "DEPLOY_FAILED":
        return None
    failed = [d.message for d in app.deployments.values() if _status(d) == "DEPLOY_FAILED" and d.message]
    reason = _last_line(failed[0] if failed else app.message) or "no reason given (see the Serve controller log)"
    return f"the replicas of Serve app {app_name!r} failed to start: {reason}"


def not_ready_line(app_name: str, timeout_s: float, app: Any) -> str:
    """The line for replicas that were not running by the deadline, naming the resources they wait for if any."""
    line = f"serve.ready_timeout_s: the replicas of Serve app {app_name!r} did not start within {timeout_s:g} s"
    messages = [d.message for d in app.deployments.values()] if app is not None else []
    wanted = next((found for found in map(waiting_for, messages) if found is not None), None)
    if wanted is not None:
        return f"{line}: they wait for resources the cluster does not have free ({wanted})"
    return f"{line} (model download, load and warm-up included; raise serve.ready_timeout_s if they need longer)"


# Serve's message for replicas it cannot place (ray/serve/_private/deployment_state.py, Ray 2.60):
# "... Resources required for each replica: {"CPU": 1, "GPU": 1}, total resources available: {"CPU": 2}. ..."
_WAITING = re.compile(r"Resources required for each replica: (?P<required>.+?), "
                      r"total resources available: (?P<available>.+?)\. ")


def waiting_for(message: str | None) -> str | None:
    """What a deployment's replicas wait for, from Serve's message: 'each replica needs ..., available ...'."""
    found = _WAITING.search(message or "")
    if found is None:
        return None
    return f"each replica needs {found['required']}, available {found['available']}"


def _last_line(text: str | None) -> str:
    # Serve's failure messages end with the replica's traceback, whose last line is the exception itself.
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    if not lines:
        return ""
    return re.sub(r"^(?:[A-Za-z_]\w*\.)+(?=\w+(?:Error|Exception)\b)", "", lines[-1])


def _status(item: Any) -> str:
    status = item.status  # a str Enum in Serve's objects
    return str(getattr(status, "value", status))


def _replicas_in(deployment: Any, state: str) -> int:
    return sum(count for key, count in deployment.replica_states.items()
               if str(getattr(key, "value", key)) == state)


def release(app_name: str) -> None:
    """Delete a job's own app at the end of its run, so its replicas give their CPUs/GPUs back."""
    from ray import serve

    if not app_exists(app_name):
        return  # the run stopped before its deploy (a refused config): nothing to give back, nothing to warn of
    try:
        serve.delete(app_name)
    except Exception as error:  # noqa: BLE001 - the run's output is committed; a leftover app is only a warning
        log.warning("could not delete the job's Serve app", app=app_name, error=repr(error))
