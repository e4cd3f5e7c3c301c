"""Captioned training data built on the fly: real scikit-image photographs with kohya-style captions beside them,
as a folder or a WebDataset tar shard, plus every kind of bad input a training source can hold; and training specs
small enough for the tiny profile on a CPU."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import yaml
from PIL import Image

# Real photographs shipped with scikit-image (no network): colour and grey, portrait, landscape and square.
PHOTOS = ("astronaut", "cat", "chelsea", "coffee", "rocket", "colorwheel", "hubble_deep_field",
          "immunohistochemistry", "retina", "brick", "grass", "gravel")

# name -> (what is written, the reject reason the training run must give); images are PNG bytes.
BAD_INPUTS_REASONS = {
    "orphan.txt": "caption without its image",
    "nocaption.png": "no caption beside it",
    "corrupt.png": "not an image",
    "blank.png": "empty caption",
    "badjson.png": "not valid JSON",
}


def photo(name: str, longest: int = 96) -> Image.Image:
    """A scikit-image photo as RGB, shrunk so its longest side is `longest` (decoding stays quick)."""
    from skimage import data

    image = Image.fromarray(getattr(data, name)()).convert("RGB")
    image.thumbnail((longest, longest))
    return image


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def caption_of(name: str) -> str:
    return f"a photo of {name.replace('_', ' ')} in the acme house style"


def captioned_folder(root: Path, photos: tuple[str, ...] = PHOTOS) -> dict[str, str]:
    """<photo>.png + <photo>.txt for each photo; returns {file name: caption}."""
    root.mkdir(parents=True, exist_ok=True)
    captions = {}
    for name in photos:
        (root / f"{name}.png").write_bytes(png(photo(name)))
        (root / f"{name}.txt").write_text(caption_of(name) + "\n")
        captions[f"{name}.png"] = caption_of(name)
    return captions


def add_bad_inputs(root: Path) -> None:
    """One of each input BAD_INPUTS_REASONS names, beside the good ones."""
    (root / "orphan.txt").write_text("a caption whose image is missing")
    (root / "nocaption.png").write_bytes(png(photo("camera")))
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    (root / "corrupt.txt").write_text("an image that does not decode")
    (root / "blank.png").write_bytes(png(photo("moon")))
    (root / "blank.txt").write_text("  \n ")
    (root / "badjson.png").write_bytes(png(photo("coins")))
    (root / "badjson.json").write_text("{not json")


def captioned_tar(path: Path, photos: tuple[str, ...]) -> dict[str, str]:
    """A WebDataset shard: <key>.png then <key>.txt (or <key>.json for every other one), adjacent."""
    captions = {}
    with tarfile.open(path, "w") as tar:
        for index, name in enumerate(photos):
            key = f"{index:06d}"
            if index % 2:
                members = {f"{key}.png": png(photo(name)),
                           f"{key}.json": json.dumps({"caption": caption_of(name), "width": 96}).encode()}
            else:
                members = {f"{key}.png": png(photo(name)), f"{key}.txt": caption_of(name).encode()}
            for member, data in members.items():
                info = tarfile.TarInfo(member)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            captions[f"{key}.png"] = caption_of(name)
    return captions


TRAIN_OPTIONS = {"rank": 4, "steps": 24, "batch_size": 4, "learning_rate": 0.003, "buckets": [{"width": 64,
                 "height": 64}], "checkpoint_every": 8, "validation_every": 12, "held_out_fraction": 0.2,
                 "validation_images": 2, "seed": 7}


def _train_section(sources: list[str], overrides: dict) -> dict:
    options = {**TRAIN_OPTIONS, **overrides.pop("options", {})}
    return {"tenant": "acme", "region": "eu", "adapter": "eu-style", "sources": sources, "options": options,
            **overrides}


def write_train_spec(path: Path, sources: list[str], output: Path | str, **overrides) -> Path:
    """A `factory train` spec for the tiny profile: 64x64, rank 4, a few steps; `overrides` replace top-level keys,
    and `options` entries are merged into the defaults here."""
    spec = {**_train_section(sources, overrides), "output": str(output)}
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def write_train_job(path: Path, sources: list[str], output: Path | str, tenants: str | None = None,
                    **overrides) -> Path:
    """A job spec whose `train:` section is `write_train_spec`'s (same defaults, same `overrides`)."""
    spec = {"name": "style", "output": str(output), "train": _train_section(sources, overrides)}
    if tenants is not None:
        spec["tenants"] = tenants
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path
