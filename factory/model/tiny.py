"""Build the `tiny` profile's checkpoints offline: real architectures, small random weights, fixed seed.

The result is saved with `save_pretrained` into `FACTORY_HOME/tiny/<builder version>/` and from then on loaded
with `from_pretrained` exactly like a downloaded checkpoint. Building twice gives bit-identical files: weights
come from a seeded generator, tokenizers are trained on a fixed corpus, and nothing time-dependent is written.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path

import structlog

from factory.paths import factory_home

log = structlog.get_logger(__name__)

# Bump when the builder's output changes, so caches built by an older builder are not reused.
BUILDER_VERSION = "1"
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
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    clip_tokenizer, t5_tokenizer = _clip_tokenizer(), _t5_tokenizer()
    text_dim = 32

    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(clip_tokenizer), hidden_size=text_dim, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=77, projection_dim=text_dim,
            bos_token_id=clip_tokenizer.bos_token_id, eos_token_id=clip_tokenizer.eos_token_id,
            pad_token_id=clip_tokenizer.pad_token_id,
        )
    )
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
        CLIPImageProcessorPil, CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor,
        PreTrainedTokenizerFast, Qwen2Config,
    )

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"]
    bpe = _train_bpe(640, specials)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, model_max_length=2048, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        padding_side="left",  # decoder-only generation needs left padding in a batch
        extra_special_tokens={"image_token": "<image>"},
    )
    image_size, patch_size = 64, 16
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=_CHAT_TEMPLATE,
        patch_size=patch_size, vision_feature_select_strategy="default", num_additional_image_tokens=1,
        image_token="<image>",
    )
    torch.manual_seed(seed + 10)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            image_size=image_size, patch_size=patch_size, projection_dim=32,
        ),
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


def tree_digest(path: Path) -> str:
    """sha256 over every file's relative path and bytes: equal digests mean bit-identical builds."""
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(file.relative_to(path).as_posix().encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()


def ensure_tiny(home: Path | None = None, *, force: bool = False) -> Path:
    """Build the tiny checkpoints once into the cache; concurrent builders race safely via a rename."""
    target = tiny_dir(home)
    if (target / "BUILD.json").exists() and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".build-", dir=target.parent))
    try:
        from factory.logs import quiet_library_noise

        quiet_library_noise()
        log.info("building tiny checkpoints", path=str(target))
        build_flux(staging / "flux")
        build_vlm(staging / "vlm")
        manifest = {"builder_version": BUILDER_VERSION, "seed": DEFAULT_SEED,
                    "flux": tree_digest(staging / "flux"), "vlm": tree_digest(staging / "vlm")}
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
