"""Starting or joining Ray, and deploying the replicas a job needs."""

from __future__ import annotations

import hashlib
import json
import logging
import os

import structlog

log = structlog.get_logger(__name__)


def connect(address: str | None = None) -> None:
    """Join the cluster at `address` (or $RAY_ADDRESS, as under `ray job submit`); else start a local one.

    A local Ray binds its dashboard to loopback: anyone who reaches the dashboard or Jobs API can run code.
    """
    import ray

    quiet_ray_data()
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    # Workers must find the same tiny checkpoints and log settings as the driver.
    env_vars = {key: os.environ[key] for key in ("FACTORY_HOME", "FACTORY_LOG_LEVEL") if key in os.environ}
    runtime_env = {"env_vars": env_vars} if env_vars else None
    if address:
        ray.init(address=address, runtime_env=runtime_env, logging_level=logging.WARNING, log_to_driver=True)
    else:
        ray.init(
            include_dashboard=False, dashboard_host="127.0.0.1", runtime_env=runtime_env,
            logging_level=logging.WARNING,
        )


def quiet_ray_data() -> None:
    """Ray Data's own progress bars and periodic progress logs would fight the job's progress line."""
    import ray

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.serve").setLevel(logging.WARNING)


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


def deploy(spec, app_name: str, registry=None) -> None:
    """Deploy (or update in place) the replica app for this job's profile and sizing."""
    from ray import serve

    from factory.routing.replica import ReplicaConfig, build_replica_app

    config = ReplicaConfig(
        profile=spec.profile, max_batch_size=spec.serve.max_batch_size,
        batch_wait_timeout_s=spec.serve.batch_wait_timeout_s, threads=max(1, int(spec.serve.num_cpus)),
        safety=spec.safety, max_adapters=spec.serve.max_adapters, max_adapter_bytes=spec.serve.max_adapter_bytes,
        adapters={ref.key: ref for ref in registry.adapters()} if registry is not None else {},
    )
    sizing = {"replicas": spec.serve.replicas, "num_cpus": spec.serve.num_cpus, "num_gpus": spec.serve.num_gpus,
              "max_ongoing_requests": spec.serve.max_ongoing_requests}
    fingerprint = hashlib.sha256(
        json.dumps([config.model_dump(mode="json"), sizing], sort_keys=True).encode()
    ).hexdigest()
    if running_fingerprint(app_name) == fingerprint:
        # serve.run from Python restarts every replica even for an identical app; a warm one is reused.
        log.info("reusing running replicas", app=app_name)
        return
    app = build_replica_app(config, fingerprint=fingerprint, **sizing)
    serve.start(http_options={"host": "127.0.0.1"})
    # route_prefix=None: batch jobs talk to replicas through handles only.
    serve.run(app, name=app_name, route_prefix=None, blocking=False)
    log.info("replicas ready", app=app_name, replicas=spec.serve.replicas, profile=spec.profile)
