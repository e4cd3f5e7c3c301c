"""The engine without models: `factory validate` over generated manifests, in fresh processes, measured in one run.

    python bench/engine.py                        # all three parts at 100,000 and 1,000,000 rows
    python bench/engine.py --rows 20000 200000    # smaller sizes
    python bench/engine.py --smoke                # the smallest sizes: does every part still run (seconds)

1. Throughput: rows/s of `factory validate` once Ray is up (each run in a fresh process that starts a private
   Ray first, then times the validation: planning, reading, validating, duplicate detection, rejects, markers).
   Each size validates into an output folder of its own, so no chunk is skipped as validated by an earlier run:
   a `WORK` line says how many rows it validated, and no figure is printed (exit code 2) unless every row was
   read once.
2. Memory: peak resident memory of the whole process tree (the driver and every Ray process it started, sampled
   every 0.2 s) at the smaller and the larger size, and their ratio.
3. Resume: a validation of the larger size killed half-way (once half of its chunks are validated), then run
   again: how many manifest rows the second run read again, in chunks and against the validation slots.

The generated rows mix the three tasks over 20 tenants and 6 regions, with 1 % invalid rows and 0.5 % repeated
ids, so every stage (rejects, duplicates, adapters) does real work. With `--address` each run joins that cluster
instead of starting a private Ray (the memory figures then cover the driver alone).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import Work, WorkLog  # noqa: E402

CHUNK_ROWS = 4096
SMOKE_ROWS = [2 * CHUNK_ROWS, 4 * CHUNK_ROWS]


def write_manifest(path: Path, rows: int) -> None:
    tenants = [f"tenant{t:02d}" for t in range(20)]
    regions = ["eu", "na", "apac", "latam", "mea", "uk"]
    with path.open("w") as handle:
        for index in range(rows):
            tenant = tenants[index % 20]
            row_id = f"sku-{index:08d}-{regions[index % 6]}"
            kind = index % 200
            if kind == 0:
                row = {"id": row_id, "tenant": tenant, "prompt": "poster", "width": 100}  # not a multiple of 16
            elif kind == 1:
                row = {"id": row_id, "tenant": tenant, "prompt": "poster", "colour": "red"}  # unknown field
            elif kind == 2:
                row = {"id": f"sku-{index - 3:08d}-{regions[(index - 3) % 6]}", "tenant": tenants[(index - 3) % 20],
                       "prompt": "again"}  # ids are unique per tenant: the repeat is of the same tenant's row
            elif kind < 9:
                row = {"id": row_id, "tenant": tenant, "task": "caption", "image": f"images/{index % 977}.jpg"}
            elif kind < 12:
                row = {"id": row_id, "tenant": tenant, "prompt": "Question: is the product visible?",
                       "image": f"images/{index % 977}.jpg"}
            else:
                row = {"id": row_id, "tenant": tenant, "region": regions[index % 6],
                       "prompt": f"A studio photo of product {index} on a clean background, soft light"}
            handle.write(json.dumps(row) + "\n")


def spec_file(work: Path, manifest: Path, name: str) -> Path:
    """A job named `name`, validated into `out/<name>/`: a folder of its own per name."""
    spec = work / f"{name}.yaml"
    spec.write_text(f"name: {name}\ninputs: [{manifest}]\noutput: {work / 'out'}\nchunk_rows: {CHUNK_ROWS}\n")
    return spec


def child(spec_path: str, address: str | None) -> None:
    """In a fresh process: start a private Ray, then validate; prints the figures as JSON."""
    import resource

    from bench.common import PeakTreeRss
    from factory.jobs.cluster import connect
    from factory.jobs.run import validate_job
    from factory.jobs.spec import load_spec
    from factory.logs import configure_logging

    configure_logging("warning")

    with PeakTreeRss() as peak:
        started = time.perf_counter()
        connect(address)
        ray_up = time.perf_counter()
        summary = validate_job(load_spec(spec_path), show_progress=False)
        finished = time.perf_counter()
    print(json.dumps({
        "rows": summary.rows, "requests": summary.requests, "rejects": summary.rejects,
        "duplicates": summary.duplicates, "rows_read": summary.rows_read, "rows_read_again": summary.rows_read_again,
        "ray_start_s": round(ray_up - started, 1), "validate_s": round(finished - ray_up, 1),
        "rows_per_s": round(summary.rows / (finished - ray_up)),
        "peak_tree_rss_mb": round(peak.peak / 2**20),
        "driver_maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }))


def child_command(spec: Path, address: str | None) -> list[str]:
    return [sys.executable, __file__, "child", str(spec), *(["--address", address] if address else [])]


def run_child(spec: Path, address: str | None, timeout: float = 1800) -> dict:
    done = subprocess.run(child_command(spec, address), capture_output=True, text=True, timeout=timeout)
    if done.returncode:
        raise SystemExit(f"validate failed: {done.stderr[-2000:]}")
    return json.loads(next(line for line in reversed(done.stdout.splitlines()) if line.startswith("{")))


def validated_chunks(work: Path, name: str) -> int:
    return sum(1 for _ in (work / "out" / name / "_chunks").glob("*/validated.json"))


def kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL the driver and every process under it at once: Ray's workers included, which would otherwise
    outlive their raylet for a moment and finish the chunk they hold."""
    import psutil

    root = psutil.Process(process.pid)
    tree = [root, *root.children(recursive=True)]
    for member in tree:
        try:
            member.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(tree, timeout=10)
    process.wait()


