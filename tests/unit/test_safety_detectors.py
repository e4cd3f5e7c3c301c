"""Detectors on real photos from scikit-image: the real NudeNet model and a tiny random ViT checkpoint."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.builders import save_tiny_vit
from PIL import Image
from skimage import data

from factory.errors import ConfigError, ModelError
from factory.safety.detectors import (
    Detection,
    HFImageClassifierDetector,
    ImageDetector,
    NudeNetDetector,
    build_detector,
)


def photo(name: str) -> Image.Image:
    return Image.fromarray(getattr(data, name)())


def as_dict(detections: list[Detection]) -> dict[str, float]:
    return {found.label: found.score for found in detections}


def assert_same(left: list[list[Detection]], right: list[list[Detection]], tol: float = 1e-4) -> None:
    assert len(left) == len(right)
    for one, other in zip(left, right, strict=True):
        assert [found.label for found in one] == [found.label for found in other]
        assert [found.score for found in one] == pytest.approx([found.score for found in other], abs=tol)


@pytest.fixture(scope="module")
def nudenet() -> NudeNetDetector:
    detector = NudeNetDetector()
    detector.load()
    return detector


# --- NudeNet ---------------------------------------------------------------------------------------


def test_nudenet_loads_lazily_once_with_configured_threads() -> None:
    detector = NudeNetDetector(intra_op_threads=1)
    assert detector._session is None  # building is free: safe to do in a driver
    assert detector.detect([]) == []
    assert detector._session is None
    detector.load()
    session = detector._session
    assert session is not None
    assert session.get_session_options().intra_op_num_threads == 1
    detector.detect([photo("chelsea")])
    detector.load()
    assert detector._session is session


def test_nudenet_labels_come_from_the_model(nudenet: NudeNetDetector) -> None:
    labels = nudenet.labels
    assert len(labels) == 18
    assert {"FEMALE_BREAST_EXPOSED", "FEMALE_GENITALIA_EXPOSED", "FACE_FEMALE", "FACE_MALE"} <= set(labels)
    assert isinstance(nudenet, ImageDetector)


def test_nudenet_scores_real_photos(nudenet: NudeNetDetector) -> None:
    astronaut, chelsea, coffee = nudenet.detect([photo("astronaut"), photo("chelsea"), photo("coffee")])
    assert [found.label for found in astronaut] == ["FACE_FEMALE"]
    assert astronaut[0].score == pytest.approx(0.72, abs=0.02)
    assert chelsea == []
    assert coffee == []


def test_nudenet_matches_the_reference_package(nudenet: NudeNetDetector, tmp_path: Path) -> None:
    from nudenet import NudeDetector

    reference = NudeDetector()
    names = ["astronaut", "camera", "horse", "colorwheel", "chelsea", "coffee", "rocket"]
    images = []
    for name in names:
        image = photo(name).convert("RGB")
        image.save(tmp_path / f"{name}.png")
        images.append(image)
    ours = nudenet.detect(images)
    seen_any = False
    for name, found in zip(names, ours, strict=True):
        expected: dict[str, float] = {}
        for hit in reference.detect(str(tmp_path / f"{name}.png")):
            expected[hit["class"]] = max(expected.get(hit["class"], 0.0), hit["score"])
        assert as_dict(found) == pytest.approx(expected, abs=1e-3), name
        seen_any |= bool(expected)
    assert seen_any  # the comparison must not pass by both sides seeing nothing


def test_nudenet_batch_equals_single(nudenet: NudeNetDetector) -> None:
    # Different sizes, aspect ratios and modes in one batch.
    images = [photo(name) for name in ("astronaut", "camera", "horse", "coffee", "chelsea", "colorwheel")]
    single = [nudenet.detect([image])[0] for image in images]
    assert any(single)
    assert_same(nudenet.detect(images), single)
    chunked = NudeNetDetector(max_batch=4)
    assert_same(chunked.detect(images), single)


def test_nudenet_accepts_any_pil_mode(nudenet: NudeNetDetector) -> None:
    gray = photo("camera")
    assert gray.mode == "L"
    rgb = gray.convert("RGB")
    rgba = photo("astronaut").convert("RGBA")
    palette = photo("astronaut").convert("P")
    found = nudenet.detect([gray, rgb, rgba, palette, palette.convert("RGB")])
    assert found[0] == found[1] and found[0]  # FACE_MALE on the cameraman
    assert found[2] == nudenet.detect([photo("astronaut")])[0]  # alpha is dropped, not composited
    # Quantising to 256 colours changes what the model sees; the palette image must score as its RGB form.
    assert found[3] == found[4] and found[3]


def test_nudenet_rgb_channel_order_changes_scores(nudenet: NudeNetDetector) -> None:
    astronaut = photo("astronaut")
    bgr = nudenet.detect([astronaut])[0]
    rgb = NudeNetDetector(channel_order="rgb").detect([astronaut])[0]
    assert rgb[0].label == bgr[0].label == "FACE_FEMALE"
    assert abs(rgb[0].score - bgr[0].score) > 0.01


def test_nudenet_rejects_bad_settings_and_missing_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        NudeNetDetector(resolution=300)
    with pytest.raises(ConfigError):
        NudeNetDetector(max_batch=0)
    with pytest.raises(ModelError, match="not found"):
        NudeNetDetector(model_path=tmp_path / "missing.onnx").load()
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a model")
    with pytest.raises(ModelError):
        NudeNetDetector(model_path=broken).detect([photo("chelsea")])


# --- build_detector --------------------------------------------------------------------------------


def test_build_detector_picks_the_kind(tmp_path: Path) -> None:
    nude = build_detector("NudeNet", intra_op_threads=2)
    assert isinstance(nude, NudeNetDetector) and nude.intra_op_threads == 2
    onnx = build_detector(str(tmp_path / "640m.onnx"), resolution=640)
    assert isinstance(onnx, NudeNetDetector) and onnx.model_path == tmp_path / "640m.onnx"
    assert onnx.resolution == 640
    hf = build_detector("someone/vit-nsfw", max_batch=8)
    assert isinstance(hf, HFImageClassifierDetector) and hf.name_or_path == "someone/vit-nsfw"
    assert hf._model is None  # nothing loaded yet
    with pytest.raises(ConfigError, match="bad options"):
        build_detector("nudenet", thread=3)
    with pytest.raises(ConfigError):
        build_detector("  ")


# --- transformers image classifier -----------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_vit(tmp_path_factory.mktemp("vit"))


def test_hf_classifier_scores_every_label_batched(tiny_vit: Path) -> None:
    detector = build_detector(str(tiny_vit), local_files_only=True)
    assert isinstance(detector, HFImageClassifierDetector)
    images = [photo("astronaut"), photo("camera"), photo("coffee").convert("RGBA")]
    batch = detector.detect(images)
    assert detector.labels == ("normal", "nsfw")
    assert len(batch) == 3
    for found in batch:
        assert {item.label for item in found} == {"normal", "nsfw"}
        assert sum(item.score for item in found) == pytest.approx(1.0, abs=1e-5)
        assert found[0].score >= found[1].score
    assert_same(batch, [detector.detect([image])[0] for image in images], tol=1e-5)
    assert_same(HFImageClassifierDetector(tiny_vit, max_batch=2).detect(images), batch, tol=1e-5)


def test_hf_classifier_maps_labels_and_activation(tmp_path: Path) -> None:
    softmax = HFImageClassifierDetector(save_tiny_vit(tmp_path / "soft", bias=(0.0, 4.0)))
    found = softmax.detect([photo("chelsea")])[0]
    assert [item.label for item in found] == ["nsfw", "normal"]
    assert found[0].score == pytest.approx(float(np.exp(4) / (1 + np.exp(4))), abs=1e-5)
    assert found[1].score == pytest.approx(float(1 / (1 + np.exp(4))), abs=1e-5)

    sigmoid = HFImageClassifierDetector(save_tiny_vit(tmp_path / "multi", bias=(0.0, 4.0), multi_label=True))
    found = sigmoid.detect([photo("chelsea")])[0]
    assert as_dict(found) == pytest.approx({"nsfw": float(1 / (1 + np.exp(-4))), "normal": 0.5}, abs=1e-5)


def test_hf_classifier_missing_checkpoint_is_a_model_error(tmp_path: Path) -> None:
    detector = HFImageClassifierDetector(tmp_path / "nothing-here", local_files_only=True)
    with pytest.raises(ModelError, match="cannot load image classifier"):
        detector.detect([photo("chelsea")])
