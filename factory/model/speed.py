"""Apply a profile's `Performance` options to a loaded FluxPipeline, in the order the libraries need.

`prepare` runs right after loading (layers first, then processors and hooks); `compile_transformer` runs last,
after the LoRA pool has enabled hot-swap and loaded its first adapter, so switching adapters later never
recompiles. `configure_call` sets what depends on a call's shape (VAE tiling, MagCache's step count).

The same options apply to FLUX.1's `FluxTransformer2DModel` and FLUX.2's `Flux2Transformer2DModel`: both keep their
blocks in `transformer_blocks` and `single_transformer_blocks` and name them in `_repeated_blocks` (regional
compile), and diffusers' cache hooks know both block classes. A profile with two transformers (FLUX.1 [dev] and
Kontext [dev]) prepares and compiles each (`prepare_transformer`, `compile_transformer`).
"""

from __future__ import annotations

import time
from typing import Any

import structlog

from factory.errors import ModelError
from factory.model.performance import FirstBlockCache, MagCache, Performance, TaylorSeerCache

log = structlog.get_logger(__name__)

# The transformer's repeated blocks hold nearly all of its FLOPs; embedders and the output projection stay in
# the profile's dtype, where FP8 would cost accuracy for no measurable speed.
FP8_MODULE_PREFIXES = ("transformer_blocks.", "single_transformer_blocks.")


def check_device(options: Performance, device: str) -> None:
    """Refuse, in one line naming the option, what this device cannot run: before any weights are touched."""
    if device == "cuda":
        return
    needs = options.cuda_requirements()
    if needs:
        raise ModelError(f"performance.{needs[0]} needs a CUDA device; this replica runs on {device} "
                         "(turn the option off for CPU profiles)")


def prepare(pipe: Any, options: Performance, device: str) -> None:
    """Everything but compiling, on a pipeline already on its device."""
    check_device(options, device)
    prepare_transformer(pipe.transformer, options)
    if options.vae_channels_last:
        import torch

        pipe.vae.to(memory_format=torch.channels_last)


def prepare_transformer(transformer: Any, options: Performance) -> None:
    """The options that change a transformer's layers, processors and hooks."""
    if isinstance(options.cache, MagCache) and options.cache.mag_ratios is None \
            and type(transformer).__name__ != "FluxTransformer2DModel":
        raise ModelError(f"performance.cache: diffusers' MagCache ratios are calibrated for FLUX.1; give "
                         f"`mag_ratios` from a calibration run of {type(transformer).__name__}")
    if options.fuse_qkv:
        transformer.fuse_qkv_projections()
    if options.quantization == "fp8":
        _quantize_fp8(transformer)
    if options.attention_backend != "native":
        _set_attention_backend(transformer, options.attention_backend)
    if options.cache is not None and not isinstance(options.cache, MagCache):
        # MagCache is armed per step count, by configure_call before each call.
        transformer.enable_cache(cache_config(options.cache, None))


def compile_transformer(transformer: Any, options: Performance) -> float:
    """torch.compile a transformer as configured; returns seconds (compiling itself happens on first calls)."""
    if options.compile == "off":
        return 0.0
    started = time.perf_counter()
    kwargs = {"fullgraph": options.compile_fullgraph, "mode": options.compile_mode}
    if options.compile == "regional":
        transformer.compile_repeated_blocks(**kwargs)
    else:
        transformer.compile(**kwargs)
    return time.perf_counter() - started


def configure_call(pipe: Any, options: Performance, width: int, height: int, steps: int,
                   magcache_steps: int | None) -> int | None:
    """Per call shape: tile the VAE for large images; re-arm MagCache when the step count changes (its ratios
    are interpolated to a fixed number of steps). Returns the step count MagCache is now armed for."""
    if options.vae_tiling_min_pixels is not None:
        if width * height >= options.vae_tiling_min_pixels:
            pipe.vae.enable_tiling()
        else:
            pipe.vae.disable_tiling()
    if isinstance(options.cache, MagCache) and magcache_steps != steps:
        if pipe.transformer.is_cache_enabled:
            pipe.transformer.disable_cache()
        pipe.transformer.enable_cache(cache_config(options.cache, steps))
        return steps
    return magcache_steps


def cache_config(cache: FirstBlockCache | TaylorSeerCache | MagCache, steps: int | None):
    """The diffusers config object for a cache option."""
    from diffusers import FirstBlockCacheConfig, MagCacheConfig, TaylorSeerCacheConfig

    if isinstance(cache, FirstBlockCache):
        return FirstBlockCacheConfig(threshold=cache.threshold)
    if isinstance(cache, TaylorSeerCache):
        return TaylorSeerCacheConfig(
            cache_interval=cache.cache_interval, disable_cache_before_step=cache.disable_cache_before_step,
            disable_cache_after_step=cache.disable_cache_after_step, max_order=cache.max_order,
            use_lite_mode=cache.lite,
        )
    from diffusers.hooks.mag_cache import FLUX_MAG_RATIOS

    ratios = list(cache.mag_ratios) if cache.mag_ratios is not None else FLUX_MAG_RATIOS
    return MagCacheConfig(
        threshold=cache.threshold, max_skip_steps=cache.max_skip_steps, retention_ratio=cache.retention_ratio,
        num_inference_steps=steps or len(ratios), mag_ratios=ratios,
    )


def compiled_graphs() -> int:
    """Graphs torch.compile has produced in this process: a rise after warm-up is a recompile."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _quantize_fp8(transformer: Any) -> None:
    try:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_
    except ImportError:
        raise ModelError("performance.quantization=fp8 needs torchao (pip install 'factory[gpu]')") from None
    import torch

    major, minor = torch.cuda.get_device_capability()
    if (major, minor) < (8, 9):
        raise ModelError(f"performance.quantization=fp8 needs a GPU with compute capability 8.9 or newer "
                         f"(Ada, Hopper, Blackwell); this one has {major}.{minor}")

    def in_blocks(module: Any, name: str) -> bool:
        return isinstance(module, torch.nn.Linear) and name.startswith(FP8_MODULE_PREFIXES)

    quantize_(transformer, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()), filter_fn=in_blocks)


def _set_attention_backend(transformer: Any, backend: str) -> None:
    try:
        transformer.set_attention_backend(backend)
    except (RuntimeError, ValueError, ImportError) as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        raise ModelError(f"performance.attention_backend={backend}: not available here ({reason})") from None
