"""One batch of calls through the stack with one adapter active: what a Serve replica runs per batch, and what
the CLI runs for its single row, so a row gets the same decoding, adapter, safety checks and result fields on
both paths.

No Ray here: the replica wraps a `BatchRunner` in Serve; the CLI calls it in its own process.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

from PIL import Image
from pydantic import BaseModel, Field

from factory.errors import FactoryError, InputError
from factory.io.images import DEFAULT_MAX_PIXELS, decode_image
from factory.model.lora import LoadedAdapter, LoraPool
from factory.model.lora.ref import BASE_ADAPTER, AdapterRef
from factory.model.stack import ModelStack
from factory.routing.capabilities import check_capabilities
from factory.routing.executor import TaskExecutor, base_result
from factory.routing.parser import RequestError
from factory.routing.requests import Status, Task, TaskRequest, TaskResult
from factory.safety.policy import SafetyChecker


class ReplicaCall(BaseModel):
    """One request plus its input image bytes (an edit's: every reference's): read by the caller, which may reach
    storage the runner cannot, and decoded by the runner, under its pixel cap."""

    request: TaskRequest
    image_bytes: bytes | None = Field(default=None, repr=False)
    reference_bytes: list[bytes] | None = Field(
        default=None, repr=False, description="An edit's references as read, one per `request.images`, in order"
    )
    # Or the image already decoded and fitted to the model's budget by the caller (archive jobs decode in their
    # Ray Data workers, so the replica only runs the model): 8-bit RGB pixels, row-major, and their size.
    image_rgb: bytes | None = Field(default=None, repr=False)
    image_size: tuple[int, int] | None = None


def reference_digests(reference_bytes: list[bytes]) -> list[str]:
    """The sha256 of each reference's bytes as read: what results record, and what reuse across runs keys on (the
    caller hashes with this too, so a key it looks up is the key a result was remembered under)."""
    return [hashlib.sha256(data).hexdigest() for data in reference_bytes]


def adapter_key(request: TaskRequest) -> str:
    """The adapter id a request runs with (Serve's multiplexed model id): its adapter, or the base model."""
    return request.adapter or BASE_ADAPTER


class BatchRunner:
    """Runs batches of calls that share one adapter; thread-safe, as the pool serialises adapter use."""

    def __init__(
        self, stack: ModelStack, safety: SafetyChecker | None, pool: LoraPool, adapters: Mapping[str, AdapterRef],
        max_input_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        self.stack = stack
        self.executor = TaskExecutor(stack, safety)
        self.pool = pool
        self.adapters = dict(adapters)
        self.max_input_pixels = max_input_pixels

    def load(self, adapter_id: str) -> LoadedAdapter | None:
        """Load an adapter ahead of its batches (a replica's multiplexed loader); raises a `FactoryError`."""
        ref = self._ref(adapter_id)
        return None if ref is None else self.pool.ensure_loaded(ref)

    def run(self, calls: list[ReplicaCall], adapter_id: str = BASE_ADAPTER) -> list[TaskResult]:
        """One result per call, in order. A bad input image, or a task this profile cannot run, rejects its row
        only; an adapter that cannot be loaded rejects the batch."""
        results: list[TaskResult | None] = [None] * len(calls)
        runnable, images = [], []
        for index, call in enumerate(calls):
            try:
                check_capabilities(call.request, self.stack.profile)
                images.append(self._references(call) if call.request.task is Task.EDIT else self._image(call))
                runnable.append(index)
            except RequestError as error:
                results[index] = self._rejected(call.request, str(error))
            except InputError as error:
                results[index] = self._rejected(call.request, f"image: {error}")
        try:
            ref = self._ref(adapter_id)
            # Exactly one adapter is active for the whole library call, none for base rows.
            with self.pool.use(ref) as loaded:
                produced = self.executor.run([calls[i].request for i in runnable], images)
        except FactoryError as error:  # not in the registry, or evicted and not loadable again
            produced = self.refuse([calls[i] for i in runnable], adapter_id, error)
            loaded = None
        for index, result in zip(runnable, produced, strict=True):
            if loaded is not None:
                result.adapter, result.adapter_sha256 = loaded.key, loaded.sha256
            results[index] = result
        for call, result in zip(calls, results, strict=True):
            if call.reference_bytes is not None and result is not None:
                result.reference_sha256 = reference_digests(call.reference_bytes)
        return results  # type: ignore[return-value]

    def refuse(self, calls: list[ReplicaCall], adapter_id: str, error: Exception) -> list[TaskResult]:
        """The results of calls that cannot run because their adapter cannot be used."""
        return [self._rejected(call.request, f"adapter {adapter_id}: {error}") for call in calls]

    def _ref(self, adapter_id: str) -> AdapterRef | None:
        if adapter_id == BASE_ADAPTER:
            return None
        ref = self.adapters.get(adapter_id)
        if ref is None:
            raise InputError("not in this deployment's tenants registry")
        return ref

    def _image(self, call: ReplicaCall) -> Image.Image | None:
        if call.request.image is None:
            return None
        if call.image_rgb is not None and call.image_size is not None:
            width, height = call.image_size
            if width * height * 3 != len(call.image_rgb) or width * height > self.max_input_pixels:
                raise InputError(f"{call.request.image}: decoded pixels do not match {width}x{height}")
            return Image.frombytes("RGB", (width, height), call.image_rgb)
        if call.image_bytes is None:
            raise InputError(f"no bytes were read for {call.request.image}")
        return decode_image(call.image_bytes, call.request.image, self.max_input_pixels)

    def _references(self, call: ReplicaCall) -> tuple[Image.Image, ...]:
        """An edit's references, decoded as caption images are, under the same pixel cap; a bad one names its
        field (`image` for a single reference, `images[i]` among several)."""
        named = call.request.named_inputs if call.request.images else ()
        data = call.reference_bytes or []
        if not named:  # a request not made by the parser, or staged by a layer that dropped its references
            raise RequestError("image", "an edit needs at least one reference image")
        if len(data) > len(named):
            raise RequestError("images", f"{len(data)} references were read for {len(named)} URIs")
        decoded = []
        for position, (field, uri) in enumerate(named):
            if position >= len(data):
                raise RequestError(field, f"no bytes were read for {uri}")
            try:
                decoded.append(decode_image(data[position], uri, self.max_input_pixels))
            except InputError as error:
                raise RequestError(field, str(error)) from None
        return tuple(decoded)

    def _rejected(self, request: TaskRequest, error: str) -> TaskResult:
        return base_result(request, self.stack, status=Status.REJECTED, error=error)
