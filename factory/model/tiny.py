"""Build the `tiny` and `tiny-flux2` profiles' checkpoints offline: real architectures, small random weights, fixed
seed.

The result is saved with `save_pretrained` into `FACTORY_HOME/tiny/<builder version>/` (and
`FACTORY_HOME/tiny-flux2/<its builder version>/` for the FLUX.2 [klein] generator) and from then on loaded
with `from_pretrained` exactly like a downloaded checkpoint. Building twice gives bit-identical files: weights
come from a seeded generator, tokenizers are trained on a fixed corpus, and nothing time-dependent is written.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import structlog

from factory.paths import factory_home

log = structlog.get_logger(__name__)

# Bump when the builder's output changes, so caches built by an older builder are not reused.
BUILDER_VERSION = "2"
DEFAULT_SEED = 0

# A fixed English corpus: the tokenizers learn real sub-words from it, so random generations read as words.
_CORPUS = """
a photo of a red bicycle leaning on a wall in the morning light. a bowl of fresh fruit on a wooden table.
a studio portrait of a smiling person with soft lighting. a city street at night with neon signs and rain.
an advertisement for running shoes, minimal style, white background, product in the center.
a cat sleeping on a sofa next to a window. a cup of coffee with latte art. mountains under a blue sky.
describe the image. what is in the picture? how many people are there? what color is the car?
the quick brown fox jumps over the lazy dog. bold colors, high contrast, clean layout, summer sale.
winter collection, cozy sweaters, warm tones. a plate of pasta with tomato sauce and basil leaves.
"""


def tiny_dir(home: Path | None = None) -> Path:
    return (home or factory_home()) / "tiny" / f"v{BUILDER_VERSION}-seed{DEFAULT_SEED}"


# The tiny FLUX.2 [klein] is built apart from tiny's checkpoints, with its own version: changing one never
# rebuilds (or re-keys the results of) the other.
FLUX2_BUILDER_VERSION = "1"


def tiny_flux2_dir(home: Path | None = None) -> Path:
    return (home or factory_home()) / "tiny-flux2" / f"v{FLUX2_BUILDER_VERSION}-seed{DEFAULT_SEED}"


def _train_bpe(vocab_size: int, special_tokens: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([line for line in _CORPUS.splitlines() if line], trainer=trainer)
    return tokenizer


def _clip_tokenizer():
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    bpe = _train_bpe(512, ["<|endoftext|>", "<|startoftext|>"])
    bos, eos = bpe.token_to_id("<|startoftext|>"), bpe.token_to_id("<|endoftext|>")
    # CLIP's text model pools at the EOS position, so every prompt must end with it.
    bpe.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>",
        special_tokens=[("<|startoftext|>", bos), ("<|endoftext|>", eos)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe, model_max_length=77, bos_token="<|startoftext|>",
        eos_token="<|endoftext|>", pad_token="<|endoftext|>", unk_token="<|endoftext|>",
    )


# The tiny CLIP towers: FLUX's text encoder, the VLM's vision tower and the CLIPScore model share these shapes.
_CLIP_DIM = 32
_CLIP_IMAGE_SIZE, _CLIP_PATCH_SIZE = 64, 16


def _clip_text_config(tokenizer):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=_CLIP_DIM, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=77, projection_dim=_CLIP_DIM,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )


def _clip_vision_config():
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=_CLIP_DIM, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        image_size=_CLIP_IMAGE_SIZE, patch_size=_CLIP_PATCH_SIZE, projection_dim=_CLIP_DIM,
    )


def _clip_image_processor():
    # The PIL processor: torchvision, which transformers' default image processors need, does not load here.
    from transformers import CLIPImageProcessorPil

    return CLIPImageProcessorPil(
        size={"shortest_edge": _CLIP_IMAGE_SIZE}, crop_size={"height": _CLIP_IMAGE_SIZE, "width": _CLIP_IMAGE_SIZE}
    )


def _t5_tokenizer():
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    bpe = _train_bpe(512, ["<pad>", "</s>", "<unk>"])
    bpe.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", bpe.token_to_id("</s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe, model_max_length=512, eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def build_flux(path: Path, seed: int = DEFAULT_SEED) -> None:
    """A FluxPipeline with the real component classes and a VAE with the real 8x downsampling."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    clip_tokenizer, t5_tokenizer = _clip_tokenizer(), _t5_tokenizer()
    text_dim = _CLIP_DIM

    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_clip_text_config(clip_tokenizer))
    torch.manual_seed(seed + 1)
    text_encoder_2 = T5EncoderModel(
        T5Config(
            vocab_size=len(t5_tokenizer), d_model=text_dim, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
            relative_attention_num_buckets=8, pad_token_id=t5_tokenizer.pad_token_id,
            eos_token_id=t5_tokenizer.eos_token_id, decoder_start_token_id=t5_tokenizer.pad_token_id,
        )
    )
    torch.manual_seed(seed + 2)
    latent_channels = 4
    vae = AutoencoderKL(
        in_channels=3, out_channels=3,
        # Four blocks: the real FLUX VAE's 8x spatial downsampling, so token counts match production shapes.
        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[8, 16, 16, 16], layers_per_block=1, norm_num_groups=8,
        latent_channels=latent_channels, use_quant_conv=False, use_post_quant_conv=False,
        shift_factor=0.0609, scaling_factor=1.5035, sample_size=256,
    )
    torch.manual_seed(seed + 3)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * latent_channels,  # FLUX packs 2x2 latent patches into the channel axis
        num_layers=1, num_single_layers=2, attention_head_dim=16, num_attention_heads=4,
        joint_attention_dim=text_dim, pooled_projection_dim=text_dim, guidance_embeds=True,
        axes_dims_rope=[4, 6, 6],
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096,
    )
    pipe = FluxPipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer,
        text_encoder_2=text_encoder_2, tokenizer_2=t5_tokenizer, transformer=transformer,
    )
    pipe.save_pretrained(path, safe_serialization=True)


