"""Throughput of `factory run` against a bare in-process loop over the same rows and models, and peak
memory of a run at two manifest sizes.

    python bench/pipeline.py                 # both parts
    python bench/pipeline.py throughput --rows 240 --repeats 3
    python bench/pipeline.py memory --rows 1000 10000

Throughput: the bare loop loads the same ModelStack in this process and runs the same rows in batches of
the replica's batch size through the same executor, encoding and writing the same PNGs. factory runs them
through Ray Data and one Serve replica (warm: the replica is deployed by an untimed first run). Runs
alternate; the medians and their ratio are printed. Memory: each size runs in a fresh process; the peak is
the sum of RSS over the driver and every Ray process it started, sampled every 0.2 s.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
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
        "serve": {"replicas": 1, "num_cpus": cpus, "max_batch_size": batch, "max_ongoing_requests": 2 * batch},
        "in_flight": 4 * batch, "batch_size": 4 * batch, "commit": {"rows": 512, "seconds": 10},
    })


def bare_loop(manifest: Path, output: Path, stack, spec) -> float:
    """The same rows, parser, executor, safety checks, PNG encoding and writes, in this process, no Ray."""
    from factory.jobs.manifests import iter_manifest_records
    from factory.jobs.pipeline import generation_defaults
    from factory.jobs.storage import Storage
    from factory.routing.executor import TaskExecutor
    from factory.routing.parser import parse_request

    from factory.safety.policy import SafetyChecker

    # The same work a replica does: the same stack and the same safety policy on every image.
    safety = SafetyChecker(spec.safety)
    storage, executor, defaults = Storage(), TaskExecutor(stack, safety), generation_defaults(spec)
    requests = [parse_request(record.raw, defaults) for record in iter_manifest_records(str(manifest), storage)]
    started = time.perf_counter()
    batch = spec.serve.max_batch_size
    for start in range(0, len(requests), batch):
        chunk = requests[start:start + batch]
        for request, result in zip(chunk, executor.run(chunk, [None] * len(chunk))):
            storage.write_bytes(str(output / request.tenant / f"{request.id}.png"), result.image_png)
    return len(requests) / (time.perf_counter() - started)


def factory_run(spec, run_id: str) -> float:
    from factory.jobs.pipeline import run_job

    started = time.perf_counter()
    summary = run_job(spec, run_id=run_id, show_progress=False)
    return summary.rows / (time.perf_counter() - started)


def throughput(rows: int, repeats: int, size: int, steps: int, batch: int) -> dict:
    import ray
    import torch

    from factory.model.stack import ModelStack

    cpus = float(os.cpu_count() or 1)
    # Logical CPUs beyond the cores: the replica gets every core for torch (as the bare loop does), and Ray
    # Data's light stages still find CPU slots to run in.
    ray.init(num_cpus=int(cpus) + 2, include_dashboard=False, logging_level="WARNING")
    work = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    manifest = work / "rows.jsonl"
    write_manifest(manifest, rows)
    spec = make_spec(manifest, work / "factory", size=size, steps=steps, cpus=cpus, batch=batch)
    torch.set_num_threads(int(cpus))
    stack = ModelStack.from_profile(spec.profile)
    bare_loop(manifest, work / "warm", stack, spec)
    factory_run(spec, "warmup")  # deploys the replica; not timed
    bare, fact = [], []
    for repeat in range(repeats):
        bare.append(bare_loop(manifest, work / f"bare{repeat}", stack, spec))
        fact.append(factory_run(spec, f"timed{repeat}"))
        print(f"  repeat {repeat}: bare {bare[-1]:.1f} rows/s, factory {fact[-1]:.1f} rows/s", flush=True)
    result = {
        "rows": rows, "size": size, "steps": steps, "batch": batch, "threads": int(cpus),
        "bare_rows_per_s": round(statistics.median(bare), 2), "factory_rows_per_s": round(statistics.median(fact), 2),
        "ms_per_row_bare": round(1000 / statistics.median(bare), 1),
    }
    result["ratio"] = round(result["factory_rows_per_s"] / result["bare_rows_per_s"], 3)
    ray.shutdown()
    return result


def _tree_rss() -> int:
    import psutil

    me = psutil.Process()
    total = 0
    for process in [me, *me.children(recursive=True)]:
        try:
            total += process.memory_info().rss
        except psutil.Error:
            pass
    return total


def memory_child(rows: int, size: int, steps: int) -> None:
    """Runs in a fresh process: one factory run over `rows` rows; prints peak tree RSS as JSON."""
    import resource

    import ray

    ray.init(num_cpus=(os.cpu_count() or 1) + 2, include_dashboard=False, logging_level="WARNING")
    work = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    write_manifest(work / "rows.jsonl", rows)
    spec = make_spec(work / "rows.jsonl", work / "out", size=size, steps=steps, cpus=float(os.cpu_count() or 1), batch=8)
    peak = {"tree": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak["tree"] = max(peak["tree"], _tree_rss())
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    from factory.jobs.pipeline import run_job

    summary = run_job(spec, run_id="memory", show_progress=False)
    done.set()
    sampler.join()
    print(json.dumps({
        "rows": summary.rows, "seconds": round(time.perf_counter() - started, 1),
        "peak_tree_rss_mb": round(peak["tree"] / 2**20), "driver_maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
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
    parser.add_argument("part", nargs="?", default="all", choices=["all", "throughput", "memory", "memory-child"])
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
        print("throughput: bare in-process loop vs factory run (one replica)", flush=True)
        result = throughput((args.rows or [240])[0], args.repeats, args.size, args.steps, args.batch)
        print(json.dumps(result))
        print(f"RATIO factory/bare = {result['ratio']:.2f}  ({result['factory_rows_per_s']} vs "
              f"{result['bare_rows_per_s']} rows/s, {result['ms_per_row_bare']} ms/row bare)")
    if args.part in ("all", "memory"):
        print("memory: peak RSS of the whole run (driver + Ray processes)", flush=True)
        small, large = memory(args.rows or [1000, 10000], 64, 1)
        print(f"RATIO peak memory {large['rows']}/{small['rows']} rows = "
              f"{large['peak_tree_rss_mb'] / small['peak_tree_rss_mb']:.2f}  "
              f"(driver {large['driver_maxrss_mb'] / small['driver_maxrss_mb']:.2f})")


if __name__ == "__main__":
    main()
