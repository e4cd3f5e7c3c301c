"""A compiled `tiny-flux2` replica, built the way Serve builds it (without Ray): its FLUX.2 blocks are compiled
regionally with a hot-swap LoRA slot in them, warm-up compiles a text-to-image and an edit shape, and afterwards
switching adapters on text-to-image and edit rows never recompiles and gives each adapter's own images.

Compiling on this CPU takes tens of seconds per shape: one replica answers every test of the module."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from factory.model.generator import FluxGenerator, GenerationParams
from factory.model.lora import AdapterRef, create_lora_for_profile
from factory.model.lora.ref import BASE_ADAPTER
from factory.model.profiles import get_profile, with_performance
from factory.model.stack import ModelStack, resolve_sources
from factory.routing.batch import ReplicaCall
from factory.routing.local import profile_defaults
from factory.routing.parser import parse_request
from factory.routing.replica import ReplicaConfig, build_runner
from factory.routing.requests import Status

pytestmark = pytest.mark.slow

SHAPES = [{"width": 64, "height": 64, "steps": 2}, {"width": 64, "height": 64, "steps": 2, "references": 1}]


@pytest.fixture(scope="module")
def adapters(tiny_path, tmp_path_factory) -> dict[str, AdapterRef]:
    folder = tmp_path_factory.mktemp("compiled-flux2-adapters")
    specs = {"a": dict(rank=8, alpha=16, seed=1), "b": dict(rank=4, alpha=4, seed=2)}
    return {name: AdapterRef(key=f"acme/{name}", uri=str(create_lora_for_profile(
        folder / f"{name}.safetensors", "tiny-flux2", **spec))) for name, spec in specs.items()}


@pytest.fixture(scope="module")
def compiled(adapters):
    profile = with_performance(get_profile("tiny-flux2"), {"compile": "regional", "warmup": SHAPES})
    stack = ModelStack.from_profile(profile)
    return build_runner(ReplicaConfig(adapters={ref.key: ref for ref in adapters.values()}, max_batch_size=1), stack)


@pytest.fixture(scope="module")
def reference(sample_images) -> bytes:
    # Square, like the warm-up's edit shape: its tokens make the sequence length that was compiled.
    buffer = io.BytesIO()
    Image.open(sample_images["astronaut"]).convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def run(runner, adapter: str | None, reference: bytes | None = None) -> np.ndarray:
    row = {"tenant": "acme", "id": "r", "prompt": "a red bicycle", "seed": 3, "steps": 2, "width": 64, "height": 64}
    if reference is not None:
        row |= {"task": "edit", "image": "astronaut.png"}
    request = parse_request(row, profile_defaults(runner.stack.profile)).model_copy(update={"adapter": adapter})
    (result,) = runner.run([ReplicaCall(request=request, reference_bytes=[reference] if reference else None)],
                           adapter or BASE_ADAPTER)
    assert result.status is Status.OK, result.error
    assert result.performance == "compile=regional"
    return np.asarray(Image.open(io.BytesIO(result.image_png)).convert("RGB")).astype(int)


def test_switching_adapters_on_generate_and_edit_rows_never_recompiles(compiled, adapters, reference):
    stats = compiled.stack.generator.compile_stats()
    assert stats["graphs"] > 0 and stats["recompiles_after_warmup"] == 0
    assert compiled.pool.hotswap_rank == 8 and compiled.pool.stats()["hotswap"]
    order = ["a", "b", None, "a"]
    generated = [run(compiled, adapters[name].key if name else None) for name in order]
    edited = [run(compiled, adapters[name].key if name else None, reference) for name in order]
    assert compiled.stack.generator.compile_stats()["recompiles_after_warmup"] == 0
    for images in (generated, edited):
        assert len({image.tobytes() for image in images[:3]}) == 3  # each adapter its own image
        assert np.array_equal(images[0], images[3])  # swapped out and back in


def test_a_hot_swapped_adapter_matches_an_eager_load(compiled, adapters, tiny_path):
    source, _, _ = resolve_sources(get_profile("tiny-flux2"))
    eager = FluxGenerator.from_pretrained(source, get_profile("tiny-flux2").generator)
    eager.pipe.load_lora_weights(adapters["b"].uri, adapter_name="only")
    (expected,) = eager.generate([GenerationParams("a red bicycle", 3, 2, 64, 64, 1.0)])
    # Compiled kernels reorder float sums: a level of 255 or two, never an image apart.
    assert np.abs(run(compiled, adapters["b"].key) - np.asarray(expected).astype(int)).max() <= 2
