"""LoRA training (issue 19): `factory train` against a bare single-process loop doing the same steps on the same
data, the speed-up of the cached latents and embeddings over encoding every step, peak memory; and the same
training step at full FLUX.1-dev size on a GPU.

    python bench/train.py                          # CPU, tiny profile (a few minutes on 2 cores)
    python bench/train.py --smoke                  # the smallest sizes: does every part still run
    python bench/train.py --gpu --json gpu.json    # one H100/H200: FLUX.1-dev-sized transformer, random weights

CPU mode, on the tiny profile, real scikit-image photos with captions:
- factory: `factory train`'s driver (the one run driver, `run_job`, on the spec's job) on a private Ray: the model
  stage (Ray Data encodes every image and caption once), then Ray Train (one gloo worker of `--cpus-per-worker`
  CPUs). Its figure is the steady rate
  inside the worker, steps between its first and last checkpoint over the wall time between them: training
  steps, DDP's wrapper, `ray.train.report` and checkpoint writes included; validation is off (base and final
  held-out loss only). The whole command's wall time (Ray start, stage 1, worker start) is printed beside it.
- bare: this process, no Ray: the same `TrainingSession` on the same cache (the factory run's latents),
  the same options and seed, as many threads as the worker has, timed over the same steps with no checkpoints:
  the loop one writes by hand. The two must end on the same losses (printed), or the ratio compares other work.
- encoding every step: the bare loop again, but each step first runs the VAE and the text encoders on its batch's
  images and captions (`TrainingEncoders`, as a trainer without a cache does); the ratio to the bare loop is
  what the cache saves.
- runs alternate (factory, bare, factory again from its latents with its checkpoints and report removed, bare...)
  and the medians are compared, so both see the same load on a shared machine.
- peak memory: RSS summed over this process and every Ray process it started, sampled while `factory train`
  runs; this process's own peak RSS (the driver and the bare loop).

GPU mode (not run on CPU machines): the FLUX.1-dev transformer (19 double and 38 single blocks, 24 heads x 128,
T5 embeddings of 512 tokens x 4096) built on the GPU in bf16 with random weights (`bench/gpu_flux.py`'s
builders), a rank-16 LoRA on to_q/to_k/to_v/to_out.0 in float32, gradient checkpointing on, batch 1, AdamW; the
factory's `TrainingSession.train_step` at 512x512 and 1024x1024: median s/step after warm-up, the peak of
`torch.cuda.max_memory_allocated`, and whether that peak fits one 80 GB card (under 76 GiB, leaving room for
the CUDA context and the allocator's slack).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import PeakTreeRss, join_or_start_ray  # noqa: E402

GIB = 2**30
FITS_80GB_GIB = 76.0


def cpu_bench(args: argparse.Namespace) -> dict:
    import torch

    from factory.io.storage import Storage
    from factory.jobs.run import run_job
    from factory.jobs.training.latents import read_latents
    from factory.jobs.training.layout import TrainingLayout
    from factory.jobs.training.spec import load_train_spec
    from factory.model.training.loop import Progress
    from tests.training import PHOTOS, captioned_folder, write_train_spec

    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    photos = PHOTOS[:args.images]
    captioned_folder(work / "dataset", photos)
    every = max(1, args.steps // 4)
    options = {"steps": args.steps, "batch_size": args.batch, "rank": args.rank, "checkpoint_every": every,
               "validation_every": 0, "validation_images": 0, "held_out_fraction": 0.1,
               "buckets": [{"width": args.size, "height": args.size}]}
    spec = load_train_spec(write_train_spec(work / "train.yaml", [str(work / "dataset")], work / "out",
                                            options=options, scaling={"cpus_per_worker": args.cpus_per_worker}))

    import ray

    join_or_start_ray(args.address, max(2, int(args.cpus_per_worker) + 1))
    torch.set_num_threads(max(1, int(args.cpus_per_worker)))  # the bare loop gets the threads the worker gets
    factory_rates, factory_walls, bare_rates, peaks = [], [], [], []
    for repeat in range(args.repeats):
        if repeat:  # the same run again from its latents: its checkpoints and report removed, so it trains from 0
            shutil.rmtree(Path(root) / "checkpoints")
            Path(TrainingLayout(root).report).unlink()
        started = time.perf_counter()
        with PeakTreeRss() as peak:
            root = run_job(spec.job(), run_id=spec.resolved_run_id, show_progress=False).output
        factory_walls.append(time.perf_counter() - started)
        peaks.append(peak.peak)
        final = Path(root) / "checkpoints" / f"step-{args.steps:06d}" / "progress.json"
        progress = Progress.from_json(json.loads(final.read_text()))
        first, last = min(progress.saved_at), max(progress.saved_at)
        factory_rates.append((last - first) / (progress.saved_at[last] - progress.saved_at[first]))
        rate, bare_losses = bare_loop(spec, root, first, last, encode=False)
        bare_rates.append(rate)
        same = bare_losses == progress.losses[first:last]
        print(f"  run {repeat}: factory {factory_rates[-1]:.2f} steps/s (whole command {factory_walls[-1]:.1f} s), "
              f"bare {rate:.2f} steps/s, same losses: {same}", flush=True)
    encode_rate, _ = bare_loop(spec, root, first, min(last, first + max(4, (last - first) // 4)), encode=True)
    factory_rate, bare_rate = statistics.median(factory_rates), statistics.median(bare_rates)
    if args.address is None:
        ray.shutdown()
    figures = {
        "images": len(photos), "size": args.size, "batch": args.batch, "rank": args.rank, "steps": args.steps,
        "timed_steps": last - first, "repeats": args.repeats, "factory_steps_per_s": round(factory_rate, 3),
        "factory_first_run_wall_s": round(factory_walls[0], 1), "factory_cached_run_wall_s": round(
            statistics.median(factory_walls[1:]), 1) if len(factory_walls) > 1 else None,
        "bare_steps_per_s": round(bare_rate, 3), "encoding_every_step_steps_per_s": round(encode_rate, 3),
        "same_losses": same, "factory_peak_tree_rss_mib": round(max(peaks) / 2**20),
        "bench_process_peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "cache_rows": read_latents(Storage(), TrainingLayout(root), ["id"]).num_rows,
    }
    print(json.dumps(figures, indent=2))
    print(f"RATIO factory/bare = {factory_rate / bare_rate:.2f} (steps/s, steady, medians; losses identical: {same})")
    print(f"RATIO cached/encoding every step = {bare_rate / encode_rate:.2f}")
    return figures


def bare_loop(spec, root: str, first: int, last: int, *, encode: bool) -> tuple[float, list[float]]:
    """Steps first..last of the spec's run in this process; with `encode`, each step encodes its batch first."""
    from factory.io.storage import Storage
    from factory.jobs.training.latents import read_latents
    from factory.jobs.training.layout import TrainingLayout
    from factory.model.profiles import get_profile
    from factory.model.stack import resolve_sources
    from factory.model.training.cache import read_samples
    from factory.model.training.data import split_held_out
    from factory.model.training.encoders import TrainingEncoders
    from factory.model.training.loop import TrainingData, TrainingSession

    profile = get_profile(spec.profile)
    source, _, _ = resolve_sources(profile)
    samples = read_samples(read_latents(Storage(), TrainingLayout(root)))
    train, held = split_held_out(samples, spec.options.held_out_fraction)
    session = TrainingSession.load(source, profile.generator, spec.options, TrainingData(train, held))
    encoders = TrainingEncoders.from_pretrained(source, profile.generator) if encode else None
    images = _bucket_images(spec, {s.id for s in train}) if encode else {}
    for _ in range(first):
        session.train_step()
    started = time.perf_counter()
    for step in range(first, last):
        if encoders is not None:
            for index in session.plan.global_batch(step):
                sample = train[index]
                encoders.encode(images[sample.id], sample.caption)
        session.train_step()
    return (last - first) / (time.perf_counter() - started), session.progress.losses[first:last]