# Qwen3's chat template, reduced to what Flux2KleinPipeline renders (one user message, a generation prompt, thinking
# off): the prompt then reads `<|im_start|>user ... <|im_end|> <|im_start|>assistant <think></think>` as in klein.
_QWEN3_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def _qwen_tokenizer():
    """A real `Qwen2Tokenizer` (Qwen's pre-tokenizer and byte-level BPE) trained by transformers on the fixed corpus,
    with Qwen3's special tokens and chat template."""
    from transformers import Qwen2Tokenizer

    tokenizer = Qwen2Tokenizer().train_new_from_iterator(
        [line for line in _CORPUS.splitlines() if line], vocab_size=512,
        new_special_tokens=["<|im_start|>", "<|im_end|>", "<think>", "</think>"],
    )
    tokenizer.chat_template = _QWEN3_CHAT_TEMPLATE
    return tokenizer


def build_flux2(path: Path, seed: int = DEFAULT_SEED) -> None:
    """A Flux2KleinPipeline with the real component classes: a Qwen3 text encoder whose three stacked hidden-state
    layers (profile `text_encoder_layers` (1, 2, 3), as klein stacks 9, 18, 27 of 36) make the prompt embedding, a
    FLUX.2 VAE with the real 8x downsampling and 2x2 patching, and a step-distilled transformer without guidance
    embedding, as klein 4B's. Its widths differ from tiny's FLUX.1, so a FLUX.1 adapter fits none of its layers."""
    import torch
    from diffusers import (
        AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Transformer2DModel,
    )
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tokenizer = _qwen_tokenizer()
    text_dim, layers = 16, 4
    torch.manual_seed(seed + 30)
    text_encoder = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=text_dim, intermediate_size=32, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=512,
        tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
    )).eval()
    torch.manual_seed(seed + 31)
    latent_channels = 8
    vae = AutoencoderKLFlux2(
        # Four blocks: 8x downsampling; the VAE's 2x2 patch makes 4 x latent_channels transformer channels.
        block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=8, latent_channels=latent_channels,
        sample_size=256, patch_size=(2, 2),
    )
    torch.manual_seed(seed + 32)
    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=4 * latent_channels, num_layers=1, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=3 * text_dim, timestep_guidance_channels=32,
        axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    pipe = Flux2KleinPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                              transformer=transformer, is_distilled=True)
    pipe.save_pretrained(path, safe_serialization=True)


_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _printable(text: str) -> bool:
    return bool(text) and all(32 <= ord(ch) < 127 for ch in text)


