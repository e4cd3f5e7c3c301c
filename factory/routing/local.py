"""One row in this process, for the CLI: the job's parser, tenants registry and batch runner, minus Ray."""

from __future__ import annotations

from factory.io.images import fetch_bytes
from factory.io.storage import Storage
from factory.model.lora import LoraPool
from factory.model.profiles import Profile, get_profile
from factory.model.stack import ModelStack
from factory.routing.batch import BatchRunner, ReplicaCall, adapter_key
from factory.routing.parser import GenerationDefaults, parse_request, with_adapter
from factory.routing.requests import TaskResult
from factory.routing.tenants import TenantRegistry
from factory.safety.policy import SafetyChecker, SafetyPolicy


def profile_defaults(profile: Profile) -> GenerationDefaults:
    g = profile.generator
    return GenerationDefaults(steps=g.steps, width=g.width, height=g.height, guidance=g.guidance)


def run_local(row: dict, profile_name: str, tenants=None) -> TaskResult:
    """Parse, resolve the adapter, read the input, then run it as a replica would run a batch of one."""
    profile = get_profile(profile_name)
    registry = TenantRegistry.from_file(tenants) if tenants else None
    request = with_adapter(parse_request(row, profile_defaults(profile)), registry)
    storage = Storage()
    # Read before the models load, so an unreadable input fails fast; the runner decodes it.
    image_bytes = fetch_bytes(request.image, storage) if request.image is not None else None
    stack = ModelStack.from_profile(profile)
    adapters = {ref.key: ref for ref in registry.adapters()} if registry is not None else {}
    runner = BatchRunner(
        stack, SafetyChecker(SafetyPolicy()), LoraPool(stack.generator.pipe, max_adapters=1, storage=storage), adapters
    )
    return runner.run([ReplicaCall(request=request, image_bytes=image_bytes)], adapter_key(request))[0]
