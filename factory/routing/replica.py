"""The Serve deployment: every replica holds the whole stack and runs one library call per batch.

Requests arrive one at a time, through a deployment handle, from the job's Ray Data stage; `@serve.batch`
gathers concurrent ones so the stack sees batches. The request's adapter key is the
multiplexed model id, so Serve routes a request to a replica that already holds its adapter and never mixes
adapters in one batch. What a batch does is `BatchRunner`'s, shared with the CLI.
"""

from __future__ import annotations

import asyncio
import os
import threading
from typing import Any

import structlog
from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from factory.errors import FactoryError
from factory.io.images import DEFAULT_MAX_PIXELS
from factory.io.storage import Storage
from factory.logs import configure_logging
from factory.model.lora import LoraPool
from factory.model.lora.header import read_shape
from factory.model.lora.ref import BASE_ADAPTER, AdapterRef
from factory.model.profiles import get_profile, with_performance, with_revisions
from factory.model.stack import ModelStack
from factory.routing.batch import BatchRunner, ReplicaCall
from factory.routing.health import HealthProbe
from factory.routing.requests import TaskResult
from factory.safety.policy import SafetyChecker, SafetyPolicy

DEPLOYMENT_NAME = "StackReplica"

# Serve pickles a deployment's request router by adding its module to cloudpickle's process-wide pickle-by-value
# registry and removing it afterwards, so two threads defining deployments at once remove each other's entry
# (ValueError: "... is not registered for pickle by value"). Whoever defines or deploys an app in this process
# holds this lock; re-entrant because deploying defines.
SERVE_DEFINITION_LOCK = threading.RLock()

log = structlog.get_logger(__name__)


