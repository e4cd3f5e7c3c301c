"""Throughput of `factory run` against a bare in-process loop and against a plain Ray Data actor pool over the
same rows and models, and peak memory of a run at two manifest sizes.

    python bench/pipeline.py                 # throughput
    python bench/pipeline.py throughput --rows 240 --repeats 3
    python bench/pipeline.py memory --rows 1000 10000

Throughput, three ways over the same generation rows, alternating, medians of each:
- bare: the same ModelStack, safety policy and batch runner in this process, batches of the replica's batch
  size, the same PNG writes; no Ray.
- factory: `factory run` (chunks, validation, duplicate ids, Ray Data callers, one Serve replica, worker
  commits); the replica is warm (deployed by an untimed first run and kept).
- actor pool: the simpler design, `read_json -> map_batches(actor holding the same stack and runner) ->
  write_parquet`, no Serve, no chunks; its actor loads the models inside each timed run.
Each is given as whole-run rows/s, and the two Ray designs also as steady rows/s (rows finished between the
10th and 90th percentile of finish times, over that span), which leaves out start-up and tail on both.
Memory: each size runs in a fresh process; the peak is the sum of RSS over the driver and every Ray process it
started, sampled every 0.2 s.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def write_manifest(path: Path, rows: int) -> None:
    tenants = ["acme", "globex", "initech", "umbrella", "hooli"]
    with path.open("w") as handle:
        for index in range(rows):
            row = {"id": f"r{index:06d}", "tenant": tenants[index % len(tenants)], "prompt": f"poster {index}"}
            handle.write(json.dumps(row) + "\n")


def make_spec(manifest: Path, output: Path, *, size: int, steps: int, cpus: float, batch: int):
    from factory.jobs.spec import JobSpec

    return JobSpec.model_validate({
        "name": "bench", "inputs": [str(manifest)], "output": str(output),
        "defaults": {"steps": steps, "width": size, "height": size},
        "serve": {"replicas": 1, "num_cpus": cpus, "max_batch_size": batch, "max_ongoing_requests": 2 * batch,
                  "keep_warm": True},
        "in_flight": 4 * batch, "commit": {"rows": 512, "seconds": 10},
    })


def _runner(spec, threads: int):
    """The runner a replica builds for this spec (no adapters in this benchmark), on `threads` torch threads."""
    import torch

    from factory.model.stack import ModelStack
    from factory.routing.replica import ReplicaConfig, build_runner

    torch.set_num_threads(threads)
    config = ReplicaConfig(profile=spec.profile, max_batch_size=spec.serve.max_batch_size, threads=threads,
                           safety=spec.safety)
    return build_runner(config, ModelStack.from_profile(spec.profile))


def bare_loop(manifest: Path, output: Path, runner, spec) -> float:
    """The same rows, parser, runner, safety checks, PNG encoding and writes, in this process, no Ray."""
    from factory.io.storage import Storage
    from factory.jobs.manifests import iter_manifest_records
    from factory.jobs.pipeline import generation_defaults
    from factory.routing.batch import ReplicaCall
    from factory.routing.parser import parse_request

    storage, defaults = Storage(), generation_defaults(spec)
    requests = [parse_request(record.raw, defaults) for record in iter_manifest_records(str(manifest), storage)]
    started = time.perf_counter()
    batch = spec.serve.max_batch_size
    for start in range(0, len(requests), batch):
        chunk = requests[start:start + batch]
        for request, result in zip(chunk, runner.run([ReplicaCall(request=r) for r in chunk])):
            storage.write_bytes(str(output / request.tenant / f"{request.id}.png"), result.image_png)
    return len(requests) / (time.perf_counter() - started)


def steady_rows_per_s(finished: list) -> float:
    """Rows finished between the 10th and 90th percentile of finish times, over that span."""
    times = sorted(t.timestamp() if hasattr(t, "timestamp") else float(t) for t in finished)
    low, high = times[len(times) // 10], times[(9 * len(times)) // 10]
    inside = sum(1 for t in times if low <= t <= high)
    return inside / max(high - low, 1e-9)


def factory_run(spec, run_id: str) -> tuple[float, float]:
    from factory.io.layout import OutputLayout
    from factory.io.storage import Storage
    from factory.jobs.commit import read_table
    from factory.jobs.pipeline import output_root, run_job

    started = time.perf_counter()
    summary = run_job(spec, run_id=run_id, show_progress=False)
    whole = summary.rows / (time.perf_counter() - started)
    results = read_table(Storage(), OutputLayout(output_root(spec, run_id)).results, ["finished_at"], hive=True)
    return whole, steady_rows_per_s(results.column("finished_at").to_pylist())


class StackWorker:
    """The plain actor-pool design: a Ray Data actor holding the whole stack itself (no Serve, no chunks)."""

    def __init__(self, spec_json: str, output: str, threads: int):
        from factory.jobs.pipeline import generation_defaults
        from factory.jobs.spec import JobSpec

        self.spec = JobSpec.model_validate_json(spec_json)
        self.runner = _runner(self.spec, threads)
        self.defaults = generation_defaults(self.spec)
        self.output = Path(output)

    def __call__(self, batch):
        from datetime import UTC, datetime

        from factory.io.storage import Storage
        from factory.routing.batch import ReplicaCall
        from factory.routing.parser import parse_request

        requests = [parse_request(row, self.defaults) for row in batch.to_pylist()]
        results = self.runner.run([ReplicaCall(request=request) for request in requests])
        storage = Storage()
        for request, result in zip(requests, results):
            if result.image_png is not None:
                storage.write_bytes(str(self.output / request.tenant / f"{request.id}.png"), result.image_png)
        now = datetime.now(UTC)
        return {"id": [r.id for r in results], "status": [r.status.value for r in results],
                "finished_at": [now] * len(results)}


def actor_pool_run(manifest: Path, output: Path, spec, threads: int) -> tuple[float, float]:
    import pyarrow.parquet as pq
    import ray

    started = time.perf_counter()
    (
        ray.data.read_json(str(manifest))
        .map_batches(StackWorker, batch_size=spec.serve.max_batch_size, batch_format="pyarrow",
                     fn_constructor_kwargs={"spec_json": spec.model_dump_json(), "output": str(output / "images"),
                                            "threads": threads},
                     compute=ray.data.ActorPoolStrategy(size=1), num_cpus=spec.serve.num_cpus)
        .write_parquet(str(output / "results"))
    )
    table = pq.read_table(str(output / "results"))
    whole = table.num_rows / (time.perf_counter() - started)
    return whole, steady_rows_per_s(table.column("finished_at").to_pylist())


def throughput(rows: int, repeats: int, size: int, steps: int, batch: int) -> dict:
    import ray

    from factory.jobs.cluster import connect, default_app_name

    cpus = os.cpu_count() or 1
    # Logical CPUs for both designs: the warm replica keeps its CPUs while the actor pool's actor takes its own
    # (they never run at once, so the cores are not shared), and Ray Data's light stages find slots too.
    ray.init(num_cpus=2 * cpus + 2, include_dashboard=False, logging_level="WARNING")
    connect()
    work = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    manifest = work / "rows.jsonl"
    write_manifest(manifest, rows)
    spec = make_spec(manifest, work / "factory", size=size, steps=steps, cpus=float(cpus), batch=batch)
    runner = _runner(spec, cpus)
    bare_loop(manifest, work / "warm", runner, spec)
    factory_run(spec, "warmup")  # deploys the replica and keeps it; not timed
    figures: dict[str, list[float]] = {key: [] for key in ("bare", "factory", "factory_steady", "pool", "pool_steady")}
    for repeat in range(repeats):
        figures["bare"].append(bare_loop(manifest, work / f"bare{repeat}", runner, spec))
        whole, steady = factory_run(spec, f"timed{repeat}")
        figures["factory"].append(whole)
        figures["factory_steady"].append(steady)
        whole, steady = actor_pool_run(manifest, work / f"pool{repeat}", spec, cpus)
        figures["pool"].append(whole)
        figures["pool_steady"].append(steady)
        print(f"  repeat {repeat}: " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in figures.items()) + " rows/s",
              flush=True)
    from ray import serve

    serve.delete(default_app_name(spec.name))
    result = {"rows": rows, "size": size, "steps": steps, "batch": batch, "threads": cpus,
              **{f"{key}_rows_per_s": round(statistics.median(values), 2) for key, values in figures.items()}}
    result["factory_vs_bare"] = round(result["factory_rows_per_s"] / result["bare_rows_per_s"], 3)
    result["pool_vs_bare"] = round(result["pool_rows_per_s"] / result["bare_rows_per_s"], 3)
    result["factory_vs_pool"] = round(result["factory_rows_per_s"] / result["pool_rows_per_s"], 3)
    result["factory_vs_pool_steady"] = round(result["factory_steady_rows_per_s"] / result["pool_steady_rows_per_s"], 3)
    ray.shutdown()
    return result


def memory_child(rows: int, size: int, steps: int) -> None:
    """Runs in a fresh process: one factory run over `rows` rows; prints peak tree RSS as JSON."""
    import resource

    import ray

    from factory.jobs.cluster import connect

    connect()
    work = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    write_manifest(work / "rows.jsonl", rows)
    spec = make_spec(work / "rows.jsonl", work / "out", size=size, steps=steps, cpus=float(os.cpu_count() or 1), batch=8)
    from bench.common import PeakTreeRss
    from factory.jobs.pipeline import run_job

    started = time.perf_counter()
    with PeakTreeRss() as peak:
        summary = run_job(spec, run_id="memory", show_progress=False)
    print(json.dumps({
        "rows": summary.rows, "seconds": round(time.perf_counter() - started, 1),
        "peak_tree_rss_mb": round(peak.peak / 2**20), "driver_maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }))
    ray.shutdown()


def memory(sizes: list[int], size: int, steps: int) -> list[dict]:
    results = []
    for rows in sizes:
        done = subprocess.run(
            [sys.executable, __file__, "memory-child", "--rows", str(rows), "--size", str(size), "--steps", str(steps)],
            capture_output=True, text=True, check=True,
        )
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"  {results[-1]}", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", nargs="?", default="throughput",
                        choices=["all", "throughput", "memory", "memory-child"])
    parser.add_argument("--rows", type=int, nargs="+", default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()
    os.environ.setdefault("FACTORY_LOG_LEVEL", "warning")
    from factory.logs import configure_logging

    configure_logging("warning")
    if args.part == "memory-child":
        memory_child(args.rows[0], args.size, args.steps)
        return
    if args.part in ("all", "throughput"):
        print("throughput: bare in-process loop vs factory run (one replica) vs a plain Ray Data actor pool", flush=True)
        result = throughput((args.rows or [240])[0], args.repeats, args.size, args.steps, args.batch)
        print(json.dumps(result))
        print(f"RATIO factory/bare = {result['factory_vs_bare']:.2f}, actor pool/bare = {result['pool_vs_bare']:.2f}")
        print(f"RATIO factory/actor pool = {result['factory_vs_pool']:.2f} whole run, "
              f"{result['factory_vs_pool_steady']:.2f} steady (aim >= 1.0)")
    if args.part in ("all", "memory"):
        print("memory: peak RSS of the whole run (driver + Ray processes)", flush=True)
        small, large = memory(args.rows or [1000, 10000], 64, 1)
        print(f"RATIO peak memory {large['rows']}/{small['rows']} rows = "
              f"{large['peak_tree_rss_mb'] / small['peak_tree_rss_mb']:.2f}  "
              f"(driver {large['driver_maxrss_mb'] / small['driver_maxrss_mb']:.2f})")


if __name__ == "__main__":
    main()
