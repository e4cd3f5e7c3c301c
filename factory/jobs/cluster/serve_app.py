"""The Serve app a job's replicas run in: deployed for the run (or joined, when the job names a warm one), waited
for with a deadline, and given back after it."""

from __future__ import annotations

import re
import time
from typing import Any

import structlog

from factory.errors import ConfigError, ModelError

log = structlog.get_logger(__name__)


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

    scoring = spec.quality is not None and spec.quality.clip_score  # replicas load CLIP only for a job that scores
    config, sizing = replica_setup(spec.profile, spec.serve, spec.safety, spec.performance, registry, spec.revisions,
                                   clip_score=scoring, clip_revision=spec.quality.clip_revision if scoring else None)
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


class JobApp:
    """The Serve app a job's replicas run in: its own (`factory-<job name>`), deployed for the run and deleted after
    it unless `serve.keep_warm`; or one the job names (`serve.app_name`, a warm fleet), joined and never deleted."""

    def __init__(self, spec):
        self.spec = spec
        self.name = spec.serve.app_name or default_app_name(spec.name)
        self.owned = spec.serve.app_name is None
        self.deployed = False
        self.start_seconds = 0.0  # deploying until ready: load, compile, warm-up

    def deploy(self, registry=None) -> None:
        """Deploy (or reuse) the replicas and wait until they take requests, within serve.ready_timeout_s."""
        started = time.monotonic()
        self.deployed = True  # from here on there may be an app to give back, even if it never gets ready
        deploy(self.spec, self.name, registry, owned=self.owned)
        wait_until_ready(self.name, self.spec.serve.ready_timeout_s)
        self.start_seconds = time.monotonic() - started

    def release(self) -> None:
        """Give the replicas back after the run: only an app this run deployed, that it owns and is not kept warm."""
        if self.deployed and self.owned and not self.spec.serve.keep_warm:
            release(self.name)


def release(app_name: str) -> None:
    """Delete a job's own app at the end of its run, so its replicas give their CPUs/GPUs back."""
    from ray import serve

    if not app_exists(app_name):
        return  # the run stopped before its deploy (a refused config): nothing to give back, nothing to warn of
    try:
        serve.delete(app_name)
    except Exception as error:  # noqa: BLE001 - the run's output is committed; a leftover app is only a warning
        log.warning("could not delete the job's Serve app", app=app_name, error=repr(error))
