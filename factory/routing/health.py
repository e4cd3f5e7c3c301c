"""A replica's health: its models turn a tiny input into numbers, not an error and not NaN.

Serve calls a replica's `check_health` every `health_check_period_s` and replaces the replica after three
failures in a row. `HealthProbe.check` runs the generator (one step at its smallest shape), the VLM (one forward
pass for the first token of a caption), the CLIP model when the replica scores, and the safety detector on a small
image, and raises if a call fails or returns NaN or infinity. The models are not run more often than they need to be:
- a probe that passed, or a batch that produced rows with no model failure, holds for `cache_s` seconds;
- while a batch is running, unless the last one failed, its outcome is awaited instead (a probe would queue
  behind it for as long as the batch takes); a batch with a failed model call clears the evidence, so the next
  check probes.
The probe holds the LoRA pool's lock, the lock every batch holds around its model calls, with the base model
active: a probe and a batch never run the same torch modules at once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import numpy as np
import structlog
from PIL import Image

from factory.errors import ModelError
from factory.model.generator import GenerationParams
from factory.routing.batch import BatchRunner
from factory.routing.requests import Status, TaskResult

log = structlog.get_logger(__name__)

SMALLEST_SIDE = 16  # FLUX's smallest image: one packed 2x2 patch of the 8x-downsampled latent
PROBE_IMAGE_SIDE = 32


class HealthProbe:
    def __init__(self, runner: BatchRunner, cache_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.runner = runner
        self.cache_s = cache_s
        self.clock = clock
        self.probes = 0  # how many times the models were run for a check
        self._healthy_at: float | None = None
        self._failed = False  # the last batch had a failed model call
        self._running = 0
        self._state = threading.Lock()
        self._probing = threading.Lock()

    def batch_started(self) -> None:
        with self._state:
            self._running += 1

    def batch_finished(self, results: list[TaskResult] | None) -> None:
        """After a batch: `results` None when it raised. Rows that ran a model, none failing, prove health."""
        with self._state:
            self._running -= 1
            statuses = {result.status for result in results or ()}
            self._failed = results is None or Status.FAILED in statuses
            if self._failed:
                self._healthy_at = None
            elif Status.OK in statuses:
                self._healthy_at = self.clock()

    def check(self) -> None:
        """Return if the models are healthy, raise `ModelError` saying which one is not. Blocking: call it in a
        worker thread."""
        if self._vouched_for():
            return
        with self._probing:
            if self._vouched_for():  # another check probed while this one waited
                return
            with self.runner.pool.use(None):
                self.probes += 1
                try:
                    probe_models(self.runner)
                except ModelError as error:
                    log.warning("replica health check failed", error=str(error))
                    raise
            with self._state:
                self._healthy_at, self._failed = self.clock(), False

    def _vouched_for(self) -> bool:
        with self._state:
            recent = self._healthy_at is not None and self.clock() - self._healthy_at < self.cache_s
            return recent or (self._running > 0 and not self._failed)


def probe_models(runner: BatchRunner) -> None:
    """One tiny call of each model of the runner's stack, and of its safety detector; raises `ModelError`."""
    stack, safety = runner.stack, runner.executor.safety
    generator = stack.generator
    side_w, side_h = probe_shape(generator)
    params = GenerationParams("health check", 0, 1, side_w, side_h, generator.profile.guidance)
    pixels = _called("generator", lambda: generator.call_pipeline([params], params.call_shape, output_type="np").images)
    _finite("generator", pixels)
    image = Image.linear_gradient("L").resize((PROBE_IMAGE_SIDE, PROBE_IMAGE_SIDE)).convert("RGB")
    logits = _called("vlm", lambda: stack.vlm.next_token_logits([image], [stack.vlm.profile.caption_prompt]))
    _finite("vlm", logits.float().cpu().numpy())
    if stack.clip is not None:
        _finite("clip", np.asarray(_called("clip", lambda: stack.clip.score([image], ["health check"]))))
    if safety is not None:
        _called("safety detector", lambda: safety.check_images([image]))


def probe_shape(generator) -> tuple[int, int]:
    """The smallest size the generator runs without compiling anything new: 16x16, or with a compiled transformer
    its smallest warm-up shape (another shape would recompile its graphs)."""
    warmup = generator.performance.warmup
    if generator.compiled and warmup:
        smallest = min(warmup, key=lambda shape: shape.width * shape.height)
        return smallest.width, smallest.height
    return SMALLEST_SIDE, SMALLEST_SIDE


def _called(model: str, call: Callable):
    try:
        return call()
    except Exception as error:  # whatever the library raised, the replica is not healthy
        text = str(error).strip().splitlines()
        raise ModelError(f"health check: {model} failed: {type(error).__name__}: {text[0] if text else ''}"
                         .rstrip(": ")) from error


def _finite(model: str, values: np.ndarray) -> None:
    bad = int(np.size(values) - np.count_nonzero(np.isfinite(values)))
    if bad:
        raise ModelError(f"health check: {model} returned {bad} NaN or infinite values of {np.size(values)}")
