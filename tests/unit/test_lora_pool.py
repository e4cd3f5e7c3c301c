"""The pool on the real tiny FLUX: one adapter per batch, exactly the images a fresh pipeline with only that
adapter gives, LRU eviction by count and bytes, exact base output, and hot-swap."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from factory.model.generator import FluxGenerator, GenerationParams
from factory.model.lora import AdapterError, AdapterRef, LoraPool, create_lora
from factory.model.lora.safe_load import loaded_adapter_names
from factory.model.profiles import get_profile

PROMPTS = ["a red bicycle", "winter sale"]
TARGETS_QK = ["to_q", "to_k"]


def load_generator(tiny_path: Path) -> FluxGenerator:
    return FluxGenerator.from_pretrained(tiny_path / "flux", get_profile("tiny").generator)


def pixels(generator: FluxGenerator) -> np.ndarray:
    """Two rows, one call: every comparison below uses the same batch size, so equal means bit-equal."""
    params = [GenerationParams(prompt=p, seed=11 + i, steps=2, width=64, height=64, guidance=3.5)
              for i, p in enumerate(PROMPTS)]
    return np.stack([np.asarray(image) for image in generator.generate(params)]).astype(int)


@pytest.fixture(scope="module")
def generator(tiny_path) -> FluxGenerator:
    return load_generator(tiny_path)


@pytest.fixture(scope="module")
def adapters(generator, tmp_path_factory) -> dict[str, AdapterRef]:
    folder = tmp_path_factory.mktemp("pool-adapters")
    transformer = generator.pipe.transformer
    specs = {"a": dict(rank=8, alpha=16, seed=1), "b": dict(rank=4, alpha=4, seed=2),
             "c": dict(rank=8, alpha=8, seed=3), "qk": dict(rank=4, alpha=8, seed=4, target_modules=TARGETS_QK)}
    return {name: AdapterRef(key=f"acme/{name}", uri=str(create_lora(folder / f"{name}.safetensors",
                                                                      transformer=transformer, **spec)))
            for name, spec in specs.items()}


@pytest.fixture(scope="module")
def base_pixels(generator) -> np.ndarray:
    return pixels(generator)


@pytest.fixture(scope="module")
def reference(tiny_path, adapters) -> dict[str, np.ndarray]:
    """Each adapter alone on a fresh pipeline, loaded by diffusers itself from the file path."""
    images = {}
    for name, ref in adapters.items():
        fresh = load_generator(tiny_path)
        path = Path(ref.uri)
        fresh.pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name="only", use_safetensors=True)
        images[name] = pixels(fresh)
    return images


@pytest.fixture
def pool(generator):
    pools: list[LoraPool] = []

    def make(**kwargs) -> LoraPool:
        pools.append(LoraPool(generator.pipe, **kwargs))
        return pools[-1]

    yield make
    for made in pools:
        made.clear()
    generator.pipe.enable_lora()


def test_adapters_are_isolated_and_match_a_fresh_pipeline(generator, adapters, reference, base_pixels, pool):
    assert not np.array_equal(reference["a"], reference["b"])
    assert not np.array_equal(reference["a"], base_pixels) and not np.array_equal(reference["b"], base_pixels)
    lora = pool(max_adapters=4)
    for name in ["a", "b", None, "a", None, "b"]:
        with lora.use(adapters[name] if name else None) as loaded:
            got = pixels(generator)
        assert np.array_equal(got, reference[name] if name else base_pixels), name
        assert (loaded.key if loaded else None) == (adapters[name].key if name else None)
    stats = lora.stats()
    assert (stats["misses"], stats["hits"], stats["evictions"], stats["loaded"]) == (2, 2, 0, 2)
    assert stats["switches"] == 6 and stats["load_ms_total"] > 0 and stats["switch_ms_last"] > 0
    assert stats["active"] == "acme/b"


def test_disable_gives_back_the_exact_base_output_and_activation_is_idempotent(generator, adapters, base_pixels, pool):
    lora = pool()
    lora.activate(adapters["a"])
    lora.activate(adapters["a"])
    assert lora.stats()["switches"] == 1  # no set_adapters call when nothing changes
    lora.activate(None)
    assert np.array_equal(pixels(generator), base_pixels)


def test_lru_eviction_by_count_keeps_outputs_correct(generator, adapters, reference, pool):
    lora = pool(max_adapters=2)
    for name in ["a", "b", "c", "a", "b", "c"]:
        lora.activate(adapters[name])
        assert np.array_equal(pixels(generator), reference[name]), name
        assert len(loaded_adapter_names(generator.pipe)) <= 2
    stats = lora.stats()
    assert (stats["misses"], stats["hits"], stats["evictions"], stats["loaded"]) == (6, 0, 4, 2)
    lora.activate(adapters["c"])  # most recent: still there
    lora.activate(adapters["b"])
    assert lora.stats()["hits"] == 2 and lora.loaded_keys == ["acme/c", "acme/b"]


def test_eviction_by_bytes_and_an_adapter_larger_than_the_budget(generator, adapters, reference, pool):
    probe = pool()
    one = probe.ensure_loaded(adapters["a"]).tensor_bytes
    probe.clear()
    lora = pool(max_adapters=10, max_bytes=int(one * 1.5))
    lora.activate(adapters["a"])
    lora.activate(adapters["c"])  # same size as a: a must go
    assert lora.loaded_keys == ["acme/c"] and lora.stats()["evictions"] == 1
    assert np.array_equal(pixels(generator), reference["c"])
    tight = pool(max_bytes=one // 2)
    with pytest.raises(AdapterError, match="exceed the pool's"):
        tight.ensure_loaded(adapters["a"])


def test_scale_changes_apply_without_a_reload(generator, adapters, reference, pool):
    lora = pool()
    lora.activate(adapters["a"])
    half = adapters["a"].model_copy(update={"scale": 0.5})
    lora.activate(half)
    weaker = pixels(generator)
    assert lora.stats()["loads"] == 1 and lora.stats()["hits"] == 1
    assert not np.array_equal(weaker, reference["a"])
    lora.activate(adapters["a"])
    assert np.array_equal(pixels(generator), reference["a"])


def test_a_new_file_under_the_same_key_is_reloaded(generator, adapters, reference, pool):
    lora = pool()
    lora.activate(adapters["a"])
    moved = adapters["a"].model_copy(update={"uri": adapters["b"].uri})
    lora.activate(moved)
    assert np.array_equal(pixels(generator), reference["b"])
    assert lora.stats()["loads"] == 2 and lora.loaded_keys == ["acme/a"]


def test_a_refused_adapter_leaves_loaded_ones_alone(generator, adapters, reference, pool, tmp_path):
    lora = pool(max_adapters=1)
    lora.activate(adapters["a"])
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file at all")
    with pytest.raises(AdapterError):
        lora.activate(AdapterRef(key="acme/bad", uri=str(bad)))
    assert lora.loaded_keys == ["acme/a"] and lora.stats()["evictions"] == 0
    lora.activate(adapters["a"])
    assert np.array_equal(pixels(generator), reference["a"])


def test_use_holds_the_adapter_for_the_whole_batch_across_threads(generator, adapters, reference, pool):
    lora = pool()
    results: dict[str, np.ndarray] = {}

    def run(name: str) -> None:
        for _ in range(2):
            with lora.use(adapters[name]):
                results[name] = pixels(generator)

    threads = [threading.Thread(target=run, args=(name,)) for name in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert np.array_equal(results["a"], reference["a"]) and np.array_equal(results["b"], reference["b"])


def test_hotswap_gives_the_same_images_as_plain_loading(tiny_path, adapters, reference, base_pixels):
    generator = load_generator(tiny_path)  # hot-swap must be enabled before a pipeline's first adapter
    lora = LoraPool(generator.pipe, max_adapters=1, hotswap_rank=8)
    for name in ["a", "b", "c", "qk", "a"]:
        loaded = lora.activate(adapters[name])
        got = pixels(generator)
        if loaded.rank == 8:
            assert np.array_equal(got, reference[name]), name
        else:
            # A lower rank is zero-padded to the slot's rank: same sums over a longer axis, so fp32 rounding
            # may differ by one level of 255 somewhere, never more.
            assert np.abs(got - reference[name]).max() <= 1, name
    assert loaded_adapter_names(generator.pipe) == {"slot0"}
    stats = lora.stats()
    assert stats["hotswap"] and stats["loads"] == 5 and stats["evictions"] == 4
    lora.activate(None)
    assert np.array_equal(pixels(generator), base_pixels)


def test_hotswap_refuses_what_would_not_fit_the_slot_before_touching_it(tiny_path, adapters, reference, tmp_path):
    generator = load_generator(tiny_path)
    lora = LoraPool(generator.pipe, max_adapters=1, hotswap_rank=4)
    lora.activate(adapters["qk"])  # the first adapter fixes the slot's layers: to_q and to_k only
    path = create_lora(tmp_path / "big.safetensors", transformer=generator.pipe.transformer, rank=16, alpha=16,
                       target_modules=TARGETS_QK)
    big = AdapterRef(key="acme/big", uri=str(path))
    with pytest.raises(AdapterError, match="rank 16 exceeds the pool's hot-swap rank 4"):
        lora.activate(big)
    with pytest.raises(AdapterError, match="targets layers no hot-swap slot has"):
        lora.activate(adapters["b"])  # rank 4, but also to_v, to_out.0, ...
    lora.activate(adapters["qk"])
    assert np.array_equal(pixels(generator), reference["qk"])
    assert lora.stats()["load_failures"] == 2


def test_hotswap_needs_a_pipeline_without_adapters(generator, adapters, pool):
    from factory.errors import ModelError

    pool().ensure_loaded(adapters["a"])
    with pytest.raises(ModelError, match="before the pipeline's first adapter"):
        LoraPool(generator.pipe, hotswap_rank=8)


def test_hotswap_applies_each_adapters_own_scale(tiny_path, adapters, reference, generator, pool):
    plain = pool()
    plain.activate(adapters["b"].model_copy(update={"scale": 0.5}))
    expected = pixels(generator)
    plain.clear()
    swapping = load_generator(tiny_path)
    lora = LoraPool(swapping.pipe, max_adapters=1, hotswap_rank=8)
    lora.activate(adapters["a"])  # the slot's first adapter has alpha/r = 2; b's own is 1, at half strength
    lora.activate(adapters["b"].model_copy(update={"scale": 0.5}))
    assert np.abs(pixels(swapping) - expected).max() <= 1
    lora.activate(adapters["b"])  # a new scale reloads into the slot
    assert np.abs(pixels(swapping) - reference["b"]).max() <= 1 and lora.stats()["loads"] == 3