def _bucket_images(spec, ids: set[str]) -> dict:
    """The training images as the model stage hands them to the encoders (decoded, bucketed), by sample id."""
    import pyarrow as pa

    from factory.io.layout import OutputLayout
    from factory.io.storage import Storage
    from factory.jobs.engine.source import RunContext
    from factory.jobs.sources.training.listing import plan_chunks
    from factory.jobs.sources.training.reader import TrainingReader
    from factory.jobs.training.spec import buckets_of

    storage = Storage()
    run = RunContext(job="bench", run_id="bench", layout=OutputLayout(spec.output), storage=storage)
    reader = TrainingReader(run, spec.tenant, buckets_of(spec.job()))
    nothing_committed = pa.table({"id": pa.array([], pa.string())})
    images = {}
    for chunk in plan_chunks(spec.sources, storage, 1000).chunks:
        for item in reader.open(chunk).items(nothing_committed):
            if item.row is None and item.row_id in ids:
                images[item.row_id] = item.data.image()
    return images


def gpu_bench(args: argparse.Namespace) -> dict:
    import torch

    from bench.gpu_flux import FULL, building, init_weights, scheduler_for, transformer_module
    from factory.model.training.adapter import add_lora
    from factory.model.training.cache import CachedSample
    from factory.model.training.loop import TrainingData, TrainingSession
    from factory.model.training.options import TrainOptions

    if not torch.cuda.is_available():
        raise SystemExit("--gpu needs a CUDA device")
    rows = []
    for side in args.sides:
        options = TrainOptions(rank=16, steps=args.gpu_steps + 2, batch_size=1, learning_rate=1e-4,
                               gradient_checkpointing=True, held_out_fraction=0)
        with building("cuda", torch.bfloat16):
            transformer = transformer_module(FULL, "dev")
        init_weights(transformer, 0)
        add_lora(transformer, options)
        transformer.enable_gradient_checkpointing()
        transformer.train()
        generator = torch.Generator("cpu").manual_seed(0)
        samples = [CachedSample(
            id=str(i), caption="", image_sha256=f"{i:064x}", bucket=(side, side),
            latents=torch.randn(16, side // 8, side // 8, generator=generator),
            prompt_embeds=torch.randn(512, 4096, generator=generator) * 0.1,
            pooled_embeds=torch.randn(768, generator=generator) * 0.1) for i in range(4)]
        session = TrainingSession(transformer, transformer, scheduler_for("dev"), TrainingData(samples, []), options,
                                  guidance=3.5, dtype=torch.bfloat16, device="cuda")
        torch.cuda.reset_peak_memory_stats()
        for _ in range(2):  # warm-up: the allocator's pools and cuDNN/cuBLAS choices
            session.train_step()
        times = []
        for _ in range(args.gpu_steps):
            torch.cuda.synchronize()
            started = time.perf_counter()
            session.train_step()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - started)
        peak = torch.cuda.max_memory_allocated() / GIB
        rows.append({"side": side, "s_per_step": round(statistics.median(times), 3), "peak_gib": round(peak, 1),
                     "fits_80gb": peak < FITS_80GB_GIB, "rank": 16, "batch": 1, "gradient_checkpointing": True,
                     "device": torch.cuda.get_device_name()})
        print(json.dumps(rows[-1]), flush=True)
        del session, transformer
        torch.cuda.empty_cache()
    return {"gpu": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=12, help="captioned photos (at most 12)")
    parser.add_argument("--size", type=int, default=64, help="training resolution (one square bucket)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--cpus-per-worker", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3, help="factory and bare runs, alternating; medians")
    parser.add_argument("--address", default=None, help="join this Ray cluster instead of starting a private one")
    parser.add_argument("--smoke", action="store_true", help="6 images, 16 steps")
    parser.add_argument("--gpu", action="store_true", help="full FLUX.1-dev size on one CUDA GPU")
    parser.add_argument("--sides", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--gpu-steps", type=int, default=10, help="timed steps per size")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    if args.smoke:
        args.images, args.steps, args.repeats = 6, 16, 1
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    figures = gpu_bench(args) if args.gpu else cpu_bench(args)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