def build_vlm(path: Path, seed: int = DEFAULT_SEED) -> None:
    """A LLaVA-style VLM (CLIP vision tower + Qwen2 language model) with its processor and chat template."""
    import torch
    from transformers import (
        LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerFast, Qwen2Config,
    )

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"]
    bpe = _train_bpe(640, specials)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, model_max_length=2048, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        padding_side="left",  # decoder-only generation needs left padding in a batch
        extra_special_tokens={"image_token": "<image>"},
    )
    processor = LlavaProcessor(
        image_processor=_clip_image_processor(), tokenizer=tokenizer, chat_template=_CHAT_TEMPLATE,
        patch_size=_CLIP_PATCH_SIZE, vision_feature_select_strategy="default", num_additional_image_tokens=1,
        image_token="<image>",
    )
    torch.manual_seed(seed + 10)
    config = LlavaConfig(
        vision_config=_clip_vision_config(),
        text_config=Qwen2Config(
            vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.convert_tokens_to_ids("<|im_start|>"), tie_word_embeddings=False,
        ),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default", vision_feature_layer=-1,
    )
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.do_sample = False
    # Random weights pick byte-level pieces at random; suppressing the ones that are not printable ASCII
    # keeps tiny captions readable (random words), which matters for logs, demos and the Parquet output.
    model.generation_config.suppress_tokens = [
        token_id for token_id in range(len(tokenizer))
        if not _printable(tokenizer.decode([token_id])) and token_id != tokenizer.eos_token_id
    ]
    model.save_pretrained(path, safe_serialization=True)
    processor.save_pretrained(path)


def build_clip(path: Path, seed: int = DEFAULT_SEED) -> None:
    """A CLIPModel, the class CLIPScore scores with, with FLUX's CLIP tokenizer and text-encoder shapes and the VLM's
    vision-tower shapes, and its CLIPProcessor."""
    import torch
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor

    tokenizer = _clip_tokenizer()
    torch.manual_seed(seed + 20)
    config = CLIPConfig(
        text_config=_clip_text_config(tokenizer).to_dict(), vision_config=_clip_vision_config().to_dict(),
        projection_dim=_CLIP_DIM,
    )
    CLIPModel(config).eval().save_pretrained(path, safe_serialization=True)
    CLIPProcessor(image_processor=_clip_image_processor(), tokenizer=tokenizer).save_pretrained(path)


def tree_digest(path: Path) -> str:
    """sha256 over every file's relative path and bytes: equal digests mean bit-identical builds."""
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(file.relative_to(path).as_posix().encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()


def ensure_tiny(home: Path | None = None, *, force: bool = False) -> Path:
    """Build the tiny checkpoints once into the cache; concurrent builders race safely via a rename."""
    return _ensure_built(tiny_dir(home), {"flux": build_flux, "vlm": build_vlm, "clip": build_clip},
                         BUILDER_VERSION, force=force)


def ensure_tiny_flux2(home: Path | None = None, *, force: bool = False) -> Path:
    """Build the tiny FLUX.2 [klein] checkpoint once into the cache, as `ensure_tiny` builds tiny's."""
    return _ensure_built(tiny_flux2_dir(home), {"flux2": build_flux2}, FLUX2_BUILDER_VERSION, force=force)


def _ensure_built(target: Path, builders: dict[str, Callable[[Path], None]], version: str, *, force: bool) -> Path:
    """Run each builder into `target/<name>` unless a finished build is there; concurrent builders race safely
    via a rename, and BUILD.json (written last) records each part's digest."""
    if (target / "BUILD.json").exists() and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".build-", dir=target.parent))
    try:
        from factory.logs import quiet_library_noise

        quiet_library_noise()
        log.info("building tiny checkpoints", path=str(target))
        manifest: dict[str, str | int] = {"builder_version": version, "seed": DEFAULT_SEED}
        for name, build in builders.items():
            build(staging / name)
            manifest[name] = tree_digest(staging / name)
        (staging / "BUILD.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        if force and target.exists():
            shutil.rmtree(target)
        try:
            staging.rename(target)
        except OSError:
            # Another process finished first; its build is identical by construction.
            if not (target / "BUILD.json").exists():
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target
