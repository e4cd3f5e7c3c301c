"""One row in this process, for the CLI: the job's parser, tenants registry and batch runner, minus Ray."""

from __future__ import annotations

from factory.io.images import fetch_bytes
from factory.io.storage import Storage
from factory.model.lora import LoraPool
from factory.model.profiles import Profile, get_profile
from factory.model.stack import ModelStack
from factory.routing.batch import BatchRunner, ReplicaCall, adapter_key
from factory.routing.capabilities import check_capabilities
from factory.routing.parser import GenerationDefaults, parse_request, with_adapter
from factory.routing.requests import TaskResult
from factory.routing.tenants import TenantRegistry
from factory.safety.policy import SafetyChecker, SafetyPolicy


def profile_defaults(profile: Profile) -> GenerationDefaults:
    g = profile.generator
    return GenerationDefaults(steps=g.steps, width=g.width, height=g.height, guidance=g.guidance,
                              edit_guidance=g.edit.guidance if g.edit is not None else None)


def run_local(row: dict, profile_name: str, tenants=None) -> TaskResult:
    """Parse, resolve the adapter, read the input, then run it as a replica would run a batch of one."""
    profile = get_profile(profile_name)
    registry = TenantRegistry.from_file(tenants) if tenants else None
    request = with_adapter(parse_request(row, profile_defaults(profile)), registry)
    check_capabilities(request, profile)
    storage = Storage()
    # Read before the models load, so an unreadable input fails fast; the runner decodes it.
    image_bytes = fetch_bytes(request.image, storage) if request.image is not None else None
    reference_bytes = [fetch_bytes(uri, storage) for uri in request.images] if request.images else None
    stack = ModelStack.from_profile(profile)
    adapters = {ref.key: ref for ref in registry.adapters()} if registry is not None else {}
    pool = LoraPool(stack.generator.pipe, max_adapters=1, storage=storage, mirrors=stack.generator.lora_mirrors)
    runner = BatchRunner(stack, SafetyChecker(SafetyPolicy()), pool, adapters)
    call = ReplicaCall(request=request, image_bytes=image_bytes, reference_bytes=reference_bytes)
    return runner.run([call], adapter_key(request))[0]
