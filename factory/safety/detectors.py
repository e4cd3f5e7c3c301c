"""Image detectors: turn a batch of PIL images into per-image label scores.

Two kinds ship:

* `NudeNetDetector` runs the YOLOv8 ONNX model that the `nudenet` package ships (`320n.onnx`), or any
  other NudeNet-format `.onnx` file, with onnxruntime directly. nudenet's own `NudeDetector` offers no way to
  pass onnxruntime session options (so it would take every core and fight torch in the same replica) and
  chunks `detect_batch` by 4; here the whole batch goes through one `session.run` call.
* `HFImageClassifierDetector` runs any transformers image-classification checkpoint (e.g. a ViT NSFW
  classifier) through the Auto classes.

Both load lazily, once per object, so a detector can be built cheaply in a driver and shipped to a Serve
replica or Ray worker, where `load()` is then called in setup.
"""

from __future__ import annotations

import ast
import threading
import time
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

import numpy as np
import structlog
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from factory.errors import ConfigError, ModelError

if TYPE_CHECKING:  # heavy imports stay out of module import time
    import onnxruntime

log = structlog.get_logger(__name__)

NUDENET = "nudenet"


class Detection(BaseModel):
    """One label a detector saw in one image, with its highest score in that image."""

    model_config = ConfigDict(frozen=True)

    label: str = Field(description="Detector-specific label, e.g. FEMALE_BREAST_EXPOSED or nsfw")
    score: float = Field(ge=0.0, le=1.0, description="Confidence in [0, 1]")


@runtime_checkable
class ImageDetector(Protocol):
    """What the safety layer needs from a detector.

    `detect` returns, for each input image in order, one `Detection` per label seen (highest score first).
    Implementations may also offer `load()` (load weights now instead of on first call) and `labels`
    (every label they can emit; `SafetyChecker.load` uses it to reject thresholds that name unknown labels).
    """

    def detect(self, images: Sequence[Image.Image]) -> list[list[Detection]]: ...


def _to_rgb(image: Image.Image) -> Image.Image:
    # Palette, greyscale, CMYK and alpha images all reach us from archives; detectors want plain RGB.
    # Alpha is dropped rather than composited, which is what nudenet does with a 4-channel image too.
    return image if image.mode == "RGB" else image.convert("RGB")


def _best_per_label(labels: Sequence[str], scores: Sequence[float]) -> list[Detection]:
    best: dict[str, float] = {}
    for label, score in zip(labels, scores, strict=True):
        if score > best.get(label, -1.0):
            best[label] = score
    ordered = sorted(best.items(), key=lambda item: item[1], reverse=True)
    return [Detection(label=label, score=min(max(score, 0.0), 1.0)) for label, score in ordered]


