"""How fast the FLUX generator runs: the typed `performance` section of a generator profile.

Every option maps onto one diffusers, torch or torchao switch; none is hand-rolled here. They are applied in the
order the libraries need (`factory.model.speed`): fused projections and FP8 change the transformer's layers, so
they come first; the attention backend and the step cache install processors and hooks; LoRA hot-swap must be
enabled (and the first adapter loaded) before the transformer is compiled; compiling comes last. Each result
records `tag()`, so a row says how it was made.

Options that change numbers (FP8, step caching) are off in `tiny` and measured against plain bf16 by
`bench/gpu_flux.py` before a production profile turns them on.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FirstBlockCache(_Options):
    """diffusers' First Block Cache: when the first block's residual barely changes from the last step, reuse the
    cached output of the other blocks (ParaAttention). Higher threshold: more steps skipped, more drift."""

    kind: Literal["first_block"] = "first_block"
    threshold: float = Field(default=0.08, gt=0, le=1, description="Relative residual change below which a step "
                             "reuses the cache (ParaAttention's FLUX setting is 0.08)")

    def tag(self) -> str:
        return f"first_block({self.threshold:g})"


class TaylorSeerCache(_Options):
    """diffusers' TaylorSeer: every `cache_interval` steps compute fully, in between predict block outputs with a
    Taylor expansion of their recent history."""

    kind: Literal["taylorseer"] = "taylorseer"
    cache_interval: int = Field(default=5, ge=1, description="Full computations every this many steps")
    disable_cache_before_step: int = Field(default=3, ge=0, description="Steps computed fully at the start")
    disable_cache_after_step: int | None = Field(default=None, ge=0, description="Compute fully from this step on")
    max_order: int = Field(default=1, ge=0, le=4, description="Order of the Taylor approximation")
    lite: bool = Field(default=False, description="diffusers' lite mode: predefined patterns, least memory")

    def tag(self) -> str:
        return f"taylorseer({self.cache_interval},{self.disable_cache_before_step},{self.max_order})"


class MagCache(_Options):
    """diffusers' MagCache: skip steps while the accumulated residual-magnitude error stays under a threshold.
    The magnitude ratios are model-specific; unset, diffusers' ratios calibrated for FLUX are used."""

    kind: Literal["magcache"] = "magcache"
    threshold: float = Field(default=0.06, gt=0, le=1, description="Accumulated error allowed before computing")
    max_skip_steps: int = Field(default=3, ge=1, description="Most consecutive steps skipped")
    retention_ratio: float = Field(default=0.2, ge=0, le=1, description="Leading fraction of steps never skipped")
    mag_ratios: tuple[float, ...] | None = Field(
        default=None, description="Per-step magnitude ratios from a calibration run (None: diffusers' FLUX ratios)"
    )

    def tag(self) -> str:
        custom = ",custom" if self.mag_ratios is not None else ""
        return f"magcache({self.threshold:g},{self.max_skip_steps},{self.retention_ratio:g}{custom})"


StepCache = Annotated[FirstBlockCache | TaylorSeerCache | MagCache, Field(discriminator="kind")]

# diffusers' attention dispatcher names, less the `*_hub` backends (they download kernels from the Hub at
# start-up, which a replica must not depend on) and device-specific ones (NPU, XLA).
AttentionBackend = Literal[
    "native", "_native_math", "_native_cudnn", "_native_flash", "_native_efficient", "flex", "flash", "_flash_3",
    "sage", "xformers",
]
# What runs without CUDA; every other backend is refused on a CPU replica.
CPU_ATTENTION_BACKENDS = frozenset({"native", "_native_math"})


class WarmupShape(_Options):
    """A call shape a replica compiles and runs before it reports ready, so no row of a job pays for it."""

    width: int = Field(ge=16, le=2048, multiple_of=16)
    height: int = Field(ge=16, le=2048, multiple_of=16)
    steps: int = Field(ge=1, le=100)
    references: int = Field(
        default=0, ge=0, le=10, description="0: text-to-image; n: an edit with n references of this size (their "
        "tokens lengthen the sequence, so an edit is a shape of its own to compile)",
    )


