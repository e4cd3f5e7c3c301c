"""`factory caption` against a bare in-process transformers loop over the same images, peak memory at two archive
sizes, and the seconds from start to the first committed caption on a 100,000-object folder.

    python bench/caption.py                    # everything, full sizes
    python bench/caption.py --quick            # smaller sizes (minutes on a 2-core CPU)
    python bench/caption.py throughput --images 400 --repeats 3
    python bench/caption.py memory --images 1000 10000
    python bench/caption.py first --images 100000
    python bench/caption.py all --smoke        # the smallest sizes: does every part still run (seconds per run)

Throughput, alternating, medians:
- bare: this process, no Ray: for each batch of the replica's batch size, read the files, decode them, and run the
  same batch runner a replica builds (tiny VLM + NudeNet safety, the VLM's max_pixels applied by its wrapper):
  the loop one writes with transformers and Pillow, decoding in line with inference.
- factory: `factory caption` on the folder (archive job: Ray Data workers list, read, decode and resize in threads
  that run ahead of the model; one warm Serve replica runs the same runner; parts committed by the workers).
  Every run, the warm-up included, writes to an output folder of its own: its duplicate claims
  (`_dedup/<sha>`), chunk markers and plan are its own, so no timed row is resumed or linked to another run's.
  Each prints a `WORK` line with the rows its summary says reached the replica; no ratio is printed (exit
  code 2) when a timed run sent fewer or more images to the model than the folder holds.
The images are real photographs from scikit-image, enlarged to phone-camera size (2048x1536 JPEG) and varied, so
decoding is real work, as it is for a photo library.
Memory: each size in a fresh process, the peak of RSS summed over the driver and every Ray process it started.
First caption: a local folder of 100,000 small distinct BMPs; the replica is warm (deployed by an untimed run),
the clock starts when `run_job` is called (Ray already up) and stops when the first results part is committed;
the run is then stopped through its error budget.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import Work, WorkLog, add_ray_arguments, join_or_start_ray, run_work  # noqa: E402

BATCH = 4
SMOKE = {"photos": 4, "memory": [8, 16], "first": 2000}


def write_photos(folder: Path, count: int, size: tuple[int, int] = (2048, 1536)) -> None:
    from PIL import Image, ImageOps
    from skimage import data

    bases = [Image.fromarray(getattr(data, name)()).convert("RGB").resize(size)
             for name in ("chelsea", "coffee", "astronaut", "rocket", "immunohistochemistry")]
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        image = bases[index % len(bases)]
        variant = ImageOps.mirror(image) if (index // len(bases)) % 2 else image
        # A distinct file each, or the run's duplicate claims would copy one caption and skip the model: a
        # one-pixel mark can vanish in JPEG quantisation, a 16x16 block on the 8x8 grid cannot.
        variant = variant.copy()
        corner = ((index * 16) % (size[0] - 16), 16 * ((index * 16) // (size[0] - 16)))
        variant.paste((index % 256, (index // 256) % 256, 255 - index % 256), corner + (corner[0] + 16, corner[1] + 16))
        variant.save(folder / f"photo-{index:06d}.jpg", quality=88)
    digests = {hashlib.sha256(path.read_bytes()).hexdigest() for path in folder.glob("photo-*.jpg")}
    if len(digests) != count:
        raise SystemExit(f"bench photos: {count - len(digests)} of {count} files came out byte-identical")


def write_tiny_bmps(folder: Path, count: int) -> None:
    """`count` distinct 8x8 24-bit BMPs, fast: one header, three pixel bytes changed per file."""
    folder.mkdir(parents=True, exist_ok=True)
    width = height = 8
    row = width * 3
    pixels = bytearray(row * height)
    header = b"BM" + struct.pack("<IHHI", 54 + len(pixels), 0, 0, 54) + struct.pack(
        "<IiiHHIIiiII", 40, width, height, 1, 24, 0, len(pixels), 2835, 2835, 0, 0)
    for index in range(count):
        pixels[0:3] = bytes((index & 255, (index >> 8) & 255, (index >> 16) & 255))
        (folder / f"{index:06d}.bmp").write_bytes(header + pixels)


def make_spec(folder: Path, output: Path, *, cpus: float, keep_warm: bool = True, chunk_objects: int = 1000,
              commit_seconds: float = 10.0):
    from factory.jobs.sources.archives.source import caption_spec

    return caption_spec([str(folder)], str(output), overrides=[
        f"serve.num_cpus={cpus}", f"serve.max_batch_size={BATCH}", f"serve.max_ongoing_requests={2 * BATCH}",
        f"serve.keep_warm={'true' if keep_warm else 'false'}", f"in_flight={4 * BATCH}",
        f"archive.chunk_objects={chunk_objects}", "commit.rows=512", f"commit.seconds={commit_seconds}",
        "chunks_per_caller=2",
    ])


def runner_for(spec, threads: int):
    import torch

    from factory.model.stack import ModelStack
    from factory.routing.replica import ReplicaConfig, build_runner

    torch.set_num_threads(threads)
    config = ReplicaConfig(profile=spec.profile, max_batch_size=BATCH, threads=threads, safety=spec.safety)
    return build_runner(config, ModelStack.from_profile(spec.profile))


def bare_loop(folder: Path, runner, label: str = "bare") -> tuple[float, Work]:
    from factory.routing.batch import ReplicaCall
    from factory.routing.requests import Task, TaskRequest

    paths = sorted(folder.iterdir())
    started = time.perf_counter()
    rows = []
    for start in range(0, len(paths), BATCH):
        calls = [ReplicaCall(request=TaskRequest(id=p.name, tenant="bare", task=Task.CAPTION, image=str(p)),
                             image_bytes=p.read_bytes()) for p in paths[start:start + BATCH]]
        rows.extend(result.caption for result in runner.run(calls))
    assert all(rows)
    return len(paths) / (time.perf_counter() - started), Work(label, len(paths), len(rows))


def factory_run(spec, run_id: str, images: int) -> tuple[float, Work]:
    from factory.jobs.run import run_job

    started = time.perf_counter()
    summary = run_job(spec, run_id=run_id, show_progress=False)
    seconds = time.perf_counter() - started
    assert summary.by_status.get("ok", 0) == summary.rows, summary.by_status
    return summary.rows / seconds, run_work(f"factory {run_id}", images, summary)


def throughput(images: int, repeats: int, cpus: float, address: str | None, work_log: WorkLog) -> dict:
    import ray

    from factory.jobs.cluster.serve_app import default_app_name

    threads = max(1, int(cpus))  # the replica's torch threads for `cpus` (factory.routing.app.replica_setup)
    join_or_start_ray(address, math.ceil(2 * cpus + 2))
    work = Path(tempfile.mkdtemp(prefix="bench-caption-"))
    folder = work / "photos"
    write_photos(folder, images)

    def spec_for(run_id: str):
        """The caption job, writing to a folder of its own: no claims, markers or plan shared with another run."""
        return make_spec(folder, work / f"out-{run_id}", cpus=cpus)

    warm_spec = spec_for("warmup")
    runner = runner_for(warm_spec, threads)
    bare_loop(folder, runner)  # warm
    _, warm = factory_run(warm_spec, "warmup", images)  # deploys the replica and keeps it; not timed
    print(f"  warm-up (not timed): {warm.line()}", flush=True)
    figures: dict[str, list[float]] = {"bare": [], "factory": []}
    for repeat in range(repeats):
        bare, bare_work = bare_loop(folder, runner, f"bare {repeat}")
        figures["bare"].append(bare)
        rate, factory_work = factory_run(spec_for(f"timed{repeat}"), f"timed{repeat}", images)
        figures["factory"].append(rate)
        print(f"  repeat {repeat}: bare {bare:.2f} ({bare_work.brief()}), factory {rate:.2f} "
              f"({factory_work.brief()}) images/s", flush=True)
        work_log.add(bare_work)
        work_log.add(factory_work)
    from ray import serve

    serve.delete(default_app_name(warm_spec.name))
    ray.shutdown()
    result = {"images": images, "threads": threads,
              **{f"{key}_images_per_s": round(statistics.median(v), 2) for key, v in figures.items()}}
    result["factory_vs_bare"] = round(result["factory_images_per_s"] / result["bare_images_per_s"], 3)
    return result


def memory_child(images: int, cpus: float, address: str | None) -> None:
    import ray

    from bench.common import PeakTreeRss
    from factory.jobs.cluster import connect
    from factory.jobs.run import run_job

    connect(address)
    work = Path(tempfile.mkdtemp(prefix="bench-caption-memory-"))
    write_tiny_bmps(work / "imgs", images)
    spec = make_spec(work / "imgs", work / "out", cpus=cpus, keep_warm=False, chunk_objects=500)
    started = time.perf_counter()
    with PeakTreeRss() as peak:
        summary = run_job(spec, run_id="memory", show_progress=False)
    print(json.dumps({"images": summary.rows, "ok": summary.by_status.get("ok", 0),
                      "seconds": round(time.perf_counter() - started, 1), "peak_tree_rss_mb": round(peak.peak / 2**20),
                      "work": asdict(run_work(f"memory {images}", images, summary))}))
    ray.shutdown()


def memory(sizes: list[int], cpus: float, address: str | None, work_log: WorkLog) -> list[dict]:
    results = []
    for images in sizes:
        command = [sys.executable, __file__, "memory-child", "--images", str(images), "--cpus", str(cpus),
                   *(["--address", address] if address else [])]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"memory run of {images} images failed: {done.stderr[-2000:]}")
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        work_log.add(Work(**results[-1].pop("work")))
        print(f"  {results[-1]}", flush=True)
    return results


def first_caption(objects: int, cpus: float, address: str | None) -> dict:
    import ray

    import factory.jobs.run as runs
    from factory.io.layout import OutputLayout
    from factory.jobs.cluster import connect
    from factory.jobs.cluster.serve_app import default_app_name
    from factory.jobs.run import run_job

    work = Path(tempfile.mkdtemp(prefix="bench-caption-first-"))
    started = time.perf_counter()
    write_tiny_bmps(work / "many", objects)
    made = time.perf_counter() - started
    write_tiny_bmps(work / "warm", 8)
    connect(address)
    run_job(make_spec(work / "warm", work / "warm-out", cpus=cpus), run_id="warm", show_progress=False)
    # The run's tally, to stop it through its error budget: the driver (factory.jobs.run) starts it with start_tally.
    tallies = []
    original = runs.start_tally
    runs.start_tally = lambda budget: tallies.append(original(budget)) or tallies[-1]
    # Rows are committed every commit.seconds: 1 s here, so the figure is the pipeline's, not the commit cadence's.
    spec = make_spec(work / "many", work / "out", cpus=cpus, commit_seconds=1.0)
    layout = OutputLayout(str(work / "out" / "first"))
    results, plan = Path(layout.results), Path(layout.archive_plan)
    outcome: dict = {}

    def run() -> None:
        try:
            run_job(spec, run_id="first", show_progress=False)
        except Exception as error:  # stopped through the error budget, as intended
            outcome["stopped"] = type(error).__name__

    clock = time.perf_counter()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    first = None
    while thread.is_alive() and first is None:
        if results.exists() and any(path.suffix == ".parquet" for path in results.rglob("*")):
            first = time.perf_counter() - clock
        time.sleep(0.05)
    planned = len(list(plan.glob("s*-c*.json")))
    if not tallies:
        runs.start_tally = original
        raise SystemExit("first caption: the run started no tally through factory.jobs.run.start_tally, so the "
                         "bench cannot stop it; follow where the driver starts its tally now")
    ray.get(tallies[-1].add.remote({"failed": 10**9}))  # over the error budget: the workers stop at their next commit
    thread.join(timeout=300)
    runs.start_tally = original
    from ray import serve

    serve.delete(default_app_name(spec.name))
    ray.shutdown()
    return {"objects": objects, "seconds_to_write_files": round(made, 1), "first_caption_s": round(first or -1, 2),
            "chunks_planned_by_then": planned, "stopped": outcome.get("stopped")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", nargs="?", default="all", choices=["all", "throughput", "memory", "first", "memory-child"])
    parser.add_argument("--images", type=int, nargs="+", default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="smaller sizes: 120 photos x 2, memory at 500 / 2,000")
    parser.add_argument("--smoke", action="store_true",
                        help=f"the smallest sizes ({SMOKE['photos']} photos x 1, memory at {SMOKE['memory']}, first "
                             f"caption of {SMOKE['first']} objects): checks that every part runs, measures nothing")
    add_ray_arguments(parser, cpus=float(os.cpu_count() or 1), cpus_help="logical CPUs of the replica; its torch "
                      "threads, and the bare loop's, follow them")
    args = parser.parse_args()
    os.environ.setdefault("FACTORY_LOG_LEVEL", "warning")
    from factory.logs import configure_logging

    configure_logging("warning")
    if args.part == "memory-child":
        memory_child(args.images[0], args.cpus, args.address)
        return
    if args.part in ("all", "throughput"):
        images = SMOKE["photos"] if args.smoke else (args.images or [120 if args.quick else 400])[0]
        print(f"throughput: bare in-process loop vs factory caption, {images} photos 2048x1536; every run writes "
              "to an output folder of its own", flush=True)
        work_log = WorkLog()
        result = throughput(images, 1 if args.smoke else 2 if args.quick else args.repeats, args.cpus, args.address,
                            work_log)
        print(json.dumps(result))
        work_log.check()
        print(f"RATIO factory/bare = {result['factory_vs_bare']:.2f} (aim >= 1.3)")
    if args.part in ("all", "memory"):
        sizes = (SMOKE["memory"] if args.smoke else args.images if args.part == "memory" and args.images
                 else [500, 2000] if args.quick else [1000, 10000])
        print(f"memory: peak RSS of the whole run (driver + Ray processes) at {sizes[0]} and {sizes[1]} images",
              flush=True)
        work_log = WorkLog()
        small, large = memory(sizes, args.cpus, args.address, work_log)
        work_log.check()
        print(f"RATIO peak memory {large['images']}/{small['images']} images = "
              f"{large['peak_tree_rss_mb'] / small['peak_tree_rss_mb']:.2f} (aim <= 1.1)")
    if args.part in ("all", "first"):
        objects = SMOKE["first"] if args.smoke else (args.images or [100_000])[0] if args.part == "first" else 100_000
        print(f"first caption: {objects} objects in a local folder, warm replica", flush=True)
        result = first_caption(objects, args.cpus, args.address)
        print(json.dumps(result))
        print(f"FIRST CAPTION after {result['first_caption_s']:.2f} s (aim <= 10 s after Ray is up)")


if __name__ == "__main__":
    main()
