"""A replica on a compiled profile, built the way Serve builds it (without Ray): hot-swap is planned from the
adapters' headers, the transformer is compiled with a LoRA slot in it, warm-up compiles every variant before
the first row, and switching adapters afterwards never recompiles and gives each adapter's own images.

torch.compile's inductor backend runs on this CPU; each compile of the tiny blocks takes tens of seconds here,
so the module builds one compiled replica and asks everything of it."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from factory.model.generator import FluxGenerator, GenerationParams
from factory.model.lora import AdapterRef, create_lora
from factory.model.lora.ref import BASE_ADAPTER
from factory.model.profiles import get_profile, with_performance
from factory.model.stack import ModelStack
from factory.routing.batch import ReplicaCall
from factory.routing.parser import GenerationDefaults, parse_request
from factory.routing.replica import ReplicaConfig, build_runner
from factory.routing.requests import Status

pytestmark = pytest.mark.slow

SHAPE = {"width": 64, "height": 64, "steps": 2}
DEFAULTS = GenerationDefaults(steps=2, width=64, height=64, guidance=3.5)


@pytest.fixture(scope="module")
def adapters(tiny_path, tmp_path_factory) -> dict[str, AdapterRef]:
    folder = tmp_path_factory.mktemp("compiled-adapters")
    transformer = FluxGenerator.from_pretrained(tiny_path / "flux", get_profile("tiny").generator).pipe.transformer
    specs = {"a": dict(rank=8, alpha=16, seed=1), "b": dict(rank=4, alpha=4, seed=2),
             "c": dict(rank=8, alpha=8, seed=3), "qk": dict(rank=4, alpha=8, seed=4, target_modules=["to_q", "to_k"]),
             "mlp": dict(rank=4, alpha=4, seed=5, target_modules=["proj_mlp"])}
    return {name: AdapterRef(key=f"acme/{name}", uri=str(create_lora(folder / f"{name}.safetensors",
                                                                      transformer=transformer, **spec)))
            for name, spec in specs.items()}


@pytest.fixture(scope="module")
def compiled(adapters):
    profile = with_performance(get_profile("tiny"), {"compile": "regional", "warmup": [SHAPE]})
    stack = ModelStack.from_profile(profile)
    runner = build_runner(ReplicaConfig(adapters={ref.key: ref for ref in adapters.values()}, max_batch_size=1), stack)
    return runner


def png_pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)


def run(runner, adapter: str | None) -> np.ndarray:
    request = parse_request({"tenant": "acme", "id": "r", "prompt": "a red bicycle", "seed": 3}, DEFAULTS)
    request = request.model_copy(update={"adapter": adapter})
    (result,) = runner.run([ReplicaCall(request=request)], adapter or BASE_ADAPTER)
    assert result.status is Status.OK, result.error
    assert result.performance == "compile=regional"  # the row says how it was made
    return png_pixels(result.image_png)


def eager_reference(tiny_path, ref: AdapterRef | None) -> np.ndarray:
    """The same row on a fresh eager pipeline with only this adapter, loaded by diffusers from its file."""
    generator = FluxGenerator.from_pretrained(tiny_path / "flux", get_profile("tiny").generator)
    if ref is not None:
        generator.pipe.load_lora_weights(ref.uri, adapter_name="only")
    (image,) = generator.generate([GenerationParams("a red bicycle", 3, 2, 64, 64, 3.5)])
    return np.asarray(image.convert("RGB")).astype(int)


def test_warm_up_compiles_before_the_first_row_and_plans_hotswap_from_headers(compiled):
    stats = compiled.stack.generator.compile_stats()
    assert stats["compile"] == "regional" and stats["graphs"] > 0 and stats["recompiles_after_warmup"] == 0
    assert stats["warmup_seconds"] > 0
    pool = compiled.pool.stats()
    # The largest rank among the job's adapters, one slot, holding an adapter with the most layers.
    assert compiled.pool.hotswap_rank == 8 and pool["hotswap"] and pool["max_adapters"] == 1
    assert pool["loaded"] == 1


def test_switching_adapters_never_recompiles_and_keeps_each_adapters_images(compiled, adapters, tiny_path):
    order = ["a", "b", "c", "qk", None, "a", "b"]
    images = [run(compiled, adapters[name].key if name else None) for name in order]
    stats = compiled.stack.generator.compile_stats()
    assert stats["recompiles_after_warmup"] == 0, stats
    assert compiled.pool.stats()["switches"] >= len(order) - 1
    assert np.array_equal(images[0], images[5]) and np.array_equal(images[1], images[6])  # swap out and back
    for name, image in zip(order[:5], images[:5], strict=True):
        reference = eager_reference(tiny_path, adapters[name] if name else None)
        # Compiled kernels fuse and reorder float sums: a level of 255 or two, never an image apart.
        assert np.abs(image - reference).max() <= 2, name
    assert len({image.tobytes() for image in images[:5]}) == 5


def test_an_adapter_the_slot_cannot_hold_is_refused_with_the_reason(compiled, adapters):
    request = parse_request({"tenant": "acme", "id": "m", "prompt": "x", "seed": 1}, DEFAULTS)
    (refused,) = compiled.run(
        [ReplicaCall(request=request.model_copy(update={"adapter": adapters["mlp"].key}))], adapters["mlp"].key
    )
    assert refused.status is Status.REJECTED
    assert "targets layers no hot-swap slot has" in refused.error
    assert compiled.stack.generator.compile_stats()["recompiles_after_warmup"] == 0
