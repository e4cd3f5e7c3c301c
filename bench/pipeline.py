"""Throughput of `factory run` against a bare in-process loop and against a plain Ray Data actor pool over the
same rows and models, and peak memory of a run at two manifest sizes.

    python bench/pipeline.py                 # throughput
    python bench/pipeline.py throughput --rows 240 --repeats 3
    python bench/pipeline.py memory --rows 1000 10000
    python bench/pipeline.py all --smoke     # the smallest sizes: does every part still run (seconds per run)

Throughput, three ways over the same generation rows, alternating, medians of each:
- bare: the same ModelStack, safety policy and batch runner in this process, batches of the replica's batch
  size, the same PNG writes; no Ray.
- factory: `factory run` (chunks, validation, duplicate ids, Ray Data callers, one Serve replica, worker
  commits); the replica is warm (deployed by an untimed first run and kept). Every run, the warm-up included,
  writes to an output folder of its own, so no timed run finds images to reuse (`_reuse/` lives in the output
  folder) or chunks to resume; each prints a `WORK` line with the rows its summary says reached the replicas.
- actor pool: the simpler design, `read_json -> map_batches(actor holding the same stack and runner) ->
  write_parquet`, no Serve, no chunks; its actor loads the models inside each timed run.
Each is given as whole-run rows/s, and the two Ray designs also as steady rows/s (rows finished between the
10th and 90th percentile of finish times, over that span), which leaves out start-up and tail on both. No ratio
is printed (exit code 2) when any timed run sent fewer or more rows to the model than it was given.
Memory: each size runs in a fresh process; the peak is the sum of RSS over the driver and every Ray process it
started, sampled every 0.2 s (with `--address`, the driver only: the cluster's processes are not its own).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import Work, WorkLog, add_ray_arguments, join_or_start_ray, run_work  # noqa: E402

SMOKE = {"rows": 8, "size": 64, "steps": 1, "memory": [8, 16]}


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


def bare_loop(manifest: Path, output: Path, runner, spec, label: str = "bare") -> tuple[float, Work]:
    """The same rows, parser, runner, safety checks, PNG encoding and writes, in this process, no Ray."""
    from factory.io.storage import Storage
    from factory.jobs.sources.manifests.files import iter_manifest_records
    from factory.jobs.spec import generation_defaults
    from factory.routing.batch import ReplicaCall
    from factory.routing.parser import parse_request

    storage, defaults = Storage(), generation_defaults(spec)
    requests = [parse_request(record.raw, defaults) for record in iter_manifest_records(str(manifest), storage)]
    started = time.perf_counter()
    batch = spec.serve.max_batch_size
    answered = 0
    for start in range(0, len(requests), batch):
        chunk = requests[start:start + batch]
        for request, result in zip(chunk, runner.run([ReplicaCall(request=r) for r in chunk]), strict=True):
            storage.write_bytes(str(output / request.tenant / f"{request.id}.png"), result.image_png)
            answered += 1
    return len(requests) / (time.perf_counter() - started), Work(label, len(requests), answered)


def steady_rows_per_s(finished: list) -> float:
    """Rows finished between the 10th and 90th percentile of finish times, over that span."""
    times = sorted(t.timestamp() if hasattr(t, "timestamp") else float(t) for t in finished)
    low, high = times[len(times) // 10], times[(9 * len(times)) // 10]
    inside = sum(1 for t in times if low <= t <= high)
    return inside / max(high - low, 1e-9)


def factory_run(spec, run_id: str, rows: int) -> tuple[float, float, Work]:
    """One `factory run` of `spec` (its own output folder); whole-run and steady rows/s, and its work."""
    from factory.io.layout import OutputLayout
    from factory.io.storage import Storage
    from factory.jobs.engine.commit import read_table
    from factory.jobs.run import run_job
    from factory.jobs.spec import output_root

    started = time.perf_counter()
    summary = run_job(spec, run_id=run_id, show_progress=False)
    whole = summary.rows / (time.perf_counter() - started)
    results = read_table(Storage(), OutputLayout(output_root(spec, run_id)).results, ["finished_at"], hive=True)
    return whole, steady_rows_per_s(results.column("finished_at").to_pylist()), run_work(f"factory {run_id}", rows, summary)


class StackWorker:
    """The plain actor-pool design: a Ray Data actor holding the whole stack itself (no Serve, no chunks)."""

    def __init__(self, spec_json: str, output: str, threads: int):
        from factory.jobs.spec import JobSpec, generation_defaults

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


def actor_pool_run(manifest: Path, output: Path, spec, threads: int, rows: int, label: str) -> tuple[float, float, Work]:
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
    # Every result row was made by the actor's runner: the pool has no cache and no resume.
    return whole, steady_rows_per_s(table.column("finished_at").to_pylist()), Work(label, rows, table.num_rows)


def throughput(rows: int, repeats: int, size: int, steps: int, batch: int, cpus: float, address: str | None,
               work_log: WorkLog) -> dict:
    import ray

    from factory.jobs.cluster.serve_app import default_app_name

    threads = max(1, int(cpus))  # the replica's torch threads for `cpus` (factory.routing.app.replica_setup)
    join_or_start_ray(address, math.ceil(2 * cpus + 2))
    work = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    manifest = work / "rows.jsonl"
    write_manifest(manifest, rows)

    def spec_for(run_id: str):
        """The job, writing to a folder of its own: nothing to reuse, resume or claim from another run."""
        return make_spec(manifest, work / f"factory-{run_id}", size=size, steps=steps, cpus=cpus, batch=batch)

    warm_spec = spec_for("warmup")
    runner = _runner(warm_spec, threads)
    bare_loop(manifest, work / "warm", runner, warm_spec)
    *_, warm = factory_run(warm_spec, "warmup", rows)  # deploys the replica and keeps it; not timed
    print(f"  warm-up (not timed): {warm.line()}", flush=True)
    figures: dict[str, list[float]] = {key: [] for key in ("bare", "factory", "factory_steady", "pool", "pool_steady")}
    for repeat in range(repeats):
        bare, bare_work = bare_loop(manifest, work / f"bare{repeat}", runner, warm_spec, f"bare {repeat}")
        figures["bare"].append(bare)
        whole, steady, factory_work = factory_run(spec_for(f"timed{repeat}"), f"timed{repeat}", rows)
        figures["factory"].append(whole)
        figures["factory_steady"].append(steady)
        whole, steady, pool_work = actor_pool_run(manifest, work / f"pool{repeat}", warm_spec, threads, rows,
                                                  f"pool {repeat}")
        figures["pool"].append(whole)
        figures["pool_steady"].append(steady)
        print(f"  repeat {repeat}: bare {figures['bare'][-1]:.2f} ({bare_work.brief()}), factory "
              f"{figures['factory'][-1]:.2f} steady {figures['factory_steady'][-1]:.2f} ({factory_work.brief()}), "
              f"pool {figures['pool'][-1]:.2f} steady {figures['pool_steady'][-1]:.2f} ({pool_work.brief()}) rows/s",
              flush=True)
        for done in (bare_work, factory_work, pool_work):
            work_log.add(done)
    from ray import serve

    serve.delete(default_app_name(warm_spec.name))
    result = {"rows": rows, "size": size, "steps": steps, "batch": batch, "threads": threads,
              **{f"{key}_rows_per_s": round(statistics.median(values), 2) for key, values in figures.items()}}
    result["factory_vs_bare"] = round(result["factory_rows_per_s"] / result["bare_rows_per_s"], 3)
    result["pool_vs_bare"] = round(result["pool_rows_per_s"] / result["bare_rows_per_s"], 3)
    result["factory_vs_pool"] = round(result["factory_rows_per_s"] / result["pool_rows_per_s"], 3)
    result["factory_vs_pool_steady"] = round(result["factory_steady_rows_per_s"] / result["pool_steady_rows_per_s"], 3)
    ray.shutdown()
    return result


def memory_child(rows: int, size: int, steps: int, cpus: float, address: str | None) -> None:
    """Runs in a fresh process: one factory run over `rows` rows; prints peak tree RSS and its work as JSON."""
    import resource

    import ray

    from factory.jobs.cluster import connect

    connect(address)
    work = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    write_manifest(work / "rows.jsonl", rows)
    spec = make_spec(work / "rows.jsonl", work / "out", size=size, steps=steps, cpus=cpus, batch=8)
    from bench.common import PeakTreeRss
    from factory.jobs.cluster.serve_app import default_app_name, release
    from factory.jobs.run import run_job

    started = time.perf_counter()
    with PeakTreeRss() as peak:
        summary = run_job(spec, run_id="memory", show_progress=False)
    release(default_app_name(spec.name))
    print(json.dumps({
        "rows": summary.rows, "seconds": round(time.perf_counter() - started, 1),
        "peak_tree_rss_mb": round(peak.peak / 2**20), "driver_maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "work": asdict(run_work(f"memory {rows}", rows, summary)),
    }))
    ray.shutdown()


def memory(sizes: list[int], size: int, steps: int, cpus: float, address: str | None, work_log: WorkLog) -> list[dict]:
    results = []
    for rows in sizes:
        command = [sys.executable, __file__, "memory-child", "--rows", str(rows), "--size", str(size), "--steps",
                   str(steps), "--cpus", str(cpus), *(["--address", address] if address else [])]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"memory run of {rows} rows failed: {done.stderr[-2000:]}")
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        work_log.add(Work(**results[-1].pop("work")))
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
    parser.add_argument("--smoke", action="store_true",
                        help=f"the smallest sizes (throughput: {SMOKE['rows']} rows, 1 repeat, {SMOKE['size']}x"
                             f"{SMOKE['size']}, {SMOKE['steps']} step; memory: {SMOKE['memory']}): checks that "
                             "every part runs, measures nothing")
    add_ray_arguments(parser, cpus=float(os.cpu_count() or 1),
                      cpus_help="logical CPUs of the replica and of the actor pool's actor; torch threads follow "
                                "them as in a replica")
    args = parser.parse_args()
    if args.smoke:
        args.rows, args.repeats, args.size, args.steps = args.rows or [SMOKE["rows"]], 1, SMOKE["size"], SMOKE["steps"]
    os.environ.setdefault("FACTORY_LOG_LEVEL", "warning")
    from factory.logs import configure_logging

    configure_logging("warning")
    if args.part == "memory-child":
        memory_child(args.rows[0], args.size, args.steps, args.cpus, args.address)
        return
    if args.part in ("all", "throughput"):
        print("throughput: bare in-process loop vs factory run (one replica) vs a plain Ray Data actor pool; "
              "every run writes to an output folder of its own", flush=True)
        work_log = WorkLog()
        result = throughput((args.rows or [240])[0], args.repeats, args.size, args.steps, args.batch, args.cpus,
                            args.address, work_log)
        print(json.dumps(result))
        work_log.check()
        print(f"RATIO factory/bare = {result['factory_vs_bare']:.2f}, actor pool/bare = {result['pool_vs_bare']:.2f}")
        print(f"RATIO factory/actor pool = {result['factory_vs_pool']:.2f} whole run, "
              f"{result['factory_vs_pool_steady']:.2f} steady (aim >= 1.0)")
    if args.part in ("all", "memory"):
        print("memory: peak RSS of the whole run (driver + Ray processes)", flush=True)
        sizes = SMOKE["memory"] if args.smoke else (args.rows if args.part == "memory" and args.rows else [1000, 10000])
        work_log = WorkLog()
        small, large = memory(sizes, 64, 1, args.cpus, args.address, work_log)
        work_log.check()
        print(f"RATIO peak memory {large['rows']}/{small['rows']} rows = "
              f"{large['peak_tree_rss_mb'] / small['peak_tree_rss_mb']:.2f}  "
              f"(driver {large['driver_maxrss_mb'] / small['driver_maxrss_mb']:.2f})")


if __name__ == "__main__":
    main()
