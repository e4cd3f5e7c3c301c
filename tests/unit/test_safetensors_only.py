"""Every model load refuses a pickle checkpoint: a folder whose weights are only `*.bin` files is refused with one
line naming the model. The `.bin` files hold the real weights (`torch.save` of the same tensors), so a loader that
fell back to pickle would load them and these tests would fail."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from factory.errors import ModelError
from factory.model.profiles import PROFILES
from factory.model.stack import ModelStack
from factory.safety.detectors import HFImageClassifierDetector
from tests.builders import save_tiny_vit

# The pickle file each library looks for when its safetensors file is missing.
_PICKLE_NAMES = {"model.safetensors": "pytorch_model.bin",
                 "diffusion_pytorch_model.safetensors": "diffusion_pytorch_model.bin"}


def pickle_only(folder: Path) -> Path:
    """The checkpoint under `folder` with its safetensors weights rewritten as pickle files."""
    files = list(folder.rglob("*.safetensors"))
    assert files, f"no safetensors weights under {folder}"
    for file in files:
        torch.save(load_file(file), file.with_name(_PICKLE_NAMES[file.name]))
        file.unlink()
    return folder


def tiny_with(**sources: str):
    tiny = PROFILES["tiny"]
    return tiny.model_copy(update={
        name: getattr(tiny, name).model_copy(update={"source": source}) for name, source in sources.items()
    })


@pytest.mark.parametrize("component", ["transformer", "text_encoder"])  # a diffusers and a transformers model
def test_the_generator_refuses_a_pickle_component(tiny_path, tmp_path, component):
    flux = Path(shutil.copytree(tiny_path / "flux", tmp_path / "flux"))
    pickle_only(flux / component)
    with pytest.raises(ModelError) as refused:
        ModelStack.from_profile(tiny_with(generator=str(flux), vlm=str(tiny_path / "vlm")))
    message = str(refused.value)
    assert "\n" not in message and str(flux) in message and "safetensors" in message


def test_the_vlm_refuses_a_pickle_checkpoint(tiny_path, tmp_path):
    vlm = pickle_only(Path(shutil.copytree(tiny_path / "vlm", tmp_path / "vlm")))
    with pytest.raises(ModelError) as refused:
        ModelStack.from_profile(tiny_with(generator=str(tiny_path / "flux"), vlm=str(vlm)))
    message = str(refused.value)
    assert "\n" not in message and str(vlm) in message and "safetensors" in message


def test_the_safety_classifier_refuses_a_pickle_checkpoint(tmp_path):
    vit = pickle_only(save_tiny_vit(tmp_path / "vit"))
    with pytest.raises(ModelError) as refused:
        HFImageClassifierDetector(vit, local_files_only=True).load()
    message = str(refused.value)
    assert "\n" not in message and str(vit) in message and "safetensors" in message
