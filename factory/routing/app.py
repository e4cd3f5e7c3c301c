"""The serving application: `ApiIngress` (HTTP + gRPC) in front of `StackReplica`, built from one config.

One builder serves every way of starting it: `factory serve --config FILE`, `serve run infra/serve.yaml` and
`serve deploy infra/serve.yaml` (import path ``factory.routing.app:build_app``, with `args` either
``{config: FILE}`` or the config's sections inline).

A serving config has a job spec's model sections, so a batch job can join the same warm fleet: a job that names
``serve.app_name: <app_name>`` and has the same `profile`, `serve` sizing, `safety`, `performance` and tenants
registry computes the same replica fingerprint (`replica_setup` and `replica_fingerprint`, shared with
factory.jobs.cluster.serve_app.deploy) and reuses these replicas; with any of them different it is refused, and never
redeploys the app::

    app_name: factory-api
    profile: tiny
    tenants: tenants.yaml            # relative to this file
    serve: {replicas: 1, num_cpus: 1, max_batch_size: 4, max_ongoing_requests: 8, max_queued_requests: 64}
    safety: {...}                    # as a job's
    api:                             # factory.routing.api_models.ApiSettings
      keys: [{id: 3f9a..., tenant: acme, hash: "sha256$...$..."}]     # `factory api-key acme`
      max_in_flight: 8
      input_prefixes: [s3://bucket/uploads/]
      output_prefix: s3://bucket/api-out
      limits: {max_image_bytes: 16777216}                              # bodies past 1.5x + 64 KiB: 413 unread
      grpc: {enabled: true, all_interfaces: true}                      # Serve's gRPC proxy binds [::]:9000
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from factory.errors import ConfigError, one_line, validation_problems
from factory.model.clip import scoring_model
from factory.model.performance import Performance
from factory.model.profiles import get_profile
from factory.model.revisions import hub_revisions, pin_revisions
from factory.routing.api_models import ApiSettings
from factory.routing.local import profile_defaults
from factory.routing.parser import GenerationDefaults
from factory.routing.proxy_bound import proxy_environment
from factory.routing.replica import ReplicaConfig
from factory.routing.tenants import TenantRegistry
from factory.safety.policy import SafetyPolicy

DEFAULT_APP_NAME = "factory-api"
GRPC_MESSAGE_SIZE_VARIABLE = "RAY_SERVE_GRPC_MAX_MESSAGE_SIZE"


def replica_fingerprint(config: ReplicaConfig, sizing: dict[str, Any]) -> str:
    """What identifies a running replica fleet: its config and sizing. A job joins an app only when equal."""
    return hashlib.sha256(json.dumps([config.model_dump(mode="json"), sizing], sort_keys=True).encode()).hexdigest()


def replica_setup(profile: str, serve: Any, safety: SafetyPolicy, performance: dict[str, Any] | None,
                  registry: TenantRegistry | None, revisions: dict[str, str] | None = None, *,
                  clip_score: bool = False, clip_revision: str | None = None,
                  ) -> tuple[ReplicaConfig, dict[str, Any]]:
    """The replicas' config and sizing from a job spec's or a serving config's sections (`serve` is either's
    `serve:`), and the commits its hub checkpoints were pinned to. Both build them here, so a job with a fleet's
    sections (and the same commits) computes its fingerprint and can join it. `clip_score` (a job's
    `quality.clip_score`) is part of it: replicas that score are not those that do not."""
    if clip_score:
        scoring_model(get_profile(profile))  # a profile with nothing to score with: one line, before any deploy
    config = ReplicaConfig(
        profile=profile, max_batch_size=serve.max_batch_size, batch_wait_timeout_s=serve.batch_wait_timeout_s,
        threads=max(1, int(serve.num_cpus)), safety=safety, max_adapters=serve.max_adapters,
        max_adapter_bytes=serve.max_adapter_bytes, lora_hotswap_rank=serve.lora_hotswap_rank, performance=performance,
        adapters={ref.key: ref for ref in registry.adapters()} if registry is not None else {},
        revisions=revisions or {}, clip_score=clip_score, clip_revision=clip_revision if clip_score else None,
    )
    sizing = {"replicas": serve.replicas, "num_cpus": serve.num_cpus,
              "num_gpus": get_profile(profile).replica_gpus(serve.num_gpus), "max_ongoing_requests": serve.max_ongoing_requests}
    return config, sizing


class FleetSizing(BaseModel):
    """The replicas, with the names and meanings of a job spec's `serve:` section (factory.jobs.spec.ServeConfig)."""

    model_config = ConfigDict(extra="forbid")

    replicas: int = Field(default=1, ge=1)
    num_cpus: float = Field(default=1.0, gt=0)
    num_gpus: float | None = Field(default=None, ge=0, description="Unset: 1 for a GPU profile, 0 for a CPU one")
    max_ongoing_requests: int = Field(default=8, ge=1)
    max_queued_requests: int = Field(
        default=64, ge=-1, description="Requests queued for the replicas beyond those ongoing, per ingress "
        "replica; past it Serve sheds load (503 with Retry-After). -1: unbounded. Not part of the fingerprint"
    )
    max_batch_size: int = Field(default=4, ge=1)
    batch_wait_timeout_s: float = Field(
        default=0.01, ge=0, description="How long a replica waits to fill a batch (online traffic wants it short; "
        "a job joining the app must use the same value)"
    )
    max_adapters: int = Field(default=4, ge=1)
    max_adapter_bytes: int = Field(default=2 * 1024**3, ge=1)
    lora_hotswap_rank: int | None = Field(default=None, ge=1)
    ready_timeout_s: float = Field(default=1800.0, gt=0, description="`factory serve` waits this long for replicas")


class ServingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    app_name: str = Field(default=DEFAULT_APP_NAME, pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
    profile: str = "tiny"
    tenants: str | None = Field(default=None, description="Tenants registry YAML (relative to the config file)")
    serve: FleetSizing = Field(default_factory=FleetSizing)
    safety: SafetyPolicy = Field(default_factory=SafetyPolicy)
    performance: dict[str, Any] | None = None
    api: ApiSettings = Field(default_factory=ApiSettings)

    @model_validator(mode="after")
    def _checked(self) -> ServingConfig:
        get_profile(self.profile)  # an unknown profile is one line here, not a failed replica later
        if self.performance:
            Performance.model_validate(self.performance)
        return self


class Serving(BaseModel):
    """A loaded config with its registry resolved: everything the builder needs."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    config: ServingConfig
    registry: TenantRegistry | None
    tenants_data: dict | None
    tenants_dir: str | None

    def replica_setup(self, revisions: dict[str, str] | None = None) -> tuple[ReplicaConfig, dict[str, Any]]:
        c = self.config
        return replica_setup(c.profile, c.serve, c.safety, c.performance, self.registry, revisions)

    def sizing(self) -> dict[str, Any]:
        return self.replica_setup()[1]

    def fingerprint(self) -> str:
        return replica_fingerprint(*self.replica_setup())

    def defaults(self) -> GenerationDefaults:
        base = profile_defaults(get_profile(self.config.profile)).model_dump()
        return GenerationDefaults(**(base | self.config.api.defaults.model_dump(exclude_none=True)))


def load_serving(data: dict | None = None, *, path: str | Path | None = None) -> Serving:
    """A serving config from a file (`path`) or a mapping (inline `args`), with relative paths resolved against the
    file's folder (or the working directory); every problem is one `ConfigError` line."""
    source = str(path) if path is not None else "serving config"
    base = Path(path).resolve().parent if path is not None else Path.cwd()
    if path is not None:
        try:
            data = yaml.safe_load(Path(path).read_text())
        except OSError as error:
            raise ConfigError(f"{path}: cannot read the serving config ({error.strerror or error})") from None
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: not valid YAML ({str(error).splitlines()[0]})") from None
    try:
        config = ServingConfig.model_validate(data or {})
    except ValidationError as error:
        raise ConfigError(f"{source}: {one_line(validation_problems(error))}") from None
    registry = tenants_data = tenants_dir = None
    if config.tenants is not None:
        tenants_path = Path(config.tenants).expanduser()
        tenants_path = tenants_path if tenants_path.is_absolute() else base / tenants_path
        registry = TenantRegistry.from_file(tenants_path)
        tenants_data = yaml.safe_load(tenants_path.read_text()) or {}
        tenants_dir = str(tenants_path.resolve().parent)
    known = set(registry.tenants) if registry is not None else None
    if known is not None:
        strangers = sorted({key.tenant for key in config.api.keys} - known)
        if strangers:
            raise ConfigError(f"{source}: api.keys: tenant {strangers[0]!r} is not in the tenants registry")
    try:
        from factory.routing.auth import Keyring

        Keyring(config.api.keys)
    except ValueError as error:
        raise ConfigError(f"{source}: {error}") from None
    return Serving(config=config, registry=registry, tenants_data=tenants_data, tenants_dir=tenants_dir)


def build_serving_app(serving: Serving):
    """The bound Serve application: `ApiIngress` (the ingress) holding a handle to `StackReplica`."""
    from ray import serve

    from factory.routing.api import INGRESS_NAME, ApiIngress
    from factory.routing.replica import SERVE_DEFINITION_LOCK, build_replica_app

    s = serving.config.serve
    settings = serving.config.api
    ingress_config = {"api": settings.model_dump(mode="json"), "defaults": serving.defaults().model_dump(),
                      "profile": serving.config.profile, "tenants": serving.tenants_data,
                      "tenants_dir": serving.tenants_dir}
    # Pinned once for the fleet: a replica Serve restarts later loads the same commits as the first ones.
    revisions = hub_revisions(pin_revisions(get_profile(serving.config.profile)))
    with SERVE_DEFINITION_LOCK:
        config, sizing = serving.replica_setup(revisions)
        replicas = build_replica_app(config, fingerprint=replica_fingerprint(config, sizing),
                                     max_queued_requests=s.max_queued_requests, **sizing)
        ingress = serve.deployment(
            ApiIngress,
            name=INGRESS_NAME,
            num_replicas=settings.ingress_replicas,
            ray_actor_options={"num_cpus": 0},  # routes and validates only; the CPUs belong to the model replicas
            max_ongoing_requests=settings.ingress_max_ongoing_requests,
            logging_config={"enable_access_log": False, "log_level": "WARNING"},
        )
        return ingress.bind(replicas, ingress_config)


def build_app(args: dict[str, Any]):
    """`serve run` / `serve deploy` entry point: ``args: {config: FILE}`` or the serving config's sections inline."""
    args = dict(args or {})
    path = args.pop("config", None)
    if path is not None and args:
        raise ConfigError(f"args: give `config` or the config's sections inline, not both (also got {sorted(args)})")
    return build_serving_app(load_serving(args if path is None else None, path=path))


def proxy_options(settings: ApiSettings) -> dict[str, Any]:
    """`serve.start` options for the config's proxies: HTTP where it says (loopback by default), reading no
    further into a body than the body limit (factory.routing.proxy_bound); gRPC, when enabled, with the Factory
    service, no reflection (it would list the services to anyone: Serve runs it on the proxy, before any key is
    checked), and its message size bounded. Serve 2.60 takes both bounds only from the proxy's process env
    (RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH, RAY_SERVE_GRPC_MAX_MESSAGE_SIZE: ray/serve/_private/constants.py),
    and the proxies are started by the controller with its runtime env."""
    env_vars = proxy_environment(settings.limits.body_limit())
    options: dict[str, Any] = {"http_options": {"host": settings.http.host, "port": settings.http.port}}
    if settings.grpc.enabled:
        options["grpc_options"] = {"port": settings.grpc.port, "grpc_servicer_functions": [_servicer_function()],
                                   "enable_reflection": False}
        env_vars[GRPC_MESSAGE_SIZE_VARIABLE] = str(settings.grpc_max_message_bytes())
    options["controller_options"] = {"runtime_env": {"env_vars": env_vars}}
    return options


def start_serve(serving: Serving) -> None:
    """Start Serve's proxies as the config says (see proxy_options). Serve keeps the options it first started
    with on a cluster: a running Serve is joined as it is."""
    from ray import serve

    serve.start(**proxy_options(serving.config.api))


def deploy_serving(serving: Serving, *, app_name: str | None = None, route_prefix: str | None = None) -> None:
    """Deploy (or redeploy) the app on the connected Ray and return at once, while the replicas load (serve.run
    would wait until every replica runs, forever for one the cluster cannot place): see /readyz, or
    factory.jobs.cluster.serve_app.wait_until_ready for one line saying why they do not start."""
    from ray import serve

    from factory.routing.replica import SERVE_DEFINITION_LOCK

    with SERVE_DEFINITION_LOCK:
        start_serve(serving)
        target = serve.RunTarget(target=build_serving_app(serving), name=app_name or serving.config.app_name,
                                 route_prefix=route_prefix or serving.config.api.route_prefix)
        serve.run_many([target], wait_for_applications_running=False)


def _servicer_function() -> str:
    from factory.routing.grpc_service import SERVICER_FUNCTION

    return SERVICER_FUNCTION
