"""What CLIPScore costs: generation rows with `quality.clip_score` on against the same rows without it.

    python bench/quality.py                   # 64 rows of 256x256 at 4 steps (the tiny profile), 3 repeats
    python bench/quality.py --rows 128 --repeats 5
    python bench/quality.py --smoke           # the smallest sizes: does every part still run (not a measurement)

Two ways, alternating scored and plain, medians of each:
- in-process: the replica's batch runner over the same rows in batches of the replica's batch size, its stack once
  without and once with the profile's CLIP model beside it (the same generator, safety checker and PNG
  encoding); no Ray. Model milliseconds per image each way, and the scoring's own share (the rows' `quality_ms`).
- job: `factory run` of the same spec with and without `quality: {clip_score: true}`, each on warm replicas of its
  own (a warm-up run of each deploys them, untimed; loading CLIP is a replica's start-up cost, reported apart),
  every timed run writing to an output folder of its own so no row is reused or resumed, with a `WORK` line of
  the rows that reached the model. From the results: `quality_ms` (CLIP's time per row) over `latency_ms` (the
  row's model time, scoring included), and whole-run rows/s each way (the scored run also writes quality.json).
No ratio is printed (exit code 2) when a timed run sent fewer or more rows to the model than it was given.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import Work, WorkLog, add_ray_arguments, join_or_start_ray, run_work  # noqa: E402

SMOKE = {"rows": 8, "size": 64, "steps": 1}
AIM_PERCENT = 5.0


def write_manifest(path: Path, rows: int) -> None:
    subjects = ["a red bicycle", "a cup of coffee", "a summer sale poster", "a cat on a sofa", "a mountain lake"]
    with path.open("w") as handle:
        for index in range(rows):
            row = {"id": f"r{index:05d}", "tenant": "acme", "prompt": f"{subjects[index % len(subjects)]}, no. {index}"}
            handle.write(json.dumps(row) + "\n")


def make_spec(name: str, manifest: Path, output: Path, *, scored: bool, size: int, steps: int, cpus: float,
              batch: int):
    from factory.jobs.spec import JobSpec

    return JobSpec.model_validate({
        "name": name, "inputs": [str(manifest)], "output": str(output),
        "defaults": {"steps": steps, "width": size, "height": size},
        "serve": {"replicas": 1, "num_cpus": cpus, "max_batch_size": batch, "max_ongoing_requests": 2 * batch,
                  "keep_warm": True},
        "in_flight": 4 * batch, "reuse": False,
        **({"quality": {"clip_score": True}} if scored else {}),
    })


# ---- in-process -------------------------------------------------------------------------------------------


def in_process(rows: int, repeats: int, size: int, steps: int, batch: int, threads: int) -> dict:
    import torch

    from factory.model.clip import ClipScorer, scoring_model
    from factory.model.profiles import get_profile
    from factory.model.stack import ModelStack
    from factory.routing.batch import ReplicaCall
    from factory.routing.parser import GenerationDefaults, parse_request
    from factory.routing.replica import ReplicaConfig, build_runner

    torch.set_num_threads(threads)
    plain_stack = ModelStack.from_profile("tiny")
    started = time.perf_counter()
    scorer = ClipScorer.from_profile(scoring_model(get_profile("tiny")))
    load_s = time.perf_counter() - started
    runners = {
        "plain": build_runner(ReplicaConfig(max_batch_size=batch, threads=threads), plain_stack),
        "scored": build_runner(ReplicaConfig(max_batch_size=batch, threads=threads, clip_score=True),
                               dataclasses.replace(plain_stack, clip=scorer)),
    }
    defaults = GenerationDefaults(steps=steps, width=size, height=size, guidance=3.5)
    requests = [parse_request({"id": f"r{i}", "tenant": "acme", "prompt": f"a red bicycle, no. {i}"}, defaults)
                for i in range(rows)]
    figures: dict[str, list[float]] = {"plain_ms": [], "scored_ms": [], "scoring_ms": []}
    for name, runner in runners.items():  # warm-up, untimed: first calls allocate
        runner.run([ReplicaCall(request=request) for request in requests[:batch]])
    for _ in range(repeats):
        for name, runner in runners.items():
            latency, scoring = [], []
            for start in range(0, rows, batch):
                for result in runner.run([ReplicaCall(request=r) for r in requests[start:start + batch]]):
                    latency.append(result.latency_ms)
                    scoring.append(result.quality_ms or 0.0)
            figures[f"{name}_ms"].append(statistics.fmean(latency))
            if name == "scored":
                figures["scoring_ms"].append(statistics.fmean(scoring))
    result = {key: round(statistics.median(values), 3) for key, values in figures.items()}
    result["clip_load_s"] = round(load_s, 2)
    result["scoring_percent_of_model"] = round(100 * result["scoring_ms"] / result["plain_ms"], 2)
    result["scored_vs_plain"] = round(result["scored_ms"] / result["plain_ms"], 3)
    return result


# ---- job --------------------------------------------------------------------------------------------------


def job_run(spec, run_id: str, rows: int, label: str) -> tuple[dict, Work]:
    """One `factory run`; its rows/s (replica start-up left out, as the summary's), and the mean model and scoring
    milliseconds per ok row from its results."""
    from factory.io.layout import OutputLayout
    from factory.io.storage import Storage
    from factory.jobs.engine.commit import read_table
    from factory.jobs.run import run_job
    from factory.jobs.spec import output_root

    summary = run_job(spec, run_id=run_id, show_progress=False)
    table = read_table(Storage(), OutputLayout(output_root(spec, run_id)).results, ["status", "latency_ms",
                                                                                    "quality_ms"], hive=True)
    ok = [row for row in table.to_pylist() if row["status"] == "ok"]
    figures = {
        "rows_per_s": summary.rows_per_second,
        "latency_ms": statistics.fmean(row["latency_ms"] for row in ok) if ok else math.nan,
        "quality_ms": statistics.fmean(row["quality_ms"] or 0.0 for row in ok) if ok else math.nan,
        "replica_start_s": summary.replica_start_seconds,
    }
    return figures, run_work(label, rows, summary)


def job(rows: int, repeats: int, size: int, steps: int, batch: int, cpus: float, address: str | None,
        work_log: WorkLog) -> dict:
    import ray
    from ray import serve

    from factory.jobs.cluster.serve_app import default_app_name

    join_or_start_ray(address, math.ceil(2 * cpus + 2))
    work = Path(tempfile.mkdtemp(prefix="bench-quality-"))
    manifest = work / "rows.jsonl"
    write_manifest(manifest, rows)

    def spec_for(kind: str, run_id: str):
        # A job name per kind: each keeps its own warm app; an output per run: nothing reused or resumed.
        return make_spec(f"bench-quality-{kind}", manifest, work / f"{kind}-{run_id}", scored=kind == "scored",
                         size=size, steps=steps, cpus=cpus, batch=batch)

    starts = {}
    for kind in ("plain", "scored"):
        figures, warm = job_run(spec_for(kind, "warmup"), "warmup", rows, f"{kind} warmup")
        starts[kind] = figures["replica_start_s"]
        print(f"  warm-up (not timed): {warm.line()}", flush=True)
    runs: dict[str, list[dict]] = {"plain": [], "scored": []}
    for repeat in range(repeats):
        for kind in ("plain", "scored"):
            figures, done = job_run(spec_for(kind, f"timed{repeat}"), f"timed{repeat}", rows, f"{kind} {repeat}")
            runs[kind].append(figures)
            work_log.add(done)
            print(f"  repeat {repeat} {kind}: {figures['rows_per_s']:.2f} rows/s, model {figures['latency_ms']:.2f} "
                  f"ms/row, scoring {figures['quality_ms']:.3f} ms/row ({done.brief()})", flush=True)
    for kind in ("plain", "scored"):
        serve.delete(default_app_name(spec_for(kind, "x").name))

    def median(kind: str, key: str) -> float:
        return statistics.median(figures[key] for figures in runs[kind])

    result = {
        "rows": rows, "size": size, "steps": steps, "batch": batch,
        "plain_rows_per_s": round(median("plain", "rows_per_s"), 3),
        "scored_rows_per_s": round(median("scored", "rows_per_s"), 3),
        "plain_model_ms": round(median("plain", "latency_ms"), 3),
        "scored_model_ms": round(median("scored", "latency_ms"), 3),
        "scoring_ms": round(median("scored", "quality_ms"), 3),
        "replica_start_s": {kind: round(seconds, 2) for kind, seconds in starts.items()},
    }
    result["scoring_percent_of_model"] = round(100 * result["scoring_ms"] / result["plain_model_ms"], 2)
    result["scored_vs_plain_rows_per_s"] = round(result["scored_rows_per_s"] / result["plain_rows_per_s"], 3)
    if address is None:
        ray.shutdown()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--smoke", action="store_true",
                        help=f"the smallest sizes ({SMOKE['rows']} rows, 1 repeat, {SMOKE['size']}x{SMOKE['size']}, "
                             f"{SMOKE['steps']} step): checks that every part runs, measures nothing")
    add_ray_arguments(parser, cpus=float(os.cpu_count() or 1),
                      cpus_help="logical CPUs of each replica; torch threads follow them as in a replica")
    args = parser.parse_args()
    if args.smoke:
        args.rows, args.repeats, args.size, args.steps = SMOKE["rows"], 1, SMOKE["size"], SMOKE["steps"]
    os.environ.setdefault("FACTORY_LOG_LEVEL", "warning")
    from factory.logs import configure_logging

    configure_logging("warning")
    threads = max(1, int(args.cpus))
    print(f"in-process: the replica's batch runner, {args.rows} rows, without and with CLIP", flush=True)
    bare = in_process(args.rows, args.repeats, args.size, args.steps, args.batch, threads)
    print(json.dumps({"in_process": bare}), flush=True)
    print("job: factory run without and with quality.clip_score, every run its own output", flush=True)
    work_log = WorkLog()
    result = job(args.rows, args.repeats, args.size, args.steps, args.batch, args.cpus, args.address, work_log)
    print(json.dumps({"job": result}), flush=True)
    work_log.check()
    print(f"SCORING in-process: {bare['scoring_ms']:.3f} ms per image = {bare['scoring_percent_of_model']:.2f} % of "
          f"model time ({bare['plain_ms']:.2f} ms); CLIP loads in {bare['clip_load_s']:.2f} s, once per replica")
    print(f"SCORING job: {result['scoring_ms']:.3f} ms per image = {result['scoring_percent_of_model']:.2f} % of model "
          f"time ({result['plain_model_ms']:.2f} ms)")
    print(f"RATIO scored/plain rows/s = {result['scored_vs_plain_rows_per_s']:.3f}; scoring/model time = "
          f"{result['scoring_percent_of_model']:.2f} % (aim < {AIM_PERCENT:g} %)")


if __name__ == "__main__":
    main()