class Performance(_Options):
    """Speed options of the generator. Defaults are plain diffusers: everything off."""

    compile: Literal["off", "regional", "full"] = Field(
        default="off", description="torch.compile: 'regional' compiles the repeated transformer blocks "
        "(diffusers' compile_repeated_blocks: one block's compile serves all of them, seconds instead of minutes), "
        "'full' the whole transformer",
    )
    compile_mode: Literal["default", "max-autotune-no-cudagraphs", "max-autotune", "reduce-overhead"] = Field(
        default="default", description="torch.compile mode; the CUDA-graph modes need CUDA"
    )
    fullgraph: bool | None = Field(
        default=None, description="Fail the compile on a graph break instead of running slower. Unset: true, "
        "except with a step cache, whose diffusers hooks call functions torch.compile must not trace",
    )
    fuse_qkv: bool = Field(
        default=False, description="Fuse each attention's q/k/v projections into one matmul (diffusers' "
        "fuse_qkv_projections). LoRAs that target to_q/to_k/to_v would be silently ignored, so they are refused",
    )
    quantization: Literal["none", "fp8"] = Field(
        default="none", description="'fp8': torchao float8 weights and dynamic float8 activations with rowwise "
        "scales on the transformer blocks' linear layers (CUDA with compute capability 8.9+, torchao installed)",
    )
    attention_backend: AttentionBackend = Field(
        default="native", description="diffusers attention dispatcher backend: 'native' (torch SDPA chooses), "
        "'_native_cudnn', 'flash' (flash-attn installed), '_flash_3' (FlashAttention-3 installed), ...",
    )
    cache: StepCache | None = Field(default=None, description="Step caching through diffusers' cache hooks")
    vae_channels_last: bool = Field(default=False, description="Run the VAE decoder in channels-last memory layout")
    vae_tiling_min_pixels: int | None = Field(
        default=None, ge=1, description="Decode in tiles when width x height is at least this (bounds the VAE's "
        "memory for large sizes); None: never tile",
    )
    warmup: tuple[WarmupShape, ...] = Field(
        default=(), description="Shapes a replica runs before it reports ready (compiling them when compile is "
        "on), at batch sizes 1, 2 and its max batch size",
    )

    @model_validator(mode="after")
    def _cache_needs_graph_breaks(self) -> Performance:
        if self.fullgraph and self.cache is not None and self.compile != "off":
            raise ValueError("fullgraph=true cannot compile a step cache: diffusers' cache hooks break the graph "
                             "(leave fullgraph unset)")
        return self

    @property
    def compile_fullgraph(self) -> bool:
        return self.fullgraph if self.fullgraph is not None else self.cache is None

    def tag(self) -> str:
        """Canonical one-line description of what changes how images are made; 'plain' when nothing does."""
        parts = []
        if self.compile != "off":
            parts.append(f"compile={self.compile}" + ("" if self.compile_mode == "default" else f":{self.compile_mode}"))
        if self.fuse_qkv:
            parts.append("fused_qkv")
        if self.quantization != "none":
            parts.append(self.quantization)
        if self.attention_backend != "native":
            parts.append(f"attention={self.attention_backend}")
        if self.cache is not None:
            parts.append(f"cache={self.cache.tag()}")
        if self.vae_channels_last:
            parts.append("vae=channels_last")
        if self.vae_tiling_min_pixels is not None:
            parts.append(f"vae_tiling>={self.vae_tiling_min_pixels}")
        return ";".join(parts) or "plain"

    def cuda_requirements(self) -> list[str]:
        """The options that cannot run without CUDA, each as `option=value`."""
        needs = []
        if self.quantization == "fp8":
            needs.append("quantization=fp8")
        if self.attention_backend not in CPU_ATTENTION_BACKENDS:
            needs.append(f"attention_backend={self.attention_backend}")
        if self.compile != "off" and self.compile_mode in ("reduce-overhead", "max-autotune"):
            needs.append(f"compile_mode={self.compile_mode}")
        return needs
