"""The replica's health check runs the real tiny models, built the way a replica builds its runner, without Ray.
Broken models are real torch hooks on the loaded modules: a transformer whose output is NaN, a VLM that raises."""

from __future__ import annotations

import threading
from contextlib import contextmanager

import pytest
import torch

from factory.errors import ModelError
from factory.routing.health import HealthProbe
from factory.routing.replica import ReplicaConfig, build_runner
from factory.routing.requests import Status, Task, TaskResult


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def runner(stack):
    return build_runner(ReplicaConfig(), stack)


@pytest.fixture
def probe(runner):
    return HealthProbe(runner, cache_s=30.0, clock=Clock())


@contextmanager
def nan_transformer(runner):
    """The FLUX transformer's every output replaced by NaN (the pipeline calls it with return_dict=False)."""
    def poison(module, args, output):
        return (torch.full_like(output[0], float("nan")), *output[1:])

    hook = runner.stack.generator.pipe.transformer.register_forward_hook(poison)
    try:
        yield
    finally:
        hook.remove()


def result(status: Status) -> TaskResult:
    return TaskResult(id="r", tenant="acme", task=Task.GENERATE, status=status)


def test_healthy_models_pass_and_a_pass_is_cached(probe):
    probe.check()
    assert probe.probes == 1
    probe.clock.now += 29
    probe.check()
    assert probe.probes == 1  # within health_check_cache_s: the models are not run again
    probe.clock.now += 2
    probe.check()
    assert probe.probes == 2


def test_a_transformer_returning_nan_fails_until_it_is_mended(probe, runner):
    with nan_transformer(runner):
        with pytest.raises(ModelError, match=r"^health check: generator returned \d+ NaN or infinite values"):
            probe.check()
        with pytest.raises(ModelError):  # a failure is never cached: every check runs the models again
            probe.check()
    probe.check()
    assert probe.probes == 3


def test_a_vlm_that_raises_fails_the_check(probe, runner):
    def crash(module, args, kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    hook = runner.stack.vlm.model.register_forward_pre_hook(crash, with_kwargs=True)
    try:
        with pytest.raises(ModelError, match="^health check: vlm failed: RuntimeError: CUDA error: an illegal"):
            probe.check()
    finally:
        hook.remove()


def test_batches_vouch_for_the_models_until_one_fails(probe, runner):
    with nan_transformer(runner):
        probe.batch_started()
        probe.check()  # a batch is running and none failed: awaited, not probed
        probe.batch_finished([result(Status.OK), result(Status.REJECTED)])
        probe.clock.now += 29
        probe.check()  # a batch made rows within the window
        assert probe.probes == 0
        probe.batch_started()
        probe.batch_finished([result(Status.OK), result(Status.FAILED)])
        probe.batch_started()
        with pytest.raises(ModelError, match="generator returned"):
            probe.check()  # the last batch failed: the models are run, even with a batch in flight
        probe.batch_finished(None)
    assert probe.probes == 1


def test_a_probe_waits_for_the_batch_that_holds_the_models(probe, runner):
    checked = threading.Event()
    with runner.pool.use(None):  # what a running batch holds around its model calls
        worker = threading.Thread(target=lambda: (probe.check(), checked.set()))
        worker.start()
        assert not checked.wait(0.5)
    worker.join(timeout=60)
    assert checked.is_set() and probe.probes == 1