def resume(work: Path, manifest: Path, rows: int, address: str | None) -> dict:
    spec = spec_file(work, manifest, "resume")
    chunks = -(-rows // CHUNK_ROWS)
    process = subprocess.Popen(child_command(spec, address), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    while validated_chunks(work, "resume") < chunks // 2:
        if process.poll() is not None:
            raise SystemExit("the validation ended before half of it was done")
        time.sleep(0.05)
    kill_tree(process)
    before = validated_chunks(work, "resume")
    second = run_child(spec, address)
    from factory.jobs.sources.manifests.duplicates import VALIDATE_CPUS

    slots = int((os.cpu_count() or 1) / VALIDATE_CPUS)
    return {"chunks": chunks, "validated_at_kill": before, "rerun_rows_read": second["rows_read"],
            "rows_read_again": second["rows_read_again"],
            "chunks_read_again": round(second["rows_read_again"] / CHUNK_ROWS, 2), "validation_slots": slots,
            "rerun_validate_s": second["validate_s"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", nargs="?", default="all", choices=["all", "child"])
    parser.add_argument("spec", nargs="?", help=argparse.SUPPRESS)
    parser.add_argument("--rows", type=int, nargs=2, default=[100_000, 1_000_000])
    parser.add_argument("--smoke", action="store_true",
                        help=f"the smallest sizes ({SMOKE_ROWS[0]} and {SMOKE_ROWS[1]} rows): checks that every "
                             "part runs, measures nothing")
    parser.add_argument("--address", default=None,
                        help="each run joins this Ray cluster (host:port) instead of starting a private one")
    args = parser.parse_args()
    if args.part == "child":
        child(args.spec, args.address)
        return
    if args.smoke:
        args.rows = SMOKE_ROWS
    if args.rows[0] == args.rows[1]:
        parser.error("--rows: two different sizes (each validates into a folder named after its size)")
    work = Path(tempfile.mkdtemp(prefix="bench-engine-"))
    figures = {}
    work_log = WorkLog()
    for rows in args.rows:
        manifest = work / f"rows-{rows}.jsonl"
        write_manifest(manifest, rows)
        figures[rows] = run_child(spec_file(work, manifest, f"v{rows}"), args.address)
        print(f"validate {rows} rows: {json.dumps(figures[rows])}", flush=True)
        work_log.add(Work(f"validate {rows}", rows, figures[rows]["rows_read"], done_as="validated",
                          read_again=figures[rows]["rows_read_again"]))
    small, large = (figures[rows] for rows in args.rows)
    resumed = resume(work, work / f"rows-{args.rows[1]}.jsonl", args.rows[1], args.address)
    print(f"resume after a kill half-way: {json.dumps(resumed)}", flush=True)
    work_log.check()
    print(f"THROUGHPUT factory validate, {args.rows[1]} rows: {large['rows_per_s']} rows/s once Ray is up "
          f"(aim >= 20000; Ray start {large['ray_start_s']} s)")
    print(f"RATIO peak tree memory {args.rows[1]}/{args.rows[0]} rows = "
          f"{large['peak_tree_rss_mb'] / small['peak_tree_rss_mb']:.2f} ({large['peak_tree_rss_mb']} / "
          f"{small['peak_tree_rss_mb']} MB; aim <= 1.1)")
    print(f"RESUME rows read again = {resumed['rows_read_again']} = {resumed['chunks_read_again']} chunks of "
          f"{CHUNK_ROWS} with {resumed['validation_slots']} validation slots (aim <= one chunk per slot)")


if __name__ == "__main__":
    main()
