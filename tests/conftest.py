"""Shared fixtures. The tiny checkpoints are built once per session into a private FACTORY_HOME."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def factory_home(tmp_path_factory) -> Path:
    # Set before anything loads models or starts Ray, so subprocesses and Ray workers inherit it.
    home = Path(os.environ.get("FACTORY_TEST_HOME") or tmp_path_factory.mktemp("factory-home"))
    os.environ["FACTORY_HOME"] = str(home)
    return home


@pytest.fixture(scope="session")
def tiny_path(factory_home) -> Path:
    from factory.model.tiny import ensure_tiny

    return ensure_tiny(factory_home)


@pytest.fixture(scope="session")
def stack(tiny_path):
    from factory.model.stack import ModelStack

    return ModelStack.from_profile("tiny")


@pytest.fixture(scope="session")
def sample_images(tmp_path_factory) -> dict[str, Path]:
    """Real photographs that ship with scikit-image, written as files the way users have them."""
    from PIL import Image
    from skimage import data

    folder = tmp_path_factory.mktemp("images")
    paths = {}
    for name in ("astronaut", "chelsea", "coffee"):
        path = folder / f"{name}.png"
        Image.fromarray(getattr(data, name)()).save(path)
        paths[name] = path
    return paths
