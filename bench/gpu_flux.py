"""FLUX at full size on one GPU with the profile's speed options (issue 9): s/image, TFLOP/s against a matmul peak
measured in the same run, peak memory, warm-up, numeric drift against plain bf16, and LoRA hot-swap on a compiled
transformer.

    python bench/gpu_flux.py --json out.json              # one H100/H200: FLUX.1-dev and -schnell at full size
    python bench/gpu_flux.py --small --json small.json    # the same code paths at toy sizes on CPU (< 3 minutes)
    python bench/gpu_flux.py --compile-full ...           # adds torch.compile of the whole transformer (slow)
    python bench/gpu_flux.py --only "compile" ...         # only the variants whose name contains a given text
    python bench/gpu_flux.py --only klein Kontext ...     # the FLUX.2 [klein] and Kontext rows (edits)

What it builds. The FLUX.1-dev and FLUX.1-schnell architectures (the same transformer: 19 double and 38 single
blocks, 24 heads x 128; T5-XXL, CLIP-L and the 16-channel FLUX VAE) with random weights made directly on the GPU
in bf16: no download, no disk, no hub. FLUX.1 Kontext [dev] is the same transformer (its rows edit with one
reference through `FluxKontextPipeline`); FLUX.2 [klein] 4B is `Flux2Transformer2DModel` (5 double and 20 single
blocks, 24 heads x 128), a Qwen3-4B text encoder (36 layers, hidden 2560; layers 9, 18, 27 stacked) and the
32-channel FLUX.2 VAE, built the same way, its rows text-to-image at 4 steps and edits with one and three
references. Tokenizers are trained offline on a fixed corpus as `factory.model.tiny` does (their ids stay far
below the models' vocabularies). Weights are drawn with std 1/sqrt(fan-in) (about 0.01
to 0.02 at full size): unit-gain layers keep 57 blocks finite in bf16, and the latents move far from their noise
(the script prints how far), so the drift figures see the whole network. The text encoders and the VAE are
built once and shared; every variant gets a freshly built transformer (same seed, identical weights), because
fused projections, FP8, hooks and compiling all change its modules.

What one row is. A variant is built (transformer, pipeline, options), warmed up with one call of the timed shape
(warm-up seconds = build + options + compile + that call), then timed `--repeats` times (stopping early after
`--variant-s` seconds of timed calls); s/image is the median call time over the batch. A timed call is the whole
pipeline -- prompt encoding, every denoising step, VAE decode -- with `output_type="latent"` and the VAE decode
done here, so the final latents can be compared (PIL conversion, the same for every path, is left out).
"plain diffusers" calls `pipe(...)` directly; every other row goes through the factory's `FluxGenerator`
(`from_pipe` applies the options, `.compile()`, `.warm_up()`, `.call_pipeline()`; an edit row
`.call_edit_pipeline()` with its references, random-pixel images at the output size, so reference tokens count as
many as the image's).

TFLOP/s: one transformer forward's FLOPs, counted once per shape with `torch.utils.flop_counter.FlopCounterMode`
(attention counted as its two matrix products QK^T and PV, 4*S^2*d per head, by counting under torch's math
SDPA; softmax, norms and elementwise work not counted), x steps x batch, / the whole call's time. With step
caching the figure is nominal (skipped steps still counted). The peak is a large bf16 `torch.mm` loop on the GPU
(fp32 on CPU), measured in the same run.

Drift: cosine similarity of the final latents and PSNR of the decoded image against the plain bf16 row of the
same model at the same seed and prompt. With random weights this measures numerical drift only, not image
quality. A cached row is also compared with the same options without the cache: identical output means the cache
skipped no step. Cached rows compile with fullgraph=False (diffusers' cache hooks break the graph).

LoRA hot-swap: as a replica does it -- options, `LoraPool(max_adapters=1, hotswap_rank=64)` (hot-swap enabled
before the first load), the first of 10 adapters (ranks 4-64 on the attention projections, made by `create_lora`)
loaded, compile (regional; with FP8 where it runs and peft accepts it), warm-up -- then 10 switches, each followed
by one generation. A switch is the whole `pool.activate()` (read and check the file, swap the weights into the
slot, make it active); recompiles are the generator's `compile_stats()` since warm-up.

Budget: variants run in order of importance and none starts after `--budget-s` (a skipped row says so); a
variant stops timing after `--variant-s` seconds. The elapsed time is printed.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch

from factory.model.performance import (
    FirstBlockCache,
    MagCache,
    Performance,
    TaylorSeerCache,
    WarmupShape,
)

PROMPT = "a photo of a red bicycle leaning on a wall in the morning light"
SEED = 7
NOTE = ("With random weights, cosine/PSNR measure numerical drift against the plain row (bf16 on GPU, float32 "
        "with --small) only, not image quality.")


# ---- sizes ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    """Everything that differs between the full GPU run and `--small`; the code path is the same."""

    mode: str
    device: str
    dtype: str  # the profile's dtype name
    width: int
    height: int
    dev_steps: int
    schnell_steps: int
    hotswap_steps: int  # the 10 hot-swap generations measure the switch, so they run few steps
    dev_text_tokens: int  # T5 max_sequence_length (the production profiles: 512 dev, 256 schnell)
    schnell_text_tokens: int
    transformer: dict
    t5: dict
    clip: dict
    vae: dict
    matmul_n: int
    matmul_iters: int
    hotswap_ranks: tuple[int, ...]
    # FLUX.2 [klein] 4B
    klein_steps: int
    klein_text_tokens: int
    klein_layers: tuple[int, ...]  # the text encoder's hidden states stacked into the prompt embedding
    klein_transformer: dict
    qwen3: dict
    vae2: dict

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


FULL = Sizes(
    mode="full", device="cuda", dtype="bfloat16", width=1024, height=1024, dev_steps=28, schnell_steps=4,
    hotswap_steps=4, dev_text_tokens=512, schnell_text_tokens=256,
    # black-forest-labs/FLUX.1-dev transformer/config.json (schnell: guidance_embeds False)
    transformer={"patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38,
                 "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 4096,
                 "pooled_projection_dim": 768, "axes_dims_rope": (16, 56, 56)},
    # google/t5-v1_1-xxl encoder, as FLUX ships it in text_encoder_2
    t5={"vocab_size": 32128, "d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24, "num_heads": 64,
        "feed_forward_proj": "gated-gelu", "relative_attention_num_buckets": 32,
        "relative_attention_max_distance": 128, "tie_word_embeddings": False},
    # openai/clip-vit-large-patch14 text model
    clip={"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
          "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
          "projection_dim": 768},
    # FLUX.1 vae/config.json
    vae={"block_out_channels": (128, 256, 512, 512), "layers_per_block": 2, "norm_num_groups": 32,
         "latent_channels": 16, "sample_size": 1024, "scaling_factor": 0.3611, "shift_factor": 0.1159},
    matmul_n=8192, matmul_iters=50, hotswap_ranks=(4, 8, 16, 32, 64),
    klein_steps=4, klein_text_tokens=512, klein_layers=(9, 18, 27),
    # black-forest-labs/FLUX.2-klein-4B transformer/config.json
    klein_transformer={"patch_size": 1, "in_channels": 128, "num_layers": 5, "num_single_layers": 20,
                       "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 7680,
                       "timestep_guidance_channels": 256, "mlp_ratio": 3.0, "axes_dims_rope": (32, 32, 32, 32),
                       "guidance_embeds": False},
    # Qwen/Qwen3-4B, as FLUX.2-klein-4B ships it in text_encoder
    qwen3={"vocab_size": 151936, "hidden_size": 2560, "intermediate_size": 9728, "num_hidden_layers": 36,
           "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "max_position_embeddings": 40960,
           "rope_theta": 1000000.0, "tie_word_embeddings": True},
    # the FLUX.2 VAE (AutoencoderKLFlux2's defaults)
    vae2={"block_out_channels": (128, 256, 512, 512), "layers_per_block": 2, "norm_num_groups": 32,
          "latent_channels": 32, "sample_size": 1024},
)

# The same architectures shrunk (vocab_size None: the offline tokenizer's size), float32 on CPU.
SMALL = Sizes(
    mode="small", device="cpu", dtype="float32", width=128, height=128, dev_steps=8, schnell_steps=2,
    hotswap_steps=2, dev_text_tokens=64, schnell_text_tokens=32,
    transformer={"patch_size": 1, "in_channels": 64, "num_layers": 2, "num_single_layers": 4,
                 "attention_head_dim": 32, "num_attention_heads": 4, "joint_attention_dim": 64,
                 "pooled_projection_dim": 64, "axes_dims_rope": (8, 12, 12)},
    t5={"vocab_size": None, "d_model": 64, "d_kv": 16, "d_ff": 128, "num_layers": 2, "num_heads": 4,
        "feed_forward_proj": "gated-gelu", "relative_attention_num_buckets": 8, "tie_word_embeddings": False},
    clip={"vocab_size": None, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
          "num_attention_heads": 2, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
          "projection_dim": 64},
    vae={"block_out_channels": (16, 32, 32, 32), "layers_per_block": 1, "norm_num_groups": 8,
         "latent_channels": 16, "sample_size": 128, "scaling_factor": 0.3611, "shift_factor": 0.1159},
    matmul_n=1024, matmul_iters=10, hotswap_ranks=(4, 8, 16, 32, 64),
    klein_steps=2, klein_text_tokens=32, klein_layers=(1, 2, 3),
    klein_transformer={"patch_size": 1, "in_channels": 64, "num_layers": 1, "num_single_layers": 4,
                       "attention_head_dim": 32, "num_attention_heads": 4, "joint_attention_dim": 192,
                       "timestep_guidance_channels": 64, "mlp_ratio": 3.0, "axes_dims_rope": (8, 8, 8, 8),
                       "guidance_embeds": False},
    qwen3={"vocab_size": None, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
           "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 512,
           "tie_word_embeddings": True},
    vae2={"block_out_channels": (16, 32, 32, 32), "layers_per_block": 1, "norm_num_groups": 8, "latent_channels": 16,
          "sample_size": 128},
)


# ---- building the models in memory ---------------------------------------------------------------------------


@contextmanager
def building(device: str, dtype: torch.dtype):
    """Construct modules directly on `device` in `dtype`: a 12B-parameter transformer never exists in fp32."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


