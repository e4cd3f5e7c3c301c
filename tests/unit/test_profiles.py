from __future__ import annotations

import pytest
import torch

from factory.errors import ConfigError
from factory.model import generator, vlm
from factory.model.profiles import PROFILES, get_profile
from factory.model.stack import resolve_sources


@pytest.mark.parametrize(
    ("name", "source", "steps", "guidance"),
    [("flux-dev", "black-forest-labs/FLUX.1-dev", 28, 3.5), ("flux-schnell", "black-forest-labs/FLUX.1-schnell", 4, 0.0)],
)
def test_production_profiles_resolve_to_real_checkpoints_in_bf16(name, source, steps, guidance):
    profile = get_profile(name)
    gen_source, vlm_source, version = resolve_sources(profile)
    assert gen_source == source and vlm_source == "Qwen/Qwen2.5-VL-3B-Instruct"
    assert version == f"{source}@main+Qwen/Qwen2.5-VL-3B-Instruct@main"
    assert generator.PIPELINE_CLASSES[profile.generator.family] == "FluxPipeline"
    assert vlm.AUTO_MODEL_CLASS == "AutoModelForImageTextToText"
    assert generator.load_options(profile.generator) == {"revision": None, "dtype": torch.bfloat16, "use_safetensors": True}
    assert vlm.load_options(profile.vlm)["dtype"] is torch.bfloat16
    assert (profile.generator.steps, profile.generator.guidance) == (steps, guidance)
    assert profile.generator.device == "auto" and (profile.generator.width, profile.generator.height) == (1024, 1024)


def test_tiny_is_float32_on_cpu_and_resolves_to_the_built_folders(tiny_path):
    profile = PROFILES["tiny"]
    gen_source, vlm_source, version = resolve_sources(profile, tiny_path.parent.parent)
    assert gen_source == str(tiny_path / "flux") and vlm_source == str(tiny_path / "vlm")
    assert version.startswith("tiny-")
    assert generator.load_options(profile.generator)["dtype"] is torch.float32


def test_unknown_profile_is_a_clear_error():
    with pytest.raises(ConfigError, match="unknown profile 'nope'"):
        get_profile("nope")
