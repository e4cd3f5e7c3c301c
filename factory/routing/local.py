"""Helpers for running requests in this process (CLI) with the same rules as the job."""

from __future__ import annotations

from PIL import Image

from factory.model.profiles import Profile
from factory.routing.parser import GenerationDefaults
from factory.routing.requests import TaskRequest


def profile_defaults(profile: Profile) -> GenerationDefaults:
    g = profile.generator
    return GenerationDefaults(steps=g.steps, width=g.width, height=g.height, guidance=g.guidance)


def load_request_image(request: TaskRequest, allow_http: bool = False) -> Image.Image | None:
    if request.image is None:
        return None
    from factory.jobs.fetch import load_image
    from factory.jobs.storage import Storage

    return load_image(request.image, Storage(), allow_http=allow_http)


def run_local(row: dict, profile_name: str, tenants=None):
    """One row in this process: parse, resolve its adapter, check safety, run: the replica's path, minus Ray."""
    from factory.jobs.storage import Storage
    from factory.model.lora import LoraPool
    from factory.model.profiles import get_profile
    from factory.model.stack import ModelStack
    from factory.routing.executor import TaskExecutor
    from factory.routing.parser import parse_request, with_adapter
    from factory.routing.tenants import TenantRegistry
    from factory.safety.policy import SafetyChecker, SafetyPolicy

    profile = get_profile(profile_name)
    registry = TenantRegistry.from_file(tenants) if tenants else None
    request = with_adapter(parse_request(row, profile_defaults(profile)), registry)
    image = load_request_image(request)
    stack = ModelStack.from_profile(profile)
    executor = TaskExecutor(stack, SafetyChecker(SafetyPolicy()))
    ref = registry.lookup(request.adapter) if registry is not None and request.adapter else None
    pool = LoraPool(stack.generator.pipe, max_adapters=1, storage=Storage())
    with pool.use(ref) as loaded:
        result = executor.run([request], [image])[0]
    if loaded is not None:
        result.adapter_sha256 = loaded.sha256
    return result