@torch.no_grad()
def init_weights(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Overwrite every parameter from one seeded generator: the same seed gives identical weights on any build.
    Matrices N(0, 1/fan_in) (unit gain, ~0.01-0.02 at full size), biases 0, norm scales 1."""
    device = next(module.parameters()).device
    generator = torch.Generator(device).manual_seed(seed)
    for name, param in module.named_parameters():
        if name.endswith("bias"):
            param.zero_()
        elif param.dim() >= 2:
            param.normal_(0.0, param[0].numel() ** -0.5, generator=generator)
        else:
            param.fill_(1.0)
    return module.eval().requires_grad_(False)


@dataclass
class Shared:
    """The parts every variant shares (nothing in this benchmark changes them): text encoders, tokenizers, VAE."""

    clip: Any
    clip_tokenizer: Any
    t5: Any
    t5_tokenizer: Any
    vae: Any
    seconds: float


def build_shared(sizes: Sizes) -> Shared:
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from factory.model.tiny import _clip_tokenizer, _t5_tokenizer

    started = time.perf_counter()
    clip_tokenizer, t5_tokenizer = _clip_tokenizer(), _t5_tokenizer()
    clip_config = dict(sizes.clip, vocab_size=sizes.clip["vocab_size"] or len(clip_tokenizer))
    t5_config = dict(sizes.t5, vocab_size=sizes.t5["vocab_size"] or len(t5_tokenizer))
    with building(sizes.device, sizes.torch_dtype):
        clip = CLIPTextModel(CLIPTextConfig(
            **clip_config, bos_token_id=clip_tokenizer.bos_token_id, eos_token_id=clip_tokenizer.eos_token_id,
            pad_token_id=clip_tokenizer.pad_token_id))
        t5 = T5EncoderModel(T5Config(**t5_config, pad_token_id=t5_tokenizer.pad_token_id,
                                     eos_token_id=t5_tokenizer.eos_token_id))
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
            up_block_types=["UpDecoderBlock2D"] * 4, use_quant_conv=False, use_post_quant_conv=False, **sizes.vae)
    init_weights(clip, 101), init_weights(t5, 102), init_weights(vae, 103)
    synchronize(sizes.device)
    return Shared(clip, clip_tokenizer, t5, t5_tokenizer, vae, time.perf_counter() - started)


@dataclass
class KleinShared:
    """FLUX.2 [klein]'s own text encoder, tokenizer and VAE, built on the first klein row and kept."""

    text_encoder: Any
    tokenizer: Any
    vae: Any
    seconds: float


def build_klein_shared(sizes: Sizes) -> KleinShared:
    from diffusers import AutoencoderKLFlux2
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from factory.model.tiny import _qwen_tokenizer

    started = time.perf_counter()
    tokenizer = _qwen_tokenizer()
    config = dict(sizes.qwen3, vocab_size=sizes.qwen3["vocab_size"] or len(tokenizer))
    with building(sizes.device, sizes.torch_dtype):
        text_encoder = Qwen3ForCausalLM(Qwen3Config(**config, pad_token_id=tokenizer.pad_token_id))
        vae = AutoencoderKLFlux2(**sizes.vae2)
    init_weights(text_encoder, 104), init_weights(vae, 105)
    synchronize(sizes.device)
    return KleinShared(text_encoder, tokenizer, vae, time.perf_counter() - started)


# Each model's transformer weights come from its own seed; Kontext [dev] is FLUX.1-dev's architecture.
TRANSFORMER_SEEDS = {"dev": 1, "schnell": 2, "kontext": 3, "klein": 4}


def transformer_module(sizes: Sizes, model: str):
    from diffusers import Flux2Transformer2DModel, FluxTransformer2DModel

    if model == "klein":
        return Flux2Transformer2DModel(**sizes.klein_transformer)
    return FluxTransformer2DModel(**sizes.transformer, guidance_embeds=(model != "schnell"))


def build_transformer(sizes: Sizes, model: str):
    """A fresh transformer, identical weights every time for the same model."""
    with building(sizes.device, sizes.torch_dtype):
        transformer = transformer_module(sizes, model)
    return init_weights(transformer, TRANSFORMER_SEEDS[model])


def scheduler_for(model: str):
    from diffusers import FlowMatchEulerDiscreteScheduler

    if model == "schnell":  # FLUX.1-schnell's scheduler_config: timestep-distilled, no resolution shift
        return FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False, base_shift=0.5, max_shift=1.15,
                                               base_image_seq_len=256, max_image_seq_len=4096)
    return FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                           base_image_seq_len=256, max_image_seq_len=4096)


