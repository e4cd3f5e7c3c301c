"""The tiny profile: built offline, deterministic, and loaded through the real from_pretrained paths."""

from __future__ import annotations

import filecmp

from factory.model.tiny import build_flux, build_vlm, tree_digest


def test_building_twice_gives_identical_files(tmp_path, tiny_path):
    build_flux(tmp_path / "flux")
    build_vlm(tmp_path / "vlm")
    for part in ("flux", "vlm"):
        assert tree_digest(tmp_path / part) == tree_digest(tiny_path / part)
        files = sorted(p.relative_to(tmp_path / part) for p in (tmp_path / part).rglob("*") if p.is_file())
        assert files, f"{part} build wrote nothing"
        _, mismatch, errors = filecmp.cmpfiles(tmp_path / part, tiny_path / part, [str(f) for f in files], shallow=False)
        assert mismatch == [] and errors == []


def test_weights_are_safetensors_only(tiny_path):
    weights = [p for p in tiny_path.rglob("*") if p.suffix in {".bin", ".pt", ".ckpt", ".pth", ".safetensors"}]
    assert weights and all(p.suffix == ".safetensors" for p in weights)


def test_flux_round_trip_has_real_classes_and_shapes(stack):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5EncoderModel

    pipe = stack.generator.pipe
    assert type(pipe) is FluxPipeline
    assert isinstance(pipe.transformer, FluxTransformer2DModel)
    assert isinstance(pipe.vae, AutoencoderKL)
    assert isinstance(pipe.text_encoder, CLIPTextModel)
    assert isinstance(pipe.text_encoder_2, T5EncoderModel)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    assert pipe.vae_scale_factor == 8  # the real FLUX VAE downsampling
    assert pipe.transformer.config.in_channels == 4 * pipe.vae.config.latent_channels


def test_vlm_round_trip_through_auto_classes(tiny_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(tiny_path / "vlm")
    processor = AutoProcessor.from_pretrained(tiny_path / "vlm")
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert processor.chat_template
    rendered = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}],
        add_generation_prompt=True, tokenize=False,
    )
    assert "<image>" in rendered and rendered.endswith("assistant\n")
