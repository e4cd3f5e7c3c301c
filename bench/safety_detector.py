"""NudeNet detector cost on this machine: load time, memory added, per-image latency.

    PYTHONPATH=. python bench/safety_detector.py [--threads 1] [--reps 10] [--reference]

(PYTHONPATH only while the package is not pip-installed.)

Prints medians over `--reps` repetitions. Inputs are scikit-image's astronaut photo resized to each size;
the model always sees 320x320, so image size only changes pre-processing. `--reference` also times the
nudenet package's own `NudeDetector.detect_batch` (default onnxruntime threads) on the same images.
"""

from __future__ import annotations

import argparse
import gc
import logging
import statistics
import time
from collections.abc import Callable

import psutil
import structlog
from PIL import Image
from skimage import data

SIZES = (256, 512)
BATCHES = (1, 8)


def rss_mib() -> float:
    gc.collect()
    return psutil.Process().memory_info().rss / 2**20


def median_s(fn: Callable[[], object], reps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    parser.add_argument("--reps", type=int, default=10, help="timed repetitions per case")
    parser.add_argument("--no-arena", action="store_true", help="disable onnxruntime's CPU memory arena")
    parser.add_argument("--reference", action="store_true", help="also time nudenet's NudeDetector")
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))

    base = rss_mib()
    import cv2  # noqa: F401  (what loading needs, imported up front so it is counted apart)
    import onnxruntime  # noqa: F401

    from factory.safety.detectors import NudeNetDetector

    imported = rss_mib()
    started = time.perf_counter()
    detector = NudeNetDetector(intra_op_threads=args.threads, memory_arena=not args.no_arena)
    detector.load()
    first_load = time.perf_counter() - started
    loaded = rss_mib()

    def fresh_load() -> None:
        NudeNetDetector(intra_op_threads=args.threads, memory_arena=not args.no_arena).load()

    load_median = median_s(fresh_load, reps=5, warmup=0)

    photo = Image.fromarray(data.astronaut())
    print(
        f"nudenet 320n.onnx, onnxruntime {onnxruntime.__version__}, intra_op_threads={args.threads}, "
        f"memory_arena={not args.no_arena}"
    )
    print(f"load: first {first_load * 1000:.0f} ms, median of 5 fresh loads {load_median * 1000:.0f} ms")
    print(f"rss: +{imported - base:.0f} MiB importing onnxruntime/cv2, +{loaded - imported:.0f} MiB loading model")

    for size in SIZES:
        image = photo.resize((size, size), Image.Resampling.BILINEAR)
        for batch in BATCHES:
            images = [image] * batch
            seconds = median_s(lambda images=images: detector.detect(images), args.reps)
            print(
                f"{size}x{size} batch {batch}: {seconds * 1000:.1f} ms per call, "
                f"{seconds / batch * 1000:.1f} ms/image, rss +{rss_mib() - imported:.0f} MiB over imports"
            )

    if args.reference:
        import numpy as np
        from nudenet import NudeDetector

        reference = NudeDetector()
        for size in SIZES:
            # nudenet treats arrays as cv2 BGR images.
            array = np.ascontiguousarray(np.asarray(photo.resize((size, size)))[..., ::-1])
            for batch in BATCHES:
                arrays = [array] * batch
                seconds = median_s(lambda a=arrays, b=batch: reference.detect_batch(a, batch_size=b), args.reps)
                print(f"reference {size}x{size} batch {batch}: {seconds / batch * 1000:.1f} ms/image")


if __name__ == "__main__":
    main()