def assemble(ctx: Context, transformer, model: str):
    """The model's pipeline around `transformer`. Kontext rows get a FluxPipeline too: the factory's generator
    builds its FluxKontextPipeline on the same components, as it does for a loaded profile."""
    from diffusers import Flux2KleinPipeline, FluxPipeline

    if model == "klein":
        klein = ctx.klein()
        pipe = Flux2KleinPipeline(scheduler=scheduler_for(model), vae=klein.vae, text_encoder=klein.text_encoder,
                                  tokenizer=klein.tokenizer, transformer=transformer, is_distilled=True)
    else:
        shared = ctx.shared
        pipe = FluxPipeline(scheduler=scheduler_for(model), vae=shared.vae, text_encoder=shared.clip,
                            tokenizer=shared.clip_tokenizer, text_encoder_2=shared.t5,
                            tokenizer_2=shared.t5_tokenizer, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---- measuring -----------------------------------------------------------------------------------------------


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def matmul_peak_tflops(sizes: Sizes) -> float:
    """Best of 3 timed loops of one large square matmul in the run's dtype (fp32 on CPU): the practical peak."""
    n, iters = sizes.matmul_n, sizes.matmul_iters
    generator = torch.Generator(sizes.device).manual_seed(0)
    a, b = (torch.randn(n, n, device=sizes.device, dtype=sizes.torch_dtype, generator=generator) for _ in range(2))
    out = torch.empty_like(a)
    torch.mm(a, b, out=out)
    best = 0.0
    for _ in range(3):
        synchronize(sizes.device)
        started = time.perf_counter()
        for _ in range(iters):
            torch.mm(a, b, out=out)
        synchronize(sizes.device)
        best = max(best, 2 * n**3 * iters / (time.perf_counter() - started))
    return best / 1e12


def flops_key(model: str, references: int = 0) -> str:
    return model if not references else f"{model}+{references}ref"


@torch.no_grad()
def transformer_flops(sizes: Sizes, model: str, text_tokens: int, references: int = 0) -> int:
    """FLOPs of one transformer forward at batch 1 and the run's image size, with `references` reference images of
    that size (their tokens join the image's). Counted on a meta-device copy (shapes only: no time, no memory)
    under torch's math SDPA, so attention counts as its two matrix products whatever backend the timed runs use."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    device, dtype = "meta", sizes.torch_dtype
    with building(device, dtype):
        transformer = transformer_module(sizes, model)
    config = transformer.config
    image_tokens = (sizes.height // 16) * (sizes.width // 16) * (1 + references)
    axes = 4 if model == "klein" else 3  # FLUX.2 positions carry (t, h, w, l), FLUX.1 (t, h, w)
    inputs = {
        "hidden_states": torch.zeros(1, image_tokens, config.in_channels, device=device, dtype=dtype),
        "encoder_hidden_states": torch.zeros(1, text_tokens, config.joint_attention_dim, device=device, dtype=dtype),
        "timestep": torch.full((1,), 0.5, device=device, dtype=dtype),
        "img_ids": torch.zeros(image_tokens, axes, device=device, dtype=dtype),
        "txt_ids": torch.zeros(text_tokens, axes, device=device, dtype=dtype),
        "guidance": torch.full((1,), 3.5, device=device, dtype=torch.float32) if config.guidance_embeds else None,
        "return_dict": False,
    }
    if model != "klein":
        inputs["pooled_projections"] = torch.zeros(1, config.pooled_projection_dim, device=device, dtype=dtype)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        transformer(**inputs)
    return counter.get_total_flops()


class PeakMemory:
    """Peak GPU memory allocated while a variant runs; on CPU the process's peak RSS (VmHWM, reset through
    /proc/self/clear_refs where the kernel allows it, else the process-wide peak so far)."""

    def __init__(self, device: str):
        self.device = device
        self.kind = "GPU max_memory_allocated" if device == "cuda" else "process peak RSS"

    def reset(self) -> None:
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass

    def peak_mb(self) -> float | None:
        if self.device == "cuda":
            return torch.cuda.max_memory_allocated() / 2**20
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        return None


@torch.no_grad()
def decode(pipe, latents, width: int, height: int):
    """What the pipeline does after the last step, on the returned latents: for FLUX.1 (and Kontext) unpack,
    unscale, VAE decode; FLUX.2 returns VAE latents already unpatched and denormalised. [0, 1]."""
    if hasattr(pipe, "_unpack_latents"):
        latents = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)
        latents = latents / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
    image = pipe.vae.decode(latents.to(pipe.vae.dtype), return_dict=False)[0]
    return (image / 2 + 0.5).clamp(0, 1)


def reference_images(sizes: Sizes, count: int) -> tuple:
    """`count` different references at the output size: random pixels from fixed seeds (every one is encoded, and
    each adds as many tokens as the image)."""
    import numpy as np
    from PIL import Image

    return tuple(Image.fromarray(np.random.default_rng(50 + i).integers(0, 256, (sizes.height, sizes.width, 3),
                                                                          dtype=np.uint8)) for i in range(count))


def initial_noise(pipe, width: int, height: int):
    """The latents the pipeline starts from for SEED (drawn the same way the pipeline draws them)."""
    channels = pipe.transformer.config.in_channels // 4
    noise, _ = pipe.prepare_latents(1, channels, height, width, pipe.transformer.dtype, "cpu",
                                    [torch.Generator("cpu").manual_seed(SEED)])
    return noise.float()


def cosine(a, b) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    return float((a @ b) / (a.norm() * b.norm()).clamp_min(1e-30))


def psnr_db(a, b) -> float:
    mse = float(((a.double() - b.double()) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def one_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0] if lines else ''}"[:180]


# ---- variants ------------------------------------------------------------------------------------------------

COMPILE_FP8 = Performance(compile="regional", quantization="fp8")
# diffusers' cache hooks call functions wrapped in torch.compiler.disable, which fullgraph=True refuses at the
# first call ("Skip inlining `torch.compiler.disable()`d function"): cached rows compile with graph breaks.
COMPILE_FP8_CACHED = COMPILE_FP8.model_copy(update={"fullgraph": False})


@dataclass(frozen=True)
class Variant:
    name: str
    performance: Performance = field(default_factory=Performance)
    model: str = "dev"  # "dev" | "schnell" | "kontext" (FLUX.1 Kontext [dev]) | "klein" (FLUX.2 [klein] 4B)
    references: int = 0  # 0: text-to-image; n: an edit with n references
    path: str = "factory"  # "diffusers": a direct pipe(...) call; "factory": FluxGenerator; "hotswap"
    batch: int = 1
    reference: str | None = "factory plain"  # the plain bf16 row its drift is measured against
    twin: str | None = None  # a cached row's run without the cache: identical output means no step was skipped
    aim: float | None = None  # seconds per image (for the hot-swap row: switch milliseconds)
    needs_flag: str | None = None  # run only with this command-line flag
    small_only: bool = False  # eager CPU checks of options that the GPU rows only run compiled + FP8


def variants() -> list[Variant]:
    """In run order: the aims' rows first, so a run cut by the time budget loses the least important ones."""
    return [
        Variant("plain diffusers", path="diffusers"),
        Variant("factory plain", reference=None),
        Variant("compile regional", Performance(compile="regional")),
        Variant("compile regional + FP8", COMPILE_FP8, aim=3.0),
        Variant("FBC 0.08 + compile + FP8", cached(COMPILE_FP8_CACHED, FirstBlockCache(threshold=0.08)), aim=2.0,
                twin="compile regional + FP8"),
        Variant("TaylorSeer + compile + FP8", cached(COMPILE_FP8_CACHED, TaylorSeerCache()), aim=2.0,
                twin="compile regional + FP8"),
        Variant("MagCache + compile + FP8", cached(COMPILE_FP8_CACHED, MagCache()), aim=2.0,
                twin="compile regional + FP8"),
        Variant("schnell plain", model="schnell", reference=None),
        Variant("schnell compile + FP8", COMPILE_FP8, model="schnell", reference="schnell plain", aim=0.5),
        Variant("LoRA hot-swap (compiled)", COMPILE_FP8, path="hotswap",
                reference=None, aim=50.0),
        Variant("klein plain", model="klein", reference=None),
        # The published figure (third party): FLUX.2 [klein] 4B at 1024x1024, 4 steps, ~0.57 s on one H100.
        Variant("klein compile + FP8", COMPILE_FP8, model="klein", reference="klein plain", aim=0.57),
        Variant("klein edit, 1 reference", model="klein", references=1, reference=None),
        Variant("klein edit, 3 references", model="klein", references=3, reference=None),
        Variant("klein edit, 1 reference, compile + FP8", COMPILE_FP8, model="klein", references=1,
                reference="klein edit, 1 reference"),
        Variant("Kontext edit, 1 reference", model="kontext", references=1, reference=None),
        Variant("Kontext edit, compile + FP8", COMPILE_FP8, model="kontext", references=1,
                reference="Kontext edit, 1 reference"),
        Variant("compile + FP8 + fused QKV", COMPILE_FP8.model_copy(update={"fuse_qkv": True}), aim=3.0),
        Variant("compile + FP8 + cuDNN attention",
                COMPILE_FP8.model_copy(update={"attention_backend": "_native_cudnn"}), aim=3.0),
        Variant("batch of 4 (per image)", batch=4),
        Variant("compile full", Performance(compile="full"), needs_flag="compile_full"),
        Variant("fused QKV (eager, CPU check)", Performance(fuse_qkv=True), small_only=True),
        Variant("FBC 0.08 (eager, CPU check)", cached(Performance(), FirstBlockCache(threshold=0.08)),
                small_only=True, twin="factory plain"),
        Variant("TaylorSeer (eager, CPU check)", cached(Performance(), TaylorSeerCache()), small_only=True,
                twin="factory plain"),
        Variant("MagCache (eager, CPU check)", cached(Performance(), MagCache()), small_only=True,
                twin="factory plain"),
    ]


