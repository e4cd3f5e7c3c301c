"""CLIPScore: the factory's scorer equals torchmetrics' CLIPScore called with the same tiny CLIP checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from factory.errors import ModelError
from factory.model import clip
from factory.model.clip import ClipScorer
from factory.model.profiles import CLIPSCORE_MODEL, PROFILES, ClipProfile
from factory.model.stack import model_version
from factory.model.tiny import build_clip, tree_digest

# Long enough to pass CLIP's 77 text positions: both sides must cut it the same way.
LONG_PROMPT = "a cat sleeping on a sofa next to a window in the morning light, " * 10
PROMPTS = ["a photo of a red bicycle leaning on a wall", "a cup of coffee with latte art", LONG_PROMPT, ""]


@pytest.fixture(scope="module")
def clip_folder(tiny_path):
    return tiny_path / "clip"


@pytest.fixture(scope="module")
def images(sample_images):
    photos = [Image.open(sample_images[name]).convert("RGB") for name in ("astronaut", "chelsea", "coffee")]
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (90, 200, 3), dtype=np.uint8))
    return [*photos, noise]


def _scorer(folder, **profile) -> ClipScorer:
    return ClipScorer.from_pretrained(folder, ClipProfile(source=str(folder), **({"dtype": "float32",
                                                                                 "device": "cpu"} | profile)))


def _torchmetrics_score(folder, image: Image.Image, text: str, *, negate_image_projection: bool = False) -> float:
    """torchmetrics' CLIPScore of one pair, with the checkpoint loaded the way torchmetrics loads it."""
    from torchmetrics.multimodal.clip_score import CLIPScore
    from transformers import CLIPModel, CLIPProcessor

    class FeaturesAsTensors(CLIPModel):
        # torchmetrics 1.9.0, the latest release, reads get_*_features as tensors; transformers 5 returns an output
        # whose pooler_output is that tensor (torchmetrics issue 3407, fixed after 1.9.0 by PR 3408 doing this).
        def get_image_features(self, *args, **kwargs):
            return super().get_image_features(*args, **kwargs).pooler_output

        def get_text_features(self, *args, **kwargs):
            return super().get_text_features(*args, **kwargs).pooler_output

    def load():
        model = FeaturesAsTensors.from_pretrained(folder)
        if negate_image_projection:
            model.visual_projection.weight.data.neg_()
        return model, CLIPProcessor.from_pretrained(folder)

    metric = CLIPScore(model_name_or_path=load)
    with torch.no_grad():
        return float(metric(torch.from_numpy(np.array(image)).permute(2, 0, 1), text))


def test_tiny_clip_is_the_real_class_built_deterministically(tmp_path, clip_folder):
    from transformers import CLIPImageProcessorPil, CLIPModel

    build_clip(tmp_path / "clip")
    assert tree_digest(tmp_path / "clip") == tree_digest(clip_folder)
    scorer = _scorer(clip_folder)
    assert type(scorer.model) is CLIPModel
    assert isinstance(scorer.processor.image_processor, CLIPImageProcessorPil)
    assert scorer.max_text_tokens == 77


def test_scores_equal_torchmetrics_clipscore(clip_folder, images):
    scores = _scorer(clip_folder).score(images, PROMPTS)
    expected = [_torchmetrics_score(clip_folder, image, text) for image, text in zip(images, PROMPTS)]
    assert scores == pytest.approx(expected, abs=1e-4)
    assert all(0 < score <= 100 for score in scores)
    assert len(set(np.round(scores, 3))) == len(scores)  # four different pairs, four different scores


def test_opposed_embeddings_score_zero(clip_folder, images):
    scorer = _scorer(clip_folder)
    scorer.model.visual_projection.weight.data.neg_()  # every image embedding now points away from its text
    scores = scorer.score(images[:2], PROMPTS[:2])
    assert scores == [0.0, 0.0]
    assert [_torchmetrics_score(clip_folder, image, text, negate_image_projection=True)
            for image, text in zip(images[:2], PROMPTS[:2])] == [0.0, 0.0]


def test_bfloat16_weights_score_close_to_float32(clip_folder, images):
    exact = _scorer(clip_folder).score(images, PROMPTS)
    scorer = _scorer(clip_folder, dtype="bfloat16")
    assert scorer.model.dtype is torch.bfloat16
    assert scorer.score(images, PROMPTS) == pytest.approx(exact, abs=2.0)


def test_batches_must_pair_images_with_texts(clip_folder, images):
    scorer = _scorer(clip_folder)
    assert scorer.score([], []) == []
    with pytest.raises(ModelError, match="2 images but 1 texts"):
        scorer.score(images[:2], PROMPTS[:1])


def test_profiles_name_their_clip_model_outside_the_components(tiny_path):
    tiny = PROFILES["tiny"].quality.clip
    assert (tiny.source, tiny.dtype, tiny.device) == ("tiny", "float32", "cpu")
    assert clip.clip_source(tiny, tiny_path.parent.parent) == str(tiny_path / "clip")
    for name in ("flux-dev", "flux-schnell"):
        profile = PROFILES[name]
        assert profile.quality.clip.source == CLIPSCORE_MODEL == "openai/clip-vit-large-patch14"
        assert clip.load_options(profile.quality.clip) == {"revision": None, "dtype": torch.bfloat16,
                                                           "use_safetensors": True}
        # A scoring model neither changes what results say made them nor gets resolved for jobs that do not score.
        assert "quality" not in profile.components
        assert "clip" not in model_version(profile)


def test_a_folder_without_a_clip_model_is_a_one_line_error(tmp_path):
    with pytest.raises(ModelError, match=r"^clip .*: cannot load: [^\n]*$"):
        ClipScorer.from_pretrained(tmp_path, ClipProfile(source=str(tmp_path), device="cpu"))
