"""Calling the job's Serve replicas from a worker: one request per batch (one library call, one adapter), and
a transient fault -- a replica that died or was replaced, a timeout, a dropped connection, Serve shedding load --
retried with exponential backoff and jitter before the batch's rows are `failed`."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from dataclasses import dataclass

from factory.jobs.spec import RetryConfig
from factory.routing.batch import ReplicaCall, adapter_key
from factory.routing.executor import base_result
from factory.routing.requests import Status, TaskResult


def transient_errors() -> tuple[type[BaseException], ...]:
    """Errors after which the same call can succeed: the replica died or was replaced, Serve shed load, the call
    timed out or a connection dropped."""
    from ray import exceptions as ray_errors
    from ray.serve import exceptions as serve_errors

    found: list[type[BaseException]] = [TimeoutError, ConnectionError, ray_errors.RayActorError,
                                        ray_errors.RaySystemError, ray_errors.ObjectLostError]
    for name in ("ActorUnavailableError", "GetTimeoutError", "NodeDiedError"):
        if hasattr(ray_errors, name):
            found.append(getattr(ray_errors, name))
    for name in ("BackPressureError", "DeploymentUnavailableError", "RequestCancelledError"):
        if hasattr(serve_errors, name):
            found.append(getattr(serve_errors, name))
    return tuple(found)


@dataclass(frozen=True)
class CallPolicy:
    """How a worker calls the replicas; shipped to Ray workers."""

    app_name: str
    row_timeout_s: float
    retry: RetryConfig


class Replicas:
    """The replica deployment of a job's Serve app, as one worker calls it."""

    def __init__(self, policy: CallPolicy):
        from ray import serve

        from factory.routing.replica import DEPLOYMENT_NAME

        self.policy = policy
        self.handle = serve.get_deployment_handle(DEPLOYMENT_NAME, policy.app_name)
        self.transient = transient_errors()

    async def call(self, calls: Sequence[ReplicaCall], log) -> tuple[list[TaskResult], int]:
        """The replicas' results for one batch (every call on one adapter), retrying transient faults with
        backoff; (results in order, attempts made)."""
        handle = self.handle.options(multiplexed_model_id=adapter_key(calls[0].request))
        retry, timeout = self.policy.retry, self.policy.row_timeout_s
        for attempt in range(1, retry.attempts + 1):
            response = handle.run_many.remote(list(calls))
            try:
                return await asyncio.wait_for(response, timeout=timeout), attempt
            except self.transient as error:
                response.cancel()
                reason = (f"timed out after {timeout:g} s" if isinstance(error, TimeoutError)
                          else f"replica: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")
                if attempt == retry.attempts:
                    return failed(calls, f"{reason} (after {attempt} attempts)"), attempt
                delay = min(retry.max_backoff_s, retry.backoff_s * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)
                log.info("replica call failed, retrying", reason=reason, attempt=attempt, rows=len(calls),
                         delay_s=round(delay, 2))
                await asyncio.sleep(delay)
            except Exception as error:  # not transient: the same call would fail again
                log.info("replica call failed", error=repr(error), rows=len(calls))
                return failed(calls, f"replica: {type(error).__name__}: {error}"), attempt
        raise AssertionError("unreachable")  # pragma: no cover


def failed(calls: Sequence[ReplicaCall], reason: str) -> list[TaskResult]:
    return [base_result(call.request, None, status=Status.FAILED, error=reason) for call in calls]