def cached(base: Performance, cache) -> Performance:
    return base.model_copy(update={"cache": cache})


def aim_text(variant: Variant) -> str:
    if variant.aim is None:
        return ""
    if variant.path == "hotswap":
        return f"switch <= {variant.aim:g} ms, 0 recompiles"
    return f"<= {variant.aim:g} s/image"


@dataclass
class Context:
    sizes: Sizes
    args: argparse.Namespace
    shared: Shared
    memory: PeakMemory
    peak_tflops: float
    started: float
    flops: dict[str, int] = field(default_factory=dict)  # per flops_key: one transformer forward at batch 1
    outputs: dict[str, tuple] = field(default_factory=dict)  # row name -> (first image's latents, image) on CPU
    noise: dict[str, Any] = field(default_factory=dict)  # model -> initial latents for SEED
    klein_parts: KleinShared | None = None

    def klein(self) -> KleinShared:
        if self.klein_parts is None:
            self.klein_parts = build_klein_shared(self.sizes)
            print(f"klein text encoder + VAE built in {self.klein_parts.seconds:.1f} s", flush=True)
        return self.klein_parts

    def steps(self, model: str) -> int:
        sizes = self.sizes
        return {"dev": sizes.dev_steps, "kontext": sizes.dev_steps, "schnell": sizes.schnell_steps,
                "klein": sizes.klein_steps}[model]

    def text_tokens(self, model: str) -> int:
        sizes = self.sizes
        return {"dev": sizes.dev_text_tokens, "kontext": sizes.dev_text_tokens, "schnell": sizes.schnell_text_tokens,
                "klein": sizes.klein_text_tokens}[model]

    def profile(self, model: str, performance: Performance, steps: int, references: int = 0):
        """The production profile's generator settings at this run's size, device and dtype (references at the
        output size), warming up the timed shape."""
        from factory.model.profiles import get_profile

        names = {"dev": "flux-dev", "schnell": "flux-schnell", "kontext": "flux-kontext", "klein": "flux2-klein"}
        base = get_profile(names[model]).generator
        sizes = self.sizes
        warmup = (WarmupShape(width=sizes.width, height=sizes.height, steps=steps, references=references),)
        update = {
            "device": sizes.device, "dtype": sizes.dtype, "width": sizes.width, "height": sizes.height,
            "steps": steps, "max_sequence_length": self.text_tokens(model),
            "performance": performance.model_copy(update={"warmup": warmup}),
        }
        if base.edit is not None:
            update["edit"] = base.edit.model_copy(update={"reference_pixels": sizes.width * sizes.height})
        if model == "klein":
            update["text_encoder_layers"] = sizes.klein_layers
        return base.model_copy(update=update)


