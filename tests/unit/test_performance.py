"""The generator's speed options on the real tiny FLUX, on CPU: each loads and runs, exact options keep the plain
images, caches really skip work, CUDA-only options refuse in one line before loading, and a job's overrides
are checked by name."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from factory.errors import ModelError
from factory.jobs.spec import JobSpec
from factory.model.generator import FluxGenerator, GenerationParams
from factory.model.lora.header import read_shape
from factory.model.lora import AdapterError, create_lora
from factory.model.performance import FirstBlockCache, MagCache, Performance, TaylorSeerCache, WarmupShape
from factory.model.profiles import get_profile, with_performance

PROMPTS = ["a red bicycle", "winter sale"]


def load(tiny_path, **options) -> FluxGenerator:
    profile = with_performance(get_profile("tiny"), options)
    return FluxGenerator.from_pretrained(tiny_path / "flux", profile.generator)


def pixels(generator: FluxGenerator, steps: int = 4) -> np.ndarray:
    params = [GenerationParams(prompt=p, seed=5 + i, steps=steps, width=64, height=64, guidance=3.5)
              for i, p in enumerate(PROMPTS)]
    return np.stack([np.asarray(image) for image in generator.generate(params)]).astype(int)


@pytest.fixture(scope="module")
def plain(tiny_path) -> np.ndarray:
    return pixels(load(tiny_path))


def test_the_tag_names_what_changes_how_an_image_is_made():
    assert Performance().tag() == "plain"
    options = Performance(compile="regional", fuse_qkv=True, quantization="fp8", attention_backend="_native_cudnn",
                          cache=FirstBlockCache(threshold=0.1), vae_channels_last=True, vae_tiling_min_pixels=4096)
    assert options.tag() == ("compile=regional;fused_qkv;fp8;attention=_native_cudnn;cache=first_block(0.1);"
                             "vae=channels_last;vae_tiling>=4096")
    assert get_profile("tiny").generator.performance == Performance()  # tiny keeps everything off
    production = get_profile("flux-dev").generator.performance
    assert production.compile == "regional" and production.quantization == "fp8" and production.warmup


@pytest.mark.parametrize("options, needs", [
    ({"quantization": "fp8"}, "performance.quantization=fp8 needs a CUDA device; this replica runs on cpu"),
    ({"attention_backend": "_native_cudnn"}, "performance.attention_backend=_native_cudnn needs a CUDA device"),
    ({"attention_backend": "flash"}, "performance.attention_backend=flash needs a CUDA device"),
    ({"compile": "regional", "compile_mode": "reduce-overhead"}, "performance.compile_mode=reduce-overhead needs"),
])
def test_cuda_only_options_refuse_on_cpu_in_one_line(tiny_path, options, needs):
    with pytest.raises(ModelError) as refused:
        load(tiny_path, **options)
    assert str(refused.value).startswith(needs) and "\n" not in str(refused.value)


@pytest.mark.parametrize("options", [
    {"fuse_qkv": True},
    {"attention_backend": "_native_math"},
    {"vae_channels_last": True},
    {"vae_tiling_min_pixels": 64 * 64},
], ids=["fuse_qkv", "attention_native_math", "vae_channels_last", "vae_tiling"])
def test_exact_options_run_and_keep_the_plain_images(tiny_path, plain, options):
    generator = load(tiny_path, **options)
    assert generator.performance_tag != "plain"
    # Same maths, other kernels or memory layouts: at most one level of 255 apart anywhere.
    assert np.abs(pixels(generator) - plain).max() <= 1


@pytest.mark.parametrize("cache", [
    FirstBlockCache(threshold=1.0), TaylorSeerCache(cache_interval=2, disable_cache_before_step=1),
    MagCache(threshold=1.0, max_skip_steps=2, retention_ratio=0.0),
], ids=["first_block", "taylorseer", "magcache"])
def test_step_caches_run_and_really_skip_work(tiny_path, plain, cache):
    generator = load(tiny_path, cache=cache.model_dump())
    cached = pixels(generator)
    assert cached.shape == plain.shape
    # Generous settings on 4 steps: some step reuses cached blocks, so the images move away from plain.
    assert not np.array_equal(cached, plain)
    assert np.array_equal(pixels(generator), cached)  # the cache state resets between calls


def test_magcache_is_rearmed_for_each_step_count(tiny_path):
    generator = load(tiny_path, cache={"kind": "magcache"})
    four, six = pixels(generator, steps=4), pixels(generator, steps=6)
    assert generator._magcache_steps[id(generator.pipe.transformer)] == 6 and not np.array_equal(four, six)
    assert np.array_equal(pixels(generator, steps=4), four)


def test_a_job_overrides_profile_options_by_name_and_typos_are_refused(tmp_path):
    spec = JobSpec.model_validate({"name": "j", "inputs": ["m.jsonl"], "output": str(tmp_path),
                                   "performance": {"cache": {"kind": "first_block", "threshold": 0.05}}})
    merged = with_performance(get_profile("flux-dev"), spec.performance).generator.performance
    assert merged.cache == FirstBlockCache(threshold=0.05) and merged.quantization == "fp8"  # the rest is kept
    with pytest.raises(ValidationError, match="compile_mod"):
        JobSpec.model_validate({"name": "j", "inputs": ["m.jsonl"], "output": str(tmp_path),
                                "performance": {"compile_mod": "default"}})


def test_fused_projections_refuse_adapters_that_target_them(tiny_path, tmp_path):
    from factory.model.lora import LoraPool
    from factory.model.lora.ref import AdapterRef

    generator = load(tiny_path, fuse_qkv=True)
    path = create_lora(tmp_path / "qk.safetensors", transformer=generator.pipe.transformer, rank=4,
                       target_modules=["to_q", "to_k"])
    pool = LoraPool(generator.pipe, max_adapters=1)
    with pytest.raises(AdapterError, match="fuse_qkv"):
        pool.activate(AdapterRef(key="acme/qk", uri=str(path)))
    out_only = create_lora(tmp_path / "out.safetensors", transformer=generator.pipe.transformer, rank=4,
                           target_modules=["to_out.0"])
    assert pool.activate(AdapterRef(key="acme/out", uri=str(out_only))) is not None


def test_an_adapters_rank_comes_from_its_header_alone(tiny_path, tmp_path):
    generator = load(tiny_path)
    path = create_lora(tmp_path / "r6.safetensors", transformer=generator.pipe.transformer, rank=6,
                       target_modules=["to_q", "to_k"])
    shape = read_shape(str(path))
    assert shape.max_rank == 6 and shape.pairs == 2 * 3  # to_q and to_k in each of the 3 tiny blocks
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 4)
    with pytest.raises(AdapterError, match="not a safetensors file"):
        read_shape(str(tmp_path / "junk.safetensors"))


def test_warmup_shapes_are_typed():
    with pytest.raises(ValidationError):
        WarmupShape(width=100, height=64, steps=2)  # not a multiple of 16


@pytest.mark.slow
def test_a_fully_compiled_transformer_runs_on_cpu_and_keeps_the_images(tiny_path, plain):
    # Regional compiling is tested on a whole replica, with hot-swap (test_compiled_replica.py).
    mode = "full"
    generator = load(tiny_path, compile=mode, warmup=[{"width": 64, "height": 64, "steps": 4}])
    assert generator.performance_tag == "plain"  # not compiled yet: rows made now would be eager
    generator.compile()
    generator.warm_up([2])
    compiled = pixels(generator)
    stats = generator.compile_stats()
    assert stats["compile"] == mode and stats["graphs"] > 0 and stats["recompiles_after_warmup"] == 0
    assert generator.performance_tag == f"compile={mode}"
    assert np.abs(compiled - plain).max() <= 2


def test_a_step_cache_is_compiled_with_graph_breaks_and_fullgraph_is_refused_with_it():
    cached = Performance(compile="regional", cache=FirstBlockCache())
    assert cached.compile_fullgraph is False and Performance(compile="regional").compile_fullgraph is True
    with pytest.raises(ValidationError, match="fullgraph=true cannot compile a step cache"):
        Performance(compile="regional", fullgraph=True, cache=FirstBlockCache())


@pytest.mark.slow
def test_a_compiled_transformer_with_a_step_cache_runs_and_matches_the_eager_cache(tiny_path):
    cache = {"kind": "taylorseer", "cache_interval": 2, "disable_cache_before_step": 1}
    eager = pixels(load(tiny_path, cache=cache))
    generator = load(tiny_path, cache=cache, compile="regional")
    generator.compile()
    compiled = pixels(generator)
    assert generator.compile_stats()["graphs"] > 0
    assert np.abs(compiled - eager).max() <= 2