class ReplicaConfig(BaseModel):
    """What a replica needs to build its stack; travels to the replica as its constructor argument."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    profile: str = Field(default="tiny", description="Model profile every replica loads")
    max_batch_size: int = Field(default=4, ge=1, le=256, description="Requests per library call")
    batch_wait_timeout_s: float = Field(default=0.05, ge=0.0, le=10.0, description="Wait to fill a batch")
    threads: int = Field(default=1, ge=1, description="torch intra-op threads (the replica's CPUs)")
    max_input_pixels: int = Field(default=DEFAULT_MAX_PIXELS, ge=1, description="Decompression-bomb cap for inputs")
    safety: SafetyPolicy = Field(default_factory=SafetyPolicy, description="Checks run before results leave")
    adapters: dict[str, AdapterRef] = Field(
        default_factory=dict, description="Every adapter a request may name, by multiplexed id (tenant/name)"
    )
    max_adapters: int = Field(default=4, ge=1, description="Adapters kept loaded per replica (LRU)")
    max_adapter_bytes: int = Field(default=2 * 1024**3, ge=1, description="Adapter bytes kept loaded (LRU)")
    lora_hotswap_rank: int | None = Field(
        default=None, ge=1, description="Hot-swap adapters into fixed slots of this rank (None: plain loading; "
        "with a compiled profile, the largest rank of `adapters`)"
    )
    performance: dict[str, Any] | None = Field(
        default=None, description="Generator speed options that replace the profile's (a job's `performance:`)"
    )
    health_check_cache_s: float = Field(
        default=30.0, ge=0, description="How long a passed health probe (the models run on a tiny input), or a batch "
        "that ran without a model failure, vouches for the replica before Serve's next check runs the models again"
    )
    revisions: dict[str, str] = Field(
        default_factory=dict, description="The commits the job or fleet pinned the profile's hub checkpoints to, by "
        "component ('generator', 'vlm'): every replica, a restarted one too, loads exactly these"
    )
    clip_score: bool = Field(
        default=False, description="Score every ok generated or edited image against its prompt (CLIPScore) with the "
        "profile's quality.clip model, loaded once beside the stack; off: no CLIP model is loaded"
    )
    clip_revision: str | None = Field(
        default=None, description="The commit the job pinned the CLIP model to (None: the tiny or a local model)"
    )


def build_runner(config: ReplicaConfig, stack: ModelStack) -> BatchRunner:
    """The runner a replica builds around its stack, ready to serve: the config's safety policy, adapters and
    pool bounds; with a compiled profile, the transformer compiled after the pool is set up for hot-swap, and
    every warm-up shape run, so no row pays for compiling."""
    safety = SafetyChecker(config.safety)
    safety.load()  # a policy naming labels its detector lacks fails the deploy, not the rows
    storage = Storage()
    plan = plan_hotswap(config, stack, storage)
    pool = LoraPool(
        stack.generator.pipe, max_adapters=plan.slots, max_bytes=config.max_adapter_bytes, storage=storage,
        hotswap_rank=plan.rank, mirrors=stack.generator.lora_mirrors,
    )
    runner = BatchRunner(stack, safety, pool, config.adapters, config.max_input_pixels)
    warm_up(runner, plan.first, config.max_batch_size)
    return runner


class HotswapPlan(BaseModel):
    rank: int | None  # None: plain loading
    slots: int
    first: AdapterRef | None  # loaded before compiling, so the compiled graph already holds a LoRA slot


def plan_hotswap(config: ReplicaConfig, stack: ModelStack, storage: Storage) -> HotswapPlan:
    """How the pool loads adapters. A compiled transformer keeps its graphs only if adapters are hot-swapped
    into one slot, padded to the largest rank of the job's adapters (read from their headers) and holding the
    adapter that targets the most layers: peft lets a later adapter target the slot's layers or fewer."""
    compiled = stack.generator.performance.compile != "off"
    if not compiled or not config.adapters:
        return HotswapPlan(rank=config.lora_hotswap_rank, slots=config.max_adapters, first=None)
    shapes = {}
    for key, ref in config.adapters.items():
        try:
            shapes[key] = read_shape(ref.uri, storage)
        except FactoryError as error:  # its rows are refused with this reason when they ask for it
            log.warning("adapter header unreadable; it cannot be hot-swapped", adapter=key, error=str(error))
    if not shapes:
        return HotswapPlan(rank=config.lora_hotswap_rank or 1, slots=1, first=None)
    largest = max(shape.max_rank for shape in shapes.values())
    rank = config.lora_hotswap_rank or largest
    if rank < largest:
        too_big = sorted(key for key, shape in shapes.items() if shape.max_rank > rank)
        log.warning("adapters above serve.lora_hotswap_rank will be refused", rank=rank, adapters=too_big[:10])
    fitting = [key for key, shape in shapes.items() if shape.max_rank <= rank]
    first = max(fitting, key=lambda key: shapes[key].pairs) if fitting else None
    return HotswapPlan(rank=rank, slots=1, first=config.adapters[first] if first else None)


def warm_up(runner: BatchRunner, first: AdapterRef | None, max_batch_size: int) -> None:
    """Compile (when the profile says so) and run every warm-up shape, with an adapter active and without, so
    both variants of the graph exist before the first row."""
    generator = runner.stack.generator
    if first is not None:
        try:
            runner.pool.ensure_loaded(first)
        except FactoryError as error:
            log.warning("warm-up adapter refused; the first adapter row will compile", error=str(error))
            first = None
    generator.compile()
    batch_sizes = sorted({1, min(2, max_batch_size), max_batch_size})
    for ref in ([first] if first is not None else []) + [None]:
        with runner.pool.use(ref):
            generator.warm_up(batch_sizes)