def skip_reason(variant: Variant, ctx: Context) -> str | None:
    if variant.needs_flag and not getattr(ctx.args, variant.needs_flag):
        return f"skipped: slow (minutes of compile); pass --{variant.needs_flag.replace('_', '-')}"
    needs = variant.performance.cuda_requirements()
    if ctx.sizes.device != "cuda" and needs and variant.path != "hotswap":
        return f"skipped: needs CUDA ({', '.join(needs)})"
    elapsed = time.perf_counter() - ctx.started
    if elapsed > ctx.args.budget_s:
        return f"skipped: time budget ({elapsed:.0f} s > --budget-s {ctx.args.budget_s:g})"
    return None


def release() -> None:
    """Free the last variant's transformer and compiled code before the next one is built."""
    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def time_calls(ctx: Context, call: Callable[[], tuple]) -> tuple[list[float], list[tuple]]:
    """Up to --repeats timed calls, stopping once they took --variant-s seconds (at least one)."""
    seconds, outputs = [], []
    for _ in range(ctx.args.repeats):
        synchronize(ctx.sizes.device)
        started = time.perf_counter()
        latents, images = call()
        synchronize(ctx.sizes.device)
        seconds.append(time.perf_counter() - started)
        outputs.append((latents[:1].float().cpu(), images[:1].float().cpu()))
        if sum(seconds) > ctx.args.variant_s:
            break
    return seconds, outputs


def speed_figures(ctx: Context, key: str, steps: int, batch: int, seconds: list[float]) -> dict:
    per_call = statistics.median(seconds)
    tflops = ctx.flops[key] * steps * batch / per_call / 1e12
    return {"s_per_image": per_call / batch, "runs": len(seconds), "s_per_call_all": [round(s, 4) for s in seconds],
            "tflops": tflops, "peak_fraction": tflops / ctx.peak_tflops}


