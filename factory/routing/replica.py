"""The Serve deployment: every replica holds the whole stack and runs one library call per batch.

Requests arrive one at a time from the job's Ray Data workers (or the HTTP ingress); `@serve.batch` gathers
concurrent ones so the stack sees batches. The request's adapter key is the multiplexed model id, so Serve
routes a request to a replica that already holds its adapter and never mixes adapters in one batch.
"""

from __future__ import annotations

import asyncio
import os

import structlog
from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from factory.errors import FactoryError, InputError
from factory.model.lora.ref import AdapterRef
from factory.safety.policy import SafetyPolicy
from factory.routing.requests import Status, TaskRequest, TaskResult

log = structlog.get_logger(__name__)

DEPLOYMENT_NAME = "StackReplica"
BASE_ADAPTER = "base"


class ReplicaConfig(BaseModel):
    """What a replica needs to build its stack; travels to the replica as its constructor argument."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    profile: str = Field(default="tiny", description="Model profile every replica loads")
    max_batch_size: int = Field(default=4, ge=1, le=256, description="Requests per library call")
    batch_wait_timeout_s: float = Field(default=0.05, ge=0.0, le=10.0, description="Wait to fill a batch")
    threads: int = Field(default=1, ge=1, description="torch intra-op threads (the replica's CPUs)")
    max_input_pixels: int = Field(default=40_000_000, ge=1, description="Decompression-bomb cap for inputs")
    safety: SafetyPolicy = Field(default_factory=SafetyPolicy, description="Checks run before results leave")
    adapters: dict[str, AdapterRef] = Field(
        default_factory=dict, description="Every adapter a request may name, by multiplexed id (tenant/name)"
    )
    max_adapters: int = Field(default=4, ge=1, description="Adapters kept loaded per replica (LRU)")
    max_adapter_bytes: int = Field(default=2 * 1024**3, ge=1, description="Adapter bytes kept loaded (LRU)")


class ReplicaCall(BaseModel):
    """One request plus its input image bytes (read by the caller, decoded here)."""

    request: TaskRequest
    image_bytes: bytes | None = Field(default=None, repr=False)


def adapter_key(request: TaskRequest) -> str:
    """The multiplexed model id of a request: its adapter, or the base model."""
    return request.adapter or BASE_ADAPTER


class StackReplica:
    def __init__(self, config: ReplicaConfig | dict, fingerprint: str = ""):
        import torch

        from factory.logs import configure_logging
        from factory.model.stack import ModelStack
        from factory.jobs.storage import Storage
        from factory.model.lora import LoraPool
        from factory.routing.executor import TaskExecutor
        from factory.safety.policy import SafetyChecker

        self.config = ReplicaConfig.model_validate(config)
        self.fingerprint = fingerprint
        configure_logging(os.environ.get("FACTORY_LOG_LEVEL", "warning"))
        torch.set_num_threads(self.config.threads)
        self.stack = ModelStack.from_profile(self.config.profile)
        self.safety = SafetyChecker(self.config.safety)
        self.safety.load()  # a policy naming labels its detector lacks fails the deploy, not the rows
        self.executor = TaskExecutor(self.stack, self.safety)
        self.pool = LoraPool(
            self.stack.generator.pipe, max_adapters=self.config.max_adapters,
            max_bytes=self.config.max_adapter_bytes, storage=Storage(),
        )
        self.run_batch.set_max_batch_size(self.config.max_batch_size)
        self.run_batch.set_batch_wait_timeout_s(self.config.batch_wait_timeout_s)

        async def load_adapter(adapter_id: str) -> str:
            # Serve's multiplexing keeps the ids this replica holds, so the router sends a request to a
            # replica that already has its adapter; the pool does the loading and its own LRU bounds.
            await asyncio.to_thread(self.ensure_adapter, adapter_id)
            return adapter_id

        self.get_adapter = serve.multiplexed(max_num_models_per_replica=self.config.max_adapters)(load_adapter)

    async def __call__(self, call: ReplicaCall | dict) -> TaskResult:
        return await self.run_batch(ReplicaCall.model_validate(call))

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.05)
    async def run_batch(self, calls: list[ReplicaCall]) -> list[TaskResult]:
        # Serve splits batches by multiplexed id: every call here names the same adapter (or the base model).
        adapter_id = serve.get_multiplexed_model_id() or BASE_ADAPTER
        try:
            await self.get_adapter(adapter_id)
        except FactoryError as error:
            return [self._refused(call.request, f"adapter {adapter_id}: {error}") for call in calls]
        # The model call blocks for the whole batch; a worker thread keeps the replica's event loop free
        # for health checks and for queueing the next batch.
        return await asyncio.to_thread(self.run_calls, calls, adapter_id)

    def ensure_adapter(self, adapter_id: str):
        if adapter_id == BASE_ADAPTER:
            return None
        ref = self.config.adapters.get(adapter_id)
        if ref is None:
            raise InputError("not in this deployment's tenants registry")
        return self.pool.ensure_loaded(ref)

    def deployed_fingerprint(self) -> str:
        return self.fingerprint

    def adapter_stats(self) -> dict:
        return self.pool.stats()

    def _refused(self, request: TaskRequest, error: str) -> TaskResult:
        from factory.routing.executor import base_result

        return base_result(request, self.stack, status=Status.REJECTED, error=error)

    def run_calls(self, calls: list[ReplicaCall], adapter_id: str = BASE_ADAPTER) -> list[TaskResult]:
        from factory.jobs.fetch import decode_image
        from factory.routing.executor import base_result

        results: list[TaskResult | None] = [None] * len(calls)
        runnable, images = [], []
        for index, call in enumerate(calls):
            image = None
            if call.request.image is not None:
                try:
                    if call.image_bytes is None:
                        raise InputError(f"no bytes were read for {call.request.image}")
                    image = decode_image(call.image_bytes, call.request.image, self.config.max_input_pixels)
                except InputError as error:
                    results[index] = base_result(
                        call.request, self.stack, status=Status.REJECTED, error=f"image: {error}"
                    )
                    continue
            runnable.append(index)
            images.append(image)
        ref = None if adapter_id == BASE_ADAPTER else self.config.adapters[adapter_id]
        try:
            # Exactly one adapter is active for the whole library call, none for base rows.
            with self.pool.use(ref) as loaded:
                produced = self.executor.run([calls[i].request for i in runnable], images)
        except FactoryError as error:  # the adapter was evicted and could not be loaded again
            produced = [self._refused(calls[i].request, f"adapter {adapter_id}: {error}") for i in runnable]
            loaded = None
        for index, result in zip(runnable, produced, strict=True):
            if loaded is not None:
                result.adapter, result.adapter_sha256 = loaded.key, loaded.sha256
            results[index] = result
        return results  # type: ignore[return-value]

    def check_health(self) -> None:
        if self.stack is None:
            raise RuntimeError("stack not loaded")


def build_replica_app(
    config: ReplicaConfig, *, replicas: int = 1, num_cpus: float = 1.0, num_gpus: float = 0.0,
    max_ongoing_requests: int = 4, fingerprint: str = "",
):
    """A bound Serve application of StackReplica with the job's sizing."""
    deployment = serve.deployment(
        StackReplica,
        name=DEPLOYMENT_NAME,
        num_replicas=replicas,
        ray_actor_options={"num_cpus": num_cpus, "num_gpus": num_gpus},
        # Diffusion calls are long; a low bound keeps queues at the caller, where backpressure belongs.
        max_ongoing_requests=max_ongoing_requests,
        health_check_period_s=10,
        # One access-log line per row drowns the job's own logs; failures are logged by the job.
        logging_config={"enable_access_log": False, "log_level": "WARNING"},
        health_check_timeout_s=60,
    )
    return deployment.bind(config.model_dump(mode="json"), fingerprint)