class StackReplica:
    def __init__(self, config: ReplicaConfig | dict, fingerprint: str = ""):
        import torch  # not at import time: the job's driver and Ray Data workers import this module too

        self.config = ReplicaConfig.model_validate(config)
        self.fingerprint = fingerprint
        configure_logging(os.environ.get("FACTORY_LOG_LEVEL", "warning"))
        torch.set_num_threads(self.config.threads)
        profile = with_revisions(with_performance(get_profile(self.config.profile), self.config.performance),
                                 self.config.revisions)
        stack = ModelStack.from_profile(profile, clip_score=self.config.clip_score,
                                        clip_revision=self.config.clip_revision)
        self.runner = build_runner(self.config, stack)
        self.health = HealthProbe(self.runner, self.config.health_check_cache_s)
        self.run_batch.set_max_batch_size(self.config.max_batch_size)
        self.run_batch.set_batch_wait_timeout_s(self.config.batch_wait_timeout_s)

        async def load_adapter(adapter_id: str) -> str:
            # Serve's multiplexing keeps the ids this replica holds, so the router sends a request to a
            # replica that already has its adapter; the pool does the loading and its own LRU bounds.
            await asyncio.to_thread(self.runner.load, adapter_id)
            return adapter_id

        self.get_adapter = serve.multiplexed(max_num_models_per_replica=self.config.max_adapters)(load_adapter)

    async def __call__(self, call: ReplicaCall | dict) -> TaskResult:
        return await self.run_batch(ReplicaCall.model_validate(call))

    async def run_many(self, calls: list[ReplicaCall | dict]) -> list[TaskResult]:
        """A batch a caller made itself (a job's chunk, grouped by adapter): one request, one library call.
        Bigger than max_batch_size is refused: the caller sizes batches from the same config."""
        if len(calls) > self.config.max_batch_size:
            raise ValueError(f"{len(calls)} calls in one batch, this replica runs at most {self.config.max_batch_size}")
        return await self._run([ReplicaCall.model_validate(call) for call in calls])

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.05)
    async def run_batch(self, calls: list[ReplicaCall]) -> list[TaskResult]:
        """Single requests, gathered by Serve into batches (split by multiplexed id)."""
        return await self._run(calls)

    async def _run(self, calls: list[ReplicaCall]) -> list[TaskResult]:
        # Every call names the same adapter (or the base model): Serve's multiplexed id of the request.
        adapter_id = serve.get_multiplexed_model_id() or BASE_ADAPTER
        try:
            await self.get_adapter(adapter_id)
        except FactoryError as error:
            return self.runner.refuse(calls, adapter_id, error)
        # The model call blocks for the whole batch; a worker thread keeps the replica's event loop free
        # for health checks and for queueing the next batch.
        results = None
        self.health.batch_started()
        try:
            results = await asyncio.to_thread(self.runner.run, calls, adapter_id)
            return results
        finally:
            self.health.batch_finished(results)

    def deployed_fingerprint(self) -> str:
        return self.fingerprint

    def adapter_stats(self) -> dict:
        return self.runner.pool.stats()

    def compile_stats(self) -> dict:
        """Compile mode, graphs, recompiles since warm-up (0 when hot-swap works), warm-up seconds."""
        return self.runner.stack.generator.compile_stats()

    async def check_health(self) -> None:
        """Serve's periodic check: raises when a model fails or returns NaN on a tiny input (`HealthProbe`). In a
        worker thread: a probe runs the models, and may wait for the pool's lock."""
        await asyncio.to_thread(self.health.check)


def build_replica_app(
    config: ReplicaConfig, *, replicas: int = 1, num_cpus: float = 1.0, num_gpus: float = 0.0,
    max_ongoing_requests: int = 4, fingerprint: str = "", max_queued_requests: int = -1,
):
    """A bound Serve application of StackReplica with the job's sizing. `max_queued_requests` (-1: unbounded)
    makes callers' handles shed load past that many queued requests (the online API answers 503)."""
    with SERVE_DEFINITION_LOCK:
        deployment = serve.deployment(
            StackReplica,
            name=DEPLOYMENT_NAME,
            num_replicas=replicas,
            ray_actor_options={"num_cpus": num_cpus, "num_gpus": num_gpus},
            # Diffusion calls are long; a low bound keeps queues at the caller, where backpressure belongs.
            max_ongoing_requests=max_ongoing_requests,
            max_queued_requests=max_queued_requests,
            # Checked every 10 s; the models run at most once per config.health_check_cache_s, and only when no
            # batch vouches for them. The timeout covers a probe that waits behind a batch that began as it did.
            health_check_period_s=10,
            health_check_timeout_s=60,
            # One access-log line per row drowns the job's own logs; failures are logged by the job.
            logging_config={"enable_access_log": False, "log_level": "WARNING"},
        )
        return deployment.bind(config.model_dump(mode="json"), fingerprint)