def run_plain_or_factory(variant: Variant, ctx: Context) -> dict:
    from factory.model.generator import EditParams, FluxGenerator, GenerationParams

    sizes, steps = ctx.sizes, ctx.steps(variant.model)
    key = flops_key(variant.model, variant.references)
    if key not in ctx.flops:
        ctx.flops[key] = transformer_flops(sizes, variant.model, ctx.text_tokens(variant.model), variant.references)
    profile = ctx.profile(variant.model, variant.performance, steps, variant.references)
    started = time.perf_counter()
    transformer = build_transformer(sizes, variant.model)
    pipe = assemble(ctx, transformer, variant.model)
    if variant.model in ("dev", "schnell") and variant.model not in ctx.noise:
        ctx.noise[variant.model] = initial_noise(pipe, sizes.width, sizes.height)
    params = [GenerationParams(PROMPT, SEED + i, steps, sizes.width, sizes.height, profile.guidance)
              for i in range(variant.batch)]
    if variant.path == "diffusers":
        def call():
            latents = pipe(prompt=[p.prompt for p in params], num_inference_steps=steps, width=sizes.width,
                           height=sizes.height, guidance_scale=profile.guidance,
                           generator=[torch.Generator("cpu").manual_seed(p.seed) for p in params],
                           max_sequence_length=profile.max_sequence_length, output_type="latent").images
            return latents, decode(pipe, latents, sizes.width, sizes.height)
        call()  # warm-up: the first call of this shape
        graphs = None
    else:
        generator = FluxGenerator.from_pipe(pipe, profile)
        generator.compile()
        generator.warm_up([variant.batch])  # the factory's own warm-up: one call per configured shape

        if variant.references:
            references = reference_images(sizes, variant.references)
            edits = generator.resolve_edits([
                EditParams(PROMPT, references, SEED + i, steps, generator.edit_guidance, sizes.width, sizes.height)
                for i in range(variant.batch)
            ])

            def call():
                latents = generator.call_edit_pipeline(edits, output_type="latent").images
                return latents, decode(generator.edit_pipe, latents, sizes.width, sizes.height)
        else:
            def call():
                latents = generator.call_pipeline(params, params[0].call_shape, output_type="latent").images
                return latents, decode(pipe, latents, sizes.width, sizes.height)
        graphs = generator.compile_stats
    synchronize(sizes.device)
    warmup_s = time.perf_counter() - started
    seconds, outputs = time_calls(ctx, call)
    latents, image = outputs[0]
    if not (torch.isfinite(latents).all() and torch.isfinite(image).all()):
        raise RuntimeError("non-finite latents or image (random weights overflowed)")
    ctx.outputs[variant.name] = (latents, image)
    row = speed_figures(ctx, key, steps, variant.batch, seconds)
    row.update(warmup_s=warmup_s, runs_agree=min(cosine(latents, other[0]) for other in outputs) > 0.99999)
    if graphs is not None and variant.performance.compile != "off":
        stats = graphs()
        row.update(graphs=stats["graphs"], recompiles=stats["recompiles_after_warmup"])
    return row


def make_adapters(ctx: Context, folder: Path) -> tuple[list, list[int]]:
    """10 random adapters on the attention projections at ranks up to 64, written once (not timed)."""
    from diffusers import FluxTransformer2DModel

    from factory.model.lora import AdapterRef, create_lora

    with torch.device("meta"):  # create_lora reads module names and shapes only
        skeleton = FluxTransformer2DModel(**ctx.sizes.transformer, guidance_embeds=True)
    ranks = [ctx.sizes.hotswap_ranks[i % len(ctx.sizes.hotswap_ranks)] for i in range(10)]
    return [AdapterRef(key=f"bench/a{i}", uri=str(create_lora(
        folder / f"a{i}.safetensors", transformer=skeleton, rank=rank, alpha=rank, seed=100 + i,
        dtype=ctx.sizes.dtype))) for i, rank in enumerate(ranks)], ranks


def hotswap_once(ctx: Context, performance: Performance, refs: list, ranks: list[int]) -> dict:
    """As a replica does it: options, hot-swap enabled at the largest rank, first adapter loaded, compile, warm up;
    then switch through all 10 adapters with one generation each."""
    from factory.model.generator import FluxGenerator, GenerationParams
    from factory.model.lora import LoraPool

    sizes, steps = ctx.sizes, ctx.sizes.hotswap_steps
    profile = ctx.profile("dev", performance, steps)
    started = time.perf_counter()
    pipe = assemble(ctx, build_transformer(sizes, "dev"), "dev")
    generator = FluxGenerator.from_pipe(pipe, profile)
    pool = LoraPool(pipe, max_adapters=1, hotswap_rank=max(ranks))
    pool.activate(refs[0])
    generator.compile()
    generator.warm_up([1])
    synchronize(sizes.device)
    warmup_s = time.perf_counter() - started
    params = [GenerationParams(PROMPT, SEED, steps, sizes.width, sizes.height, profile.guidance)]
    switch_ms, load_ms, seconds, latents = [], [], [], []
    for ref in [*refs[1:], refs[0]]:  # every switch lands on a different adapter than the one active
        loaded_before = pool.stats()["load_ms_total"]
        synchronize(sizes.device)
        begun = time.perf_counter()
        pool.activate(ref)  # read + check the file, swap its weights into the slot, make it active
        synchronize(sizes.device)
        switch_ms.append((time.perf_counter() - begun) * 1000)
        load_ms.append(pool.stats()["load_ms_total"] - loaded_before)  # of which diffusers' hot-swap load
        begun = time.perf_counter()
        out = generator.call_pipeline(params, params[0].call_shape, output_type="latent").images
        decode(pipe, out, sizes.width, sizes.height)
        synchronize(sizes.device)
        seconds.append(time.perf_counter() - begun)
        latents.append(out.float().cpu())
    stats, pool_stats = generator.compile_stats(), pool.stats()
    row = speed_figures(ctx, "dev", steps, 1, seconds)
    row.update(
        warmup_s=warmup_s, tag=generator.performance_tag, steps=steps, adapters=len(refs), ranks=ranks,
        hotswap_rank=max(ranks), switch_ms_median=statistics.median(switch_ms), switch_ms_max=max(switch_ms),
        switch_ms_all=[round(ms, 2) for ms in switch_ms], load_ms_median=statistics.median(load_ms),
        graphs=stats["graphs"], recompiles=stats["recompiles_after_warmup"], pool_loads=pool_stats["loads"],
        # Each adapter must change the image: neighbours in the switch order differ.
        adapters_differ=all(cosine(a, b) < 0.999999 for a, b in itertools.pairwise(latents)),
    )
    return row


