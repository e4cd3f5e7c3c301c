"""Per-call latency of each task on a profile's stack (warm, in-process), and the cost of building tiny.

    python bench/tasks.py [--profile tiny] [--repeats 7]

Prints median milliseconds per call for: generate (batch 1 and 4, the profile's default size and steps),
caption and VQA (batch 1 and 4 on a real photo), and the safety detector per image; plus the time and disk
size of a fresh tiny build.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def median_ms(call, repeats: int) -> float:
    call()  # warm
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append((time.perf_counter() - started) * 1000)
    return round(statistics.median(times), 1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--profile", default="tiny")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    from PIL import Image
    from skimage import data

    from factory.logs import configure_logging
    from factory.model.generator import GenerationParams
    from factory.model.stack import ModelStack
    from factory.model.tiny import build_flux, build_vlm
    from factory.safety.policy import SafetyChecker, SafetyPolicy

    configure_logging("warning")
    scratch = Path(tempfile.mkdtemp(prefix="bench-tiny-"))
    started = time.perf_counter()
    build_flux(scratch / "flux")
    build_vlm(scratch / "vlm")
    build_s = time.perf_counter() - started
    size_mb = sum(p.stat().st_size for p in scratch.rglob("*") if p.is_file()) / 1e6
    shutil.rmtree(scratch)
    print(f"tiny build: {build_s:.1f} s (includes importing diffusers/transformers), {size_mb:.2f} MB on disk")

    stack = ModelStack.from_profile(args.profile)
    g = stack.profile.generator
    params = [GenerationParams(f"poster {i}", i, g.steps, g.width, g.height, g.guidance) for i in range(4)]
    photo = Image.fromarray(data.coffee()).convert("RGB")
    safety = SafetyChecker(SafetyPolicy())
    safety.load()
    generated = stack.generate(params[:1])
    rows = {
        f"generate {g.width}x{g.height} {g.steps} steps, batch 1": lambda: stack.generate(params[:1]),
        f"generate {g.width}x{g.height} {g.steps} steps, batch 4": lambda: stack.generate(params),
        "caption, batch 1": lambda: stack.caption([photo]),
        "caption, batch 4": lambda: stack.caption([photo] * 4),
        "vqa, batch 1": lambda: stack.answer([photo], ["How many cups are there?"]),
        "vqa, batch 4": lambda: stack.answer([photo] * 4, ["How many cups are there?"] * 4),
        "safety detector, 1 image": lambda: safety.check_images(generated),
    }
    for name, call in rows.items():
        print(f"{name:40} {median_ms(call, args.repeats):8.1f} ms per call")


if __name__ == "__main__":
    main()
