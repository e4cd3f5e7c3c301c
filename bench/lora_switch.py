"""LoRA costs on the tiny profile: adapter load and switch times, and what grouping rows by adapter saves.

    python bench/lora_switch.py [--repeats 7] [--rows 200] [--size 128] [--steps 2] [--pool 4]
    python bench/lora_switch.py --smoke      # the smallest sizes: does every part still run (seconds)

Part 1 prints medians over `--repeats` for rank 8 and rank 64 adapters on the tiny transformer:
- read+check: reading the file, safetensors parsing, diffusers' key conversion and the shape checks;
- load: `load_lora_weights` plus the after-load check (what the pool counts as load_ms);
- switch: `set_adapters` to another loaded adapter (pool switch_ms), and back to the base model.

Part 2 runs a shuffled manifest (`--rows` rows, 5 tenants x 2 regions = 10 adapters) through one generator and
one LoraPool (`--pool` adapters), in batches of `--batch`, two ways: in manifest order, and with rows sorted by
adapter within windows of `--window` rows. A batch that mixes adapters becomes one pipeline call per adapter
(diffusers cannot mix adapters in a call). It prints calls, switches, loads, rows/s (median of
`--sim-repeats` alternating runs) and the ratio. Run in-process, without Ray: this is the per-batch cost
grouping removes, not the whole job.

Part 3 (`--job`, on by default) runs the same kind of shuffled manifest through `factory run` (Ray Data -> one
warm Serve replica, the job's own app), with the pipeline's adapter ordering off and on, alternating. Every run,
the warm-up included, writes to an output folder of its own, so no timed row is reused from another run's
`_reuse/` or resumed; each prints a `WORK` line with the rows its summary says reached the replica, and the ratio
is not printed (exit code 2) when a timed run sent fewer or more rows to the model than the manifest holds.
"""

from __future__ import annotations

import argparse
import logging
import math
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path

import structlog

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import WorkLog, add_ray_arguments, join_or_start_ray, run_work  # noqa: E402
from factory.model.generator import FluxGenerator, GenerationParams
from factory.model.lora import AdapterRef, LoraPool, create_lora
from factory.model.lora.safe_load import prepare_adapter, read_adapter
from factory.model.profiles import get_profile
from factory.logs import quiet_library_noise
from factory.model.stack import resolve_sources

TENANTS = ("acme", "globex", "initech", "umbrella", "hooli")
REGIONS = ("eu", "na")
PROMPTS = ("a red bicycle", "a bowl of fruit", "summer sale, bold colors", "a cat on a sofa", "mountains at dawn")
SMOKE = {"repeats": 1, "rows": 8, "batch": 4, "window": 8, "pool": 2, "size": 64, "steps": 1, "sim_repeats": 1}


@dataclass(frozen=True)
class Row:
    index: int
    adapter: AdapterRef
    params: GenerationParams


@dataclass(frozen=True)
class RunResult:
    rows: int
    calls: int
    switches: int
    loads: int
    evictions: int
    seconds: float

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds


def median_ms(values: list[float]) -> float:
    return round(statistics.median(values), 2)


# ---- part 1: load and switch ------------------------------------------------------------------------------


def load_and_switch(generator: FluxGenerator, folder: Path, rank: int, repeats: int) -> dict[str, float]:
    transformer = generator.pipe.transformer
    refs = [AdapterRef(key=f"bench/r{rank}-{i}", uri=str(create_lora(folder / f"r{rank}-{i}.safetensors",
                                                                       transformer=transformer, rank=rank,
                                                                       alpha=rank, seed=i)))
            for i in range(2)]
    read_check, load, switch, to_base = [], [], [], []
    pool = LoraPool(generator.pipe, max_adapters=2)
    for _ in range(repeats):
        started = time.perf_counter()
        prepare_adapter(read_adapter(refs[0].uri), generator.pipe)
        read_check.append((time.perf_counter() - started) * 1000)
        pool.ensure_loaded(refs[0])
        load.append(pool.stats()["load_ms_last"])
        pool.evict(refs[0].key)
    for ref in refs:
        pool.ensure_loaded(ref)
    for i in range(2 * repeats):
        pool.activate(refs[i % 2])
        switch.append(pool.stats()["switch_ms_last"])
        if i % 2:
            pool.activate(None)
            to_base.append(pool.stats()["switch_ms_last"])
    pool.clear()
    return {"read+check": median_ms(read_check), "load": median_ms(load), "switch": median_ms(switch),
            "to base": median_ms(to_base)}


# ---- part 2: shuffled vs grouped --------------------------------------------------------------------------


def manifest(adapters: list[AdapterRef], rows: int, size: int, steps: int, seed: int = 0) -> list[Row]:
    rng = random.Random(seed)
    return [
        Row(i, rng.choice(adapters), GenerationParams(prompt=rng.choice(PROMPTS), seed=i, steps=steps, width=size,
                                                      height=size, guidance=3.5))
        for i in range(rows)
    ]