def _nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy non-maximum suppression over xyxy boxes; returns kept indices, best first.

    Class-agnostic on purpose: nudenet suppresses across classes, and matching it keeps the scores
    comparable with thresholds people have tuned against nudenet.
    """
    order = np.argsort(-scores, kind="stable")
    areas = np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None)
    keep: list[int] = []
    while order.size:
        best, rest = order[0], order[1:]
        keep.append(int(best))
        x1 = np.maximum(boxes[best, 0], boxes[rest, 0])
        y1 = np.maximum(boxes[best, 1], boxes[rest, 1])
        x2 = np.minimum(boxes[best, 2], boxes[rest, 2])
        y2 = np.minimum(boxes[best, 3], boxes[rest, 3])
        inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
        union = areas[best] + areas[rest] - inter
        iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
        order = rest[iou <= iou_threshold]
    return np.asarray(keep, dtype=np.int64)


class NudeNetDetector:
    """NudeNet's YOLOv8 detector (18 body-part labels), batched, on onnxruntime.

    Pre- and post-processing follow the nudenet package so that scores match `NudeDetector.detect` on the
    same file (a test holds this): pad right/bottom to a square, bilinear resize to `resolution`, scale to
    [0, 1]; keep anchors whose best class scores at least `min_score`; class-agnostic NMS.

    `channel_order="bgr"` reproduces what nudenet feeds the model for an image file (cv2 reads BGR, and its
    two channel swaps cancel out). Ultralytics models are usually trained on RGB; "rgb" is offered for
    profiles that have checked it against their own data, but the default stays with the reference.
    """

    def __init__(
        self,
        model_path: str | Path | None = None,
        *,
        resolution: int = 320,
        intra_op_threads: int = 1,
        inter_op_threads: int = 1,
        providers: Sequence[str] | None = None,
        min_score: float = 0.25,
        iou_threshold: float = 0.45,
        max_batch: int = 16,
        channel_order: Literal["bgr", "rgb"] = "bgr",
        memory_arena: bool = True,
    ) -> None:
        if resolution < 32 or resolution % 32:
            raise ConfigError(f"nudenet resolution must be a multiple of 32, got {resolution}")
        if intra_op_threads < 0 or inter_op_threads < 0:
            raise ConfigError("onnxruntime thread counts must be >= 0 (0 lets onnxruntime choose)")
        if max_batch < 1:
            raise ConfigError(f"max_batch must be >= 1, got {max_batch}")
        if channel_order not in ("bgr", "rgb"):
            raise ConfigError(f"channel_order must be 'bgr' or 'rgb', got {channel_order!r}")
        self.model_path = Path(model_path) if model_path else None
        self.resolution = resolution
        self.intra_op_threads = intra_op_threads
        self.inter_op_threads = inter_op_threads
        self.providers = list(providers) if providers else ["CPUExecutionProvider"]
        self.min_score = min_score
        self.iou_threshold = iou_threshold
        # Bounds activation memory (~tens of MB per image at 320²) for very large caller batches.
        self.max_batch = max_batch
        self.channel_order = channel_order
        # onnxruntime's CPU arena keeps peak activation memory for reuse: measured here, turning it off
        # halved RSS growth at batch 16 (+300 -> +145 MiB) for about 5-10 % more latency.
        self.memory_arena = memory_arena
        self._session: onnxruntime.InferenceSession | None = None
        self._input_name = ""
        self._labels: tuple[str, ...] = ()
        self._lock = threading.Lock()

    @property
    def labels(self) -> tuple[str, ...]:
        """Every label the model can emit (read from the ONNX metadata, so this loads the model)."""
        self.load()
        return self._labels

    def load(self) -> None:
        """Create the onnxruntime session now. Safe to call many times and from several threads."""
        if self._session is not None:
            return
        with self._lock:
            if self._session is not None:
                return
            import onnxruntime  # deferred: only replicas that check images pay for it

            path = self.model_path or Path(str(resources.files(NUDENET).joinpath("320n.onnx")))
            if not path.is_file():
                raise ModelError(f"nudenet model file not found: {path}")
            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads = self.intra_op_threads
            options.inter_op_num_threads = self.inter_op_threads
            options.enable_cpu_mem_arena = self.memory_arena
            started = time.perf_counter()
            try:
                session = onnxruntime.InferenceSession(str(path), options, providers=self.providers)
            except Exception as exc:  # onnxruntime raises several unrelated types for a bad file
                raise ModelError(f"cannot load nudenet model {path}: {exc}") from exc
            self._labels = self._read_labels(session)
            self._input_name = session.get_inputs()[0].name
            self._session = session
            log.info(
                "safety.detector.loaded",
                detector=NUDENET,
                path=str(path),
                labels=len(self._labels),
                intra_op_threads=self.intra_op_threads,
                providers=session.get_providers(),
                load_s=round(time.perf_counter() - started, 3),
            )

    @staticmethod
    def _read_labels(session: onnxruntime.InferenceSession) -> tuple[str, ...]:
        # Ultralytics exports store {index: name} as a Python-literal string; reading it from the file
        # keeps the labels right for any NudeNet-format model, not just the one nudenet ships.
        names = session.get_modelmeta().custom_metadata_map.get("names")
        if not names:
            raise ModelError("nudenet model has no 'names' metadata; cannot map classes to labels")
        mapping = ast.literal_eval(names)
        return tuple(mapping[i] for i in sorted(mapping))

    def detect(self, images: Sequence[Image.Image]) -> list[list[Detection]]:
        """Score each image; one `session.run` per `max_batch` images."""
        if not images:
            return []
        self.load()
        assert self._session is not None
        results: list[list[Detection]] = []
        for start in range(0, len(images), self.max_batch):
            chunk = images[start : start + self.max_batch]
            blobs, extents = zip(*(self._preprocess(image) for image in chunk), strict=True)
            (output,) = self._session.run(None, {self._input_name: np.stack(blobs)})
            results.extend(self._postprocess(output[i], extents[i]) for i in range(len(chunk)))
        return results

    def _preprocess(self, image: Image.Image) -> tuple[np.ndarray, tuple[float, float]]:
        """Image -> (CHW float32 blob, extent of the real image inside the blob in model pixels)."""
        import cv2  # a dependency of nudenet; its bilinear resize is what the model was scored with

        rgb = np.asarray(_to_rgb(image))
        height, width = rgb.shape[:2]
        side = max(height, width)
        square = np.zeros((side, side, 3), dtype=np.uint8)
        square[:height, :width] = rgb if self.channel_order == "rgb" else rgb[..., ::-1]
        resized = cv2.resize(square, (self.resolution, self.resolution), interpolation=cv2.INTER_LINEAR)
        blob = np.ascontiguousarray(resized.transpose(2, 0, 1), dtype=np.float32) / np.float32(255.0)
        scale = self.resolution / side
        return blob, (width * scale, height * scale)

    def _postprocess(self, output: np.ndarray, extent: tuple[float, float]) -> list[Detection]:
        # output: (4 + classes, anchors), boxes as centre x/y, width, height in model pixels.
        predictions = output.T
        class_scores = predictions[:, 4:]
        class_ids = class_scores.argmax(axis=1)
        scores = class_scores[np.arange(len(class_ids)), class_ids]
        keep = scores >= self.min_score
        if not keep.any():
            return []
        cx, cy, w, h = predictions[keep, :4].T
        # Clip to the real image, not the padding, so IoU is computed as nudenet computes it.
        max_x, max_y = extent
        boxes = np.stack(
            [
                np.clip(cx - w / 2, 0, max_x),
                np.clip(cy - h / 2, 0, max_y),
                np.clip(cx + w / 2, 0, max_x),
                np.clip(cy + h / 2, 0, max_y),
            ],
            axis=1,
        )
        kept = _nms(boxes, scores[keep], self.iou_threshold)
        kept_ids = class_ids[keep][kept]
        kept_scores = scores[keep][kept]
        return _best_per_label([self._labels[i] for i in kept_ids], [float(s) for s in kept_scores])


class HFImageClassifierDetector:
    """Any transformers image-classification checkpoint (local folder or hub id) as a detector.

    Every label in the model's `id2label` is returned for every image, highest score first. Scores are a
    softmax over labels, or per-label sigmoids when the config says `multi_label_classification`.

    The image processor is loaded with `backend="pil"` by default: transformers 5 otherwise prefers its
    torchvision backend, which cannot be imported beside the CPU torch on these machines.
    """

    def __init__(
        self,
        name_or_path: str | Path,
        *,
        device: str = "cpu",
        dtype: str | None = None,
        revision: str | None = None,
        local_files_only: bool = False,
        image_backend: str = "pil",
        max_batch: int = 32,
    ) -> None:
        if max_batch < 1:
            raise ConfigError(f"max_batch must be >= 1, got {max_batch}")
        self.name_or_path = str(name_or_path)
        self.device = device
        self.dtype = dtype
        self.revision = revision
        self.local_files_only = local_files_only
        self.image_backend = image_backend
        self.max_batch = max_batch
        self._model: Any = None
        self._processor: Any = None
        self._labels: tuple[str, ...] = ()
        self._lock = threading.Lock()

    @property
    def labels(self) -> tuple[str, ...]:
        """Every label the checkpoint can emit (from its config; this loads the model)."""
        self.load()
        return self._labels

    def load(self) -> None:
        """Load processor and model now. Safe to call many times and from several threads."""
        if self._model is not None:
            return
        with self._lock:
            if self._model is not None:
                return
            from transformers import AutoImageProcessor, AutoModelForImageClassification

            common: dict[str, Any] = {"revision": self.revision, "local_files_only": self.local_files_only}
            started = time.perf_counter()
            try:
                processor = AutoImageProcessor.from_pretrained(
                    self.name_or_path, backend=self.image_backend, **common
                )
                # safetensors only: a checkpoint that holds only pickle weights is refused, never unpickled.
                model_kwargs: dict[str, Any] = dict(common, use_safetensors=True)
                if self.dtype:
                    model_kwargs["dtype"] = self.dtype
                model = AutoModelForImageClassification.from_pretrained(self.name_or_path, **model_kwargs)
            except (OSError, ValueError, KeyError, ImportError) as exc:
                raise ModelError(f"cannot load image classifier {self.name_or_path!r}: {exc}") from exc
            model.to(self.device).eval()
            id2label = model.config.id2label
            self._labels = tuple(str(id2label[i]) for i in sorted(id2label))
            self._processor = processor
            self._model = model
            log.info(
                "safety.detector.loaded",
                detector=self.name_or_path,
                labels=list(self._labels),
                processor=type(processor).__name__,
                load_s=round(time.perf_counter() - started, 3),
            )

    def detect(self, images: Sequence[Image.Image]) -> list[list[Detection]]:
        """Classify each image; one forward pass per `max_batch` images."""
        if not images:
            return []
        self.load()
        import torch

        multi_label = self._model.config.problem_type == "multi_label_classification"
        results: list[list[Detection]] = []
        for start in range(0, len(images), self.max_batch):
            chunk = [_to_rgb(image) for image in images[start : start + self.max_batch]]
            inputs = self._processor(images=chunk, return_tensors="pt")
            pixel_values = inputs["pixel_values"].to(self.device, dtype=self._model.dtype)
            with torch.inference_mode():
                logits = self._model(pixel_values=pixel_values).logits.float()
            probs = logits.sigmoid() if multi_label else logits.softmax(dim=-1)
            for row in probs.cpu().tolist():
                results.append(_best_per_label(self._labels, row))
        return results


def build_detector(name_or_path: str | Path, **options: Any) -> ImageDetector:
    """Build a detector from a policy's `detector` value; nothing is loaded until first use.

    * "nudenet": the model that ships inside the nudenet package.
    * a path ending in ".onnx": another NudeNet-format model (e.g. nudenet's 640m.onnx; pass resolution=640).
    * anything else: a transformers image-classification checkpoint (local folder or hub id).

    `options` go to the detector's constructor; unknown ones raise `ConfigError`.
    """
    name = str(name_or_path).strip()
    if not name:
        raise ConfigError("safety detector name is empty")
    try:
        if name.lower() == NUDENET:
            return NudeNetDetector(**options)
        if name.lower().endswith(".onnx"):
            return NudeNetDetector(model_path=name, **options)
        return HFImageClassifierDetector(name, **options)
    except TypeError as exc:  # constructors only store options, so this is a bad option name
        raise ConfigError(f"bad options for safety detector {name!r}: {exc}") from exc
