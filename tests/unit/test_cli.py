"""The `factory` command as a person uses it: real processes, real tiny models, one-line errors."""

from __future__ import annotations

import subprocess
import sys

import pytest
from PIL import Image


def factory(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "factory", *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_generate_writes_the_requested_png_and_is_reproducible(tiny_path, tmp_path):
    outputs = []
    for name in ("first.png", "second.png"):
        done = factory("generate", "a red bicycle", "-o", str(tmp_path / name), "--seed", "7", "--width", "256",
                       "--height", "256")
        assert done.returncode == 0, done.stderr
        outputs.append((tmp_path / name).read_bytes())
    assert outputs[0] == outputs[1]
    with Image.open(tmp_path / "first.png") as image:
        assert (image.format, image.size) == ("PNG", (256, 256))
    assert "seed=7" in done.stdout


def test_describe_and_ask_answer_about_a_real_image(tiny_path, sample_images):
    described = factory("describe", str(sample_images["chelsea"]))
    asked = factory("ask", str(sample_images["coffee"]), "How many cups are there?")
    assert described.returncode == 0 and described.stdout.strip(), described.stderr
    assert asked.returncode == 0 and asked.stdout.strip(), asked.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["generate", "x", "--width", "100"], "error: width: must be a multiple of 16, got 100"),
        (["generate", "x", "--steps", "0"], "error: steps: "),
        (["generate", "   "], "error: prompt: required"),
        (["generate", "x", "--profile", "nope"], "error: profile: unknown profile 'nope'"),
        (["describe", "/no/such/image.png"], "error: /no/such/image.png: no such file"),
        (["run", "/no/such/job.yaml"], "error: /no/such/job.yaml: no such file"),
        (["run", "jobs/catalog.yaml", "--set", "serve.replcas=2"], "error: --set serve.replcas: unknown field"),
    ],
)
def test_errors_are_one_line_and_exit_non_zero(args, message, tiny_path):
    from pathlib import Path

    done = factory(*args, cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), done.stderr
    assert "Traceback" not in done.stderr


def test_models_list_names_every_profile():
    done = factory("models", "list")
    assert done.returncode == 0
    for name in ("tiny", "flux-dev", "flux-schnell"):
        assert name in done.stdout


def test_caption_refuses_a_missing_source_or_a_bad_setting_in_one_line(tmp_path):
    missing = factory("caption", str(tmp_path / "nope"), "--output", str(tmp_path / "out"))
    assert missing.returncode == 2 and missing.stderr.strip().count("\n") == 0
    assert "archive source" in missing.stderr and "no such file or folder" in missing.stderr
    bad = factory("caption", str(tmp_path), "--output", str(tmp_path / "out"), "--set", "archive.chunk_objcts=3")
    assert bad.returncode == 2 and "archive.chunk_objcts: unknown field" in bad.stderr
    assert not (tmp_path / "out").exists()