def group_within_windows(rows: list[Row], window: int) -> list[Row]:
    """Rows sorted by adapter inside each window of `window` rows; the windows keep manifest order, which
    bounds how far a row moves (and so how much the job must hold in flight)."""
    grouped: list[Row] = []
    for start in range(0, len(rows), window):
        grouped.extend(sorted(rows[start : start + window], key=lambda row: (row.adapter.key, row.index)))
    return grouped


def plan_calls(rows: list[Row], batch_size: int) -> list[list[Row]]:
    """Batches of `batch_size` consecutive rows, each split into one pipeline call per run of one adapter."""
    calls: list[list[Row]] = []
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        calls.extend(list(run) for _, run in groupby(batch, key=lambda row: row.adapter.key))
    return calls


def run_calls(generator: FluxGenerator, pool: LoraPool, calls: list[list[Row]]) -> RunResult:
    """The per-batch cost in-process: activate the call's adapter, generate its rows."""
    started = time.perf_counter()
    for call in calls:
        with pool.use(call[0].adapter):
            generator.generate([row.params for row in call])
    seconds = time.perf_counter() - started
    stats = pool.stats()
    return RunResult(sum(len(c) for c in calls), len(calls), stats["switches"], stats["loads"], stats["evictions"],
                     seconds)


def shuffled_vs_grouped(generator: FluxGenerator, folder: Path, args: argparse.Namespace) -> dict[str, RunResult]:
    transformer = generator.pipe.transformer
    adapters = [
        AdapterRef(key=f"{tenant}/{region}", uri=str(create_lora(folder / f"{tenant}-{region}.safetensors",
                                                                 transformer=transformer, rank=8, alpha=8, seed=i)))
        for i, (tenant, region) in enumerate((t, r) for t in TENANTS for r in REGIONS)
    ]
    rows = manifest(adapters, args.rows, args.size, args.steps)
    plans = {"shuffled": plan_calls(rows, args.batch),
             "grouped": plan_calls(group_within_windows(rows, args.window), args.batch)}
    runs: dict[str, list[RunResult]] = {name: [] for name in plans}
    # Alternating the two orders spreads drift in machine load (shared CPUs) evenly over both.
    for _ in range(args.sim_repeats):
        for name, calls in plans.items():
            pool = LoraPool(generator.pipe, max_adapters=args.pool)  # cold for both, same bound
            runs[name].append(run_calls(generator, pool, calls))
            pool.clear()
    return {name: sorted(results, key=lambda r: r.seconds)[len(results) // 2] for name, results in runs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed repetitions for load/switch medians")
    parser.add_argument("--rows", type=int, default=200)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--pool", type=int, default=4, help="max adapters held by the pool")
    parser.add_argument("--size", type=int, default=128, help="image side in pixels")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--sim-repeats", type=int, default=3, help="runs of each order; the median is printed")
    parser.add_argument("--job", action=argparse.BooleanOptionalAction, default=True,
                        help="also run part 3, through the Ray job")
    parser.add_argument("--smoke", action="store_true",
                        help="the smallest sizes (" + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in SMOKE.items())
                             + "): checks that every part runs, measures nothing")
    add_ray_arguments(parser, cpus=2.0, cpus_help="part 3: logical CPUs of the job's replica (its torch threads)")
    args = parser.parse_args()
    if args.smoke:
        for key, value in SMOKE.items():
            setattr(args, key, value)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    quiet_library_noise()
    import diffusers

    # diffusers notes on every load that these adapters have no text-encoder layers; true and expected here.
    diffusers.utils.logging.set_verbosity_error()

    profile = get_profile("tiny")
    source, _, _ = resolve_sources(profile)
    generator = FluxGenerator.from_pretrained(source, profile.generator)
    warm = [GenerationParams(prompt="warm up", seed=0, steps=args.steps, width=args.size, height=args.size,
                             guidance=3.5)] * args.batch
    for _ in range(3):  # first calls pay one-off allocation and kernel selection costs
        generator.generate(warm)

    with tempfile.TemporaryDirectory(prefix="lora-bench-") as tmp:
        folder = Path(tmp)
        print(f"tiny profile, {args.repeats} repetitions, medians in ms")
        print(f"{'rank':>5} {'read+check':>11} {'load':>8} {'switch':>8} {'to base':>8}")
        for rank in (8, 64):
            row = load_and_switch(generator, folder, rank, args.repeats)
            print(f"{rank:>5} {row['read+check']:>11} {row['load']:>8} {row['switch']:>8} {row['to base']:>8}")

        results = shuffled_vs_grouped(generator, folder, args)
    print(f"\n{args.rows} rows, {len(TENANTS)} tenants x {len(REGIONS)} regions, batch {args.batch}, "
          f"window {args.window}, pool {args.pool}, {args.size}x{args.size}, {args.steps} steps, "
          f"median of {args.sim_repeats} alternating runs")
    print(f"{'order':>9} {'calls':>6} {'switches':>9} {'loads':>6} {'evictions':>10} {'seconds':>8} {'rows/s':>7}")
    for name, result in results.items():
        print(f"{name:>9} {result.calls:>6} {result.switches:>9} {result.loads:>6} {result.evictions:>10} "
              f"{result.seconds:>8.2f} {result.rows_per_s:>7.1f}")
    ratio = results["grouped"].rows_per_s / results["shuffled"].rows_per_s
    print(f"RATIO in-process grouped / shuffled rows/s: {ratio:.2f}x")
    if args.job:
        through_job(generator, args)


def through_job(generator: FluxGenerator, args: argparse.Namespace) -> None:
    """Part 3: the same shuffled manifest through `factory run` (Ray Data -> one Serve replica), with the
    pipeline's adapter ordering off (adapter_window 1) and on; switches are counted by the replica's pool."""
    import json

    import ray
    from ray import serve

    from factory.jobs.cluster.serve_app import default_app_name
    from factory.jobs.run import run_job
    from factory.jobs.spec import JobSpec
    from factory.routing.replica import DEPLOYMENT_NAME

    folder = Path(tempfile.mkdtemp(prefix="lora-job-bench-"))
    registry = {"tenants": {}}
    for i, tenant in enumerate(TENANTS):
        adapters = {}
        for j, region in enumerate(REGIONS):
            path = create_lora(folder / f"{tenant}-{region}.safetensors", transformer=generator.pipe.transformer,
                               rank=8, alpha=8, seed=10 * i + j)
            adapters[region] = {"uri": str(path)}
        registry["tenants"][tenant] = {"adapters": adapters, "regions": {r: r for r in REGIONS}}
    (folder / "tenants.yaml").write_text(json.dumps(registry))
    rng = random.Random(0)
    with (folder / "rows.jsonl").open("w") as handle:
        for index in range(args.rows):
            row = {"id": f"r{index:04d}", "tenant": rng.choice(TENANTS), "region": rng.choice(REGIONS),
                   "prompt": rng.choice(PROMPTS), "seed": index}
            handle.write(json.dumps(row) + "\n")

    def spec(window: int, run_id: str) -> JobSpec:
        """The job, writing to a folder of its own (nothing to reuse or resume), its replica kept warm."""
        return JobSpec.model_validate({
            "name": "lora-bench", "inputs": [str(folder / "rows.jsonl")], "output": str(folder / f"out-{run_id}"),
            "tenants": str(folder / "tenants.yaml"), "adapter_window": window,
            "defaults": {"steps": args.steps, "width": args.size, "height": args.size},
            "serve": {"max_batch_size": args.batch, "max_ongoing_requests": 2 * args.batch,
                      "max_adapters": args.pool, "num_cpus": args.cpus, "keep_warm": True},
            "in_flight": 4 * args.batch,
        })

    join_or_start_ray(args.address, max(4, math.ceil(args.cpus) + 2))
    warm_spec = spec(args.window, "warmup")
    app_name = default_app_name(warm_spec.name)  # the job's own Serve app, as run_job names it
    warm = run_work("warm-up", args.rows, run_job(warm_spec, run_id="warmup", show_progress=False))
    print(f"\n  warm-up (not timed): {warm.line()}", flush=True)
    handle = serve.get_deployment_handle(DEPLOYMENT_NAME, app_name)
    work_log = WorkLog()
    measured: dict[str, list[tuple[float, int]]] = {"shuffled": [], "grouped": []}
    for repeat in range(args.sim_repeats):
        for name, window in (("shuffled", 1), ("grouped", args.window)):
            run_id = f"{name}-{repeat}"
            before = handle.adapter_stats.remote().result()["switches"]
            started = time.perf_counter()
            summary = run_job(spec(window, run_id), run_id=run_id, show_progress=False)
            seconds = time.perf_counter() - started
            switches = handle.adapter_stats.remote().result()["switches"] - before
            measured[name].append((args.rows / seconds, switches))
            work = work_log.add(run_work(f"job {run_id}", args.rows, summary))
            print(f"  {name} {repeat}: switches {switches}, rows/s {args.rows / seconds:.2f} ({work.brief()})",
                  flush=True)
    serve.delete(app_name)
    ray.shutdown()
    print(f"\nthrough the job: {args.rows} rows, one replica, pool {args.pool}, window {args.window}, "
          f"median of {args.sim_repeats}")
    medians = {name: (statistics.median(r for r, _ in runs), statistics.median(s for _, s in runs))
               for name, runs in measured.items()}
    for name, (rows_per_s, switches) in medians.items():
        print(f"{name:>9} switches {switches:>5.0f}  rows/s {rows_per_s:6.2f}")
    work_log.check()
    print(f"RATIO job grouped / shuffled rows/s: {medians['grouped'][0] / medians['shuffled'][0]:.2f}x, "
          f"switches {medians['shuffled'][1]:.0f} -> {medians['grouped'][1]:.0f}")


if __name__ == "__main__":
    main()