def run_hotswap(variant: Variant, ctx: Context) -> dict:
    """Compiled regionally, with FP8 where it runs (CUDA) and works with LoRA; otherwise without, saying why."""
    sizes = ctx.sizes
    with tempfile.TemporaryDirectory(prefix="gpu-flux-adapters-") as folder:
        refs, ranks = make_adapters(ctx, Path(folder))
        notes = []
        if sizes.device == "cuda":
            try:
                return hotswap_once(ctx, variant.performance, refs, ranks)
            except Exception as error:  # noqa: BLE001 - reported in the row, then retried without FP8
                notes.append(f"fp8 dropped: {one_line(error)}")
            release()
        else:
            notes.append("fp8 skipped: needs CUDA")
        row = hotswap_once(ctx, variant.performance.model_copy(update={"quantization": "none"}), refs, ranks)
        row["note"] = "; ".join(notes)
        return row


def run_variant(variant: Variant, ctx: Context) -> dict:
    steps = ctx.sizes.hotswap_steps if variant.path == "hotswap" else ctx.steps(variant.model)
    performance = variant.performance
    row = {"name": variant.name, "mode": ctx.sizes.mode, "model": variant.model, "references": variant.references,
           "path": variant.path,
           "tag": performance.tag(), "batch": variant.batch, "steps": steps, "width": ctx.sizes.width,
           "height": ctx.sizes.height, "aim": aim_text(variant), "aim_value": variant.aim,
           "reference": variant.reference, "twin": variant.twin,
           "fullgraph": performance.compile_fullgraph if performance.compile != "off" else None}
    reason = skip_reason(variant, ctx)
    if reason:
        return row | {"status": "skipped", "reason": reason}
    print(f"  {variant.name} ...", flush=True)
    release()
    ctx.memory.reset()
    begun = time.perf_counter()
    try:
        figures = (run_hotswap if variant.path == "hotswap" else run_plain_or_factory)(variant, ctx)
    except Exception as error:  # noqa: BLE001 - one failing variant must not end the run
        release()
        return row | {"status": "failed", "reason": one_line(error), "seconds": time.perf_counter() - begun}
    row |= figures
    row.update(status="ok", peak_mem_mb=ctx.memory.peak_mb(), seconds=time.perf_counter() - begun)
    release()
    return row


def add_drift(rows: list[dict], ctx: Context) -> None:
    for row in rows:
        reference = ctx.outputs.get(row.get("reference") or "")
        mine = ctx.outputs.get(row["name"])
        if row["status"] != "ok" or reference is None or mine is None:
            continue
        psnr = psnr_db(mine[1], reference[1])
        row.update(cosine=cosine(mine[0], reference[0]), psnr_db=None if math.isinf(psnr) else psnr,
                   identical=math.isinf(psnr))
        twin = ctx.outputs.get(row.get("twin") or "")
        if twin is not None:
            row["twin_cosine"] = cosine(mine[0], twin[0])


def aim_met(row: dict) -> str:
    """Judged only at full size: the aims are for one H100/H200, not toy sizes on CPU."""
    if row["status"] != "ok" or row["aim_value"] is None or row["mode"] == "small":
        return ""
    if row["path"] == "hotswap":
        met = row["switch_ms_median"] <= row["aim_value"] and row["recompiles"] == 0
    else:
        met = row["s_per_image"] <= row["aim_value"]
    return "met" if met else "missed"


# ---- report --------------------------------------------------------------------------------------------------


def fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def table(rows: list[dict], ctx: Context) -> str:
    mem = "peak GPU MB" if ctx.sizes.device == "cuda" else "peak RSS MB"
    header = ["variant", "options", "s/image", "TFLOP/s", "% peak", mem, "warm-up s", "cosine", "PSNR dB", "aim",
              "note"]
    lines = []
    for row in rows:
        if row["status"] != "ok":
            lines.append([row["name"], row["tag"], row["reason"], "", "", "", "", "", "", row["aim"], ""])
            continue
        if row["path"] == "hotswap":
            cosine_text, psnr_text = "n/a", "n/a"
            note = (f"switch {row['switch_ms_median']:.1f} ms median (hot-swap load {row['load_ms_median']:.1f}), "
                    f"{row['switch_ms_max']:.1f} max; "
                    f"{row['recompiles']} recompiles over {row['adapters']} adapters; {row['steps']} steps"
                    + (f"; {row['note']}" if row.get("note") else ""))
        else:
            cosine_text = fmt(row.get("cosine"), ".6f")
            psnr_text = "inf" if row.get("identical") else fmt(row.get("psnr_db"), ".1f")
            notes = []
            if "recompiles" in row:
                notes.append(f"{row['recompiles']} recompiles after warm-up")
            if not row["runs_agree"]:
                notes.append("timed runs differ")
            if row["fullgraph"] is False:
                notes.append("fullgraph=False")
            if "twin_cosine" in row:
                same = row["twin_cosine"] > 0.999999
                notes.append(f"vs {row['twin']}: cosine {row['twin_cosine']:.6f}"
                             + (" (no step skipped)" if same else ""))
            if "cache=" in row["tag"]:
                notes.append("TFLOP/s nominal")
            note = "; ".join(notes)
        met = aim_met(row)
        lines.append([row["name"], row["tag"], f"{row['s_per_image']:.3f}", f"{row['tflops']:.3g}",
                      f"{100 * row['peak_fraction']:.1f}", fmt(row["peak_mem_mb"], ".0f", "n/a"),
                      f"{row['warmup_s']:.1f}", cosine_text, psnr_text,
                      row["aim"] + (f" ({met})" if met else ""), note])
    widths = [max(len(str(line[i])) for line in [header, *lines]) for i in range(len(header))]
    out = ["| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |",
           "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += ["| " + " | ".join(str(c).ljust(w) for c, w in zip(line, widths)) + " |" for line in lines]
    return "\n".join(out)


def environment(sizes: Sizes) -> dict:
    import diffusers
    import transformers

    try:
        import torchao

        torchao_version = torchao.__version__
    except ImportError:
        torchao_version = None
    device = torch.cuda.get_device_name() if sizes.device == "cuda" else \
        f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    return {"device": device, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "torchao": torchao_version,
            "python": platform.python_version(), "date": datetime.now(UTC).date().isoformat()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="toy sizes on CPU, float32 (a code-path check)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per variant (median)")
    parser.add_argument("--variant-s", type=float, default=30.0, help="stop timing a variant after this many seconds")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="start no variant after this many seconds (default 420 on GPU, 150 with --small)")
    parser.add_argument("--compile-full", action="store_true", help="also torch.compile the whole transformer")
    parser.add_argument("--only", nargs="+", default=None, help="run only variants whose name contains one of these")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice; 1 with --small, where a shared 2-core "
                        "machine makes two threads spin against other processes)")
    args = parser.parse_args()
    if args.threads or args.small:
        torch.set_num_threads(args.threads or 1)
    if args.budget_s is None:
        args.budget_s = 150.0 if args.small else 420.0

    from factory.logs import configure_logging, quiet_library_noise

    configure_logging("warning")
    quiet_library_noise()
    sizes = SMALL if args.small else FULL
    if sizes.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --small for the CPU code-path check")
    started = time.perf_counter()
    env = environment(sizes)
    print(f"FLUX speed options ({sizes.mode}: {sizes.width}x{sizes.height}, dev {sizes.dev_steps} steps, schnell "
          f"{sizes.schnell_steps}, {sizes.dtype}) on {env['device']}; torch {env['torch']}, diffusers "
          f"{env['diffusers']}, torchao {env['torchao']}", flush=True)
    peak = matmul_peak_tflops(sizes)
    print(f"matmul peak: {peak:.3g} TFLOP/s ({sizes.dtype} {sizes.matmul_n}^2 torch.mm)", flush=True)
    shared = build_shared(sizes)
    print(f"shared text encoders + VAE built in {shared.seconds:.1f} s", flush=True)
    ctx = Context(sizes, args, shared, PeakMemory(sizes.device), peak, started)
    ctx.flops = {model: transformer_flops(sizes, model, ctx.text_tokens(model)) for model in ("dev", "schnell")}
    rows = []
    for variant in variants():
        if args.only and not any(text in variant.name for text in args.only):
            continue
        if variant.small_only and not args.small:  # the GPU rows run these options compiled + FP8
            continue
        rows.append(run_variant(variant, ctx))
        if rows[-1]["status"] == "failed":
            print(f"    failed: {rows[-1]['reason']}", flush=True)
    add_drift(rows, ctx)
    elapsed = time.perf_counter() - started

    print()
    print(table(rows, ctx))
    print()
    for model, flops in ctx.flops.items():
        print(f"one {model} transformer step at {sizes.width}x{sizes.height}, batch 1: {flops / 1e12:.4g} TFLOP "
              "(attention = QK^T and PV products; softmax and elementwise not counted)")
    moved = {}
    for model, name in (("dev", "factory plain"), ("schnell", "schnell plain")):
        if name in ctx.outputs and model in ctx.noise:
            final = ctx.outputs[name][0]
            moved[model] = float((final - ctx.noise[model]).norm() / ctx.noise[model].norm())
            print(f"{model}: final latents moved {moved[model]:.2f}x the norm of their starting noise (drift sees "
                  "the network, not just the shared noise)")
    print(NOTE)
    print("Aims (one H100/H200, 1024x1024): compile+FP8 <= 3.0 s/image, with caching <= 2.0 s, schnell (4 steps) "
          "<= 0.5 s, adapter switch <= 50 ms with 0 recompiles over 10 adapters; FLUX.2 [klein] 4B (4 steps) "
          "compile+FP8 <= 0.57 s, the published third-party H100 figure.")
    if sizes.mode == "small":
        print("--small: toy sizes on CPU in float32: a check that every code path runs, not a speed figure; "
              "the aims apply only to the full-size GPU run.")
    print("% peak: against the bf16 matmul peak (fp32 on CPU), FP8 rows too (FP8 matmuls can run up to ~2x it)")
    print(f"peak memory column: {ctx.memory.kind}, reset per variant (includes the shared encoders and VAE)")
    print(f"elapsed: {elapsed:.1f} s (budget {args.budget_s:g} s for starting variants)")
    if args.json:
        result = {"mode": sizes.mode, "environment": env, "matmul_peak_tflops": peak,
                  "matmul": f"{sizes.dtype} {sizes.matmul_n}^2 torch.mm", "memory": ctx.memory.kind,
                  "transformer_tflop_per_step": {m: f / 1e12 for m, f in ctx.flops.items()},
                  "latents_moved": moved, "shared_build_s": shared.seconds, "elapsed_s": elapsed,
                  "sizes": {"width": sizes.width, "height": sizes.height, "dev_steps": sizes.dev_steps,
                            "schnell_steps": sizes.schnell_steps, "klein_steps": sizes.klein_steps,
                            "hotswap_steps": sizes.hotswap_steps},
                  "note": NOTE, "rows": rows}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
