"""The online API under a bounded load on localhost: latency and throughput with 1 and 2 replicas, and what Serve
adds per request against direct in-process calls of the same batch runner.

    python bench/serve_load.py            # ~3 minutes on 2 cores
    python bench/serve_load.py --quick    # ~1.5 minutes
    python bench/serve_load.py --smoke    # the smallest sizes: does every part still run (seconds)

The request is a cheap one on purpose, so the overhead is visible: a caption of a 32x32 PNG (base64) at the tiny
profile, through the whole stack (the input's safety check included). Everything runs on a private Ray started
here (loopback only) and stops when the script ends; with `--address` it joins a cluster on which Serve is not
running yet (Serve's proxies keep the ports they first started with) and deletes its app at the end.

- direct: the replica's batch runner (`build_runner`, same config, 1 torch thread as a 1-CPU replica has) in this
  process, one call after another.
- serve, one at a time: the same requests over HTTP (`POST /v1/caption`, keep-alive) and over gRPC, one at a time,
  to one replica. Overhead = a request's wall time at the client minus the model time the replica measured for
  it (`latency_ms`), and also p50(serve) - p50(direct).
- load: `--clients` closed-loop HTTP clients for `--seconds`, with 1 then 2 replicas (1 CPU each): p50, p99,
  requests/s. On this 2-core machine the clients, Ray's processes and the replicas share the cores.
Alternating direct and serve rounds, medians over `--repeats`. Every response is checked to come from the model
(ok, a caption, the replica's model time): each round prints a `WORK` line with the requests sent and those the
model answered, and the comparisons are not printed (exit code 2) when any request was answered otherwise.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import Work, WorkLog, add_ray_arguments  # noqa: E402

TENANT = "bench"
APP = "serve-bench"
SMOKE = {"requests": 3, "repeats": 1, "seconds": 1.0, "clients": 2}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def tiny_png() -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (180, 40, 40)).save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def serving_config(replicas: int, key_entry: dict, http_port: int, grpc_port: int, cpus: float) -> dict:
    return {
        "app_name": APP, "profile": "tiny",
        "serve": {"replicas": replicas, "num_cpus": cpus, "max_batch_size": 4, "batch_wait_timeout_s": 0.0,
                  "max_ongoing_requests": 8, "max_queued_requests": -1},
        "api": {"keys": [key_entry], "max_in_flight": 256, "http": {"port": http_port},
                "grpc": {"enabled": True, "all_interfaces": True, "port": grpc_port}, "request_timeout_s": 60},
    }


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def by_model(status: str, caption: str | None, latency_ms: float | None) -> bool:
    """Whether a response is the model's work: ok, a caption, and model time measured by the replica."""
    return status == "ok" and bool(caption) and (latency_ms or 0) > 0


def direct_round(runner, count: int, image_b64: str) -> tuple[list[float], int]:
    from factory.routing.batch import ReplicaCall, adapter_key
    from factory.routing.parser import GenerationDefaults, parse_request

    defaults = GenerationDefaults(steps=4, width=256, height=256, guidance=3.5)
    data = base64.b64decode(image_b64)
    times = []
    answered = 0
    for index in range(count):
        started = time.perf_counter()
        # what the door does too: parse the row, then one runner call
        request = parse_request({"id": f"d{index}", "tenant": TENANT, "task": "caption", "image": "upload"}, defaults)
        result = runner.run([ReplicaCall(request=request, image_bytes=data)], adapter_key(request))[0]
        times.append((time.perf_counter() - started) * 1000)
        assert result.status.value == "ok", result.error
        answered += by_model(result.status.value, result.caption, result.latency_ms)
    return times, answered


def http_round(base: str, key: str, count: int, image_b64: str) -> tuple[list[float], list[float], int]:
    import requests

    session = requests.Session()
    headers = {"Authorization": f"Bearer {key}"}
    walls, overheads = [], []
    answered = 0
    for _ in range(count):
        started = time.perf_counter()
        response = session.post(f"{base}/v1/caption", json={"image_base64": image_b64}, headers=headers, timeout=60)
        wall = (time.perf_counter() - started) * 1000
        response.raise_for_status()
        body = response.json()
        walls.append(wall)
        overheads.append(wall - body["latency_ms"])
        answered += by_model(body["status"], body.get("caption"), body["latency_ms"])
    return walls, overheads, answered


def grpc_round(target: str, key: str, app: str, count: int, image_b64: str) -> tuple[list[float], list[float], int]:
    import grpc

    from factory.routing.proto import factory_api_pb2 as pb
    from factory.routing.proto import factory_api_pb2_grpc as pb_grpc

    image = base64.b64decode(image_b64)
    metadata = (("application", app), ("authorization", f"Bearer {key}"))
    walls, overheads = [], []
    answered = 0
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.FactoryStub(channel)
        for _ in range(count):
            started = time.perf_counter()
            response = stub.Caption(pb.TaskRequest(image=image), metadata=metadata, timeout=60)
            wall = (time.perf_counter() - started) * 1000
            walls.append(wall)
            overheads.append(wall - response.latency_ms)
            answered += by_model(response.status, response.caption, response.latency_ms)
    return walls, overheads, answered


def healthz_round(base: str, count: int) -> list[float]:
    """HTTP -> Serve's proxy -> the ingress replica and back, no model replica: the door's own share."""
    import requests

    session = requests.Session()
    walls = []
    for _ in range(count):
        started = time.perf_counter()
        session.get(f"{base}/healthz", timeout=30).raise_for_status()
        walls.append((time.perf_counter() - started) * 1000)
    return walls


def handle_round(app: str, count: int, image_b64: str) -> list[float]:
    """This process -> a DeploymentHandle -> StackReplica (serve.batch, a worker thread) and back, minus the model
    time: the ingress-to-replica hop's share."""
    from ray import serve

    from factory.routing.batch import ReplicaCall
    from factory.routing.replica import DEPLOYMENT_NAME
    from factory.routing.requests import Task, TaskRequest

    handle = serve.get_deployment_handle(DEPLOYMENT_NAME, app)
    data = base64.b64decode(image_b64)
    overheads = []
    for index in range(count):
        call = ReplicaCall(request=TaskRequest(id=f"h{index}", tenant=TENANT, task=Task.CAPTION, image="upload"),
                           image_bytes=data)
        started = time.perf_counter()
        result = handle.options(multiplexed_model_id="base").remote(call).result(timeout_s=60)
        overheads.append((time.perf_counter() - started) * 1000 - result.latency_ms)
    return overheads


def load(base: str, key: str, clients: int, seconds: float, image_b64: str) -> dict:
    """`clients` closed-loop clients for `seconds`; every request must succeed."""
    import requests

    stop_at = time.perf_counter() + seconds
    latencies: list[float] = []
    errors: list[str] = []
    answered = [0]
    lock = threading.Lock()

    def client() -> None:
        session = requests.Session()
        headers = {"Authorization": f"Bearer {key}"}
        while time.perf_counter() < stop_at:
            started = time.perf_counter()
            response = session.post(f"{base}/v1/caption", json={"image_base64": image_b64}, headers=headers,
                                    timeout=60)
            elapsed = (time.perf_counter() - started) * 1000
            body = response.json() if response.status_code == 200 else {}
            with lock:
                (latencies.append(elapsed) if response.status_code == 200
                 else errors.append(f"{response.status_code} {response.text[:100]}"))
                answered[0] += by_model(body.get("status", ""), body.get("caption"), body.get("latency_ms"))

    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    if errors:
        raise SystemExit(f"load: {len(errors)} requests failed, first: {errors[0]}")
    return {"requests": len(latencies), "rps": len(latencies) / wall, "p50": percentile(latencies, 50),
            "p99": percentile(latencies, 99), "answered": answered[0]}


def deploy(replicas: int, key_entry: dict, http_port: int, grpc_port: int, cpus: float) -> None:
    import requests

    from factory.jobs.cluster.serve_app import wait_until_ready
    from factory.routing.app import deploy_serving, load_serving

    serving = load_serving(serving_config(replicas, key_entry, http_port, grpc_port, cpus))
    deploy_serving(serving)
    wait_until_ready(serving.config.app_name, 300)
    deadline = time.monotonic() + 60
    while True:  # the app is ready; its door is this bench's proxy only if Serve started with these ports
        try:
            requests.get(f"http://127.0.0.1:{http_port}/healthz", timeout=5).raise_for_status()
            return
        except requests.RequestException as error:
            if time.monotonic() > deadline:
                raise SystemExit(f"the app is ready but nothing answers on port {http_port} ({error}): Serve was "
                                 "already running on this cluster with other ports; run without --address, or on "
                                 "a cluster without Serve") from None
            time.sleep(0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests and shorter loads")
    parser.add_argument("--requests", type=int, default=None, help="requests per one-at-a-time round")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=None, help="length of each load phase")
    parser.add_argument("--smoke", action="store_true",
                        help="the smallest sizes (" + ", ".join(f"--{k} {v:g}" for k, v in SMOKE.items())
                             + "): checks that every part runs, measures nothing")
    add_ray_arguments(parser, cpus=1.0, cpus_help="logical CPUs of each replica (its torch threads)")
    args = parser.parse_args()
    if args.smoke:
        for key, value in SMOKE.items():
            setattr(args, key, value)
    count = args.requests or (30 if args.quick else 80)
    repeats = args.repeats or (2 if args.quick else 3)
    seconds = args.seconds or (8.0 if args.quick else 20.0)

    import os

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import torch

    from factory.jobs.cluster import connect
    from factory.model.stack import ModelStack
    from factory.model.tiny import ensure_tiny
    from factory.paths import factory_home
    from factory.routing.auth import new_key
    from factory.routing.replica import ReplicaConfig, build_runner

    ensure_tiny(factory_home())
    image_b64 = tiny_png()
    made = new_key(TENANT)
    http_port, grpc_port = _free_port(), _free_port()
    base, target = f"http://127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}"

    threads = max(1, int(args.cpus))  # as a replica with --cpus runs (factory.routing.app.replica_setup)
    torch.set_num_threads(threads)
    runner = build_runner(ReplicaConfig(threads=threads), ModelStack.from_profile("tiny"))
    connect(args.address)
    deploy(1, made.entry.model_dump(), http_port, grpc_port, args.cpus)
    direct_round(runner, 5, image_b64)  # warm both sides
    http_round(base, made.key, 5, image_b64)
    grpc_round(target, made.key, APP, 5, image_b64)
    work_log = WorkLog()

    figures: dict[str, list[float]] = {k: [] for k in (
        "direct_p50", "direct_p99", "http_p50", "http_p99", "grpc_p50", "grpc_p99", "http_over_p50",
        "http_over_p99", "grpc_over_p50", "grpc_over_p99", "healthz_p50", "handle_over_p50")}
    for repeat in range(repeats):
        direct, direct_answered = direct_round(runner, count, image_b64)
        http, http_over, http_answered = http_round(base, made.key, count, image_b64)
        grpc_walls, grpc_over, grpc_answered = grpc_round(target, made.key, APP, count, image_b64)
        for name, answered in (("direct", direct_answered), ("http", http_answered), ("grpc", grpc_answered)):
            work_log.add(Work(f"{name} {repeat}", count, answered))
        figures["healthz_p50"].append(percentile(healthz_round(base, count), 50))
        figures["handle_over_p50"].append(percentile(handle_round(APP, count, image_b64), 50))
        for name, values in (("direct", direct), ("http", http), ("grpc", grpc_walls), ("http_over", http_over),
                             ("grpc_over", grpc_over)):
            figures[f"{name}_p50"].append(percentile(values, 50))
            figures[f"{name}_p99"].append(percentile(values, 99))
        print(f"  repeat {repeat}: direct p50 {figures['direct_p50'][-1]:.1f} ms, http p50 "
              f"{figures['http_p50'][-1]:.1f} ms (overhead {figures['http_over_p50'][-1]:.1f}), grpc p50 "
              f"{figures['grpc_p50'][-1]:.1f} ms (overhead {figures['grpc_over_p50'][-1]:.1f})", flush=True)
    med = {name: statistics.median(values) for name, values in figures.items()}
    del runner  # its CPU share goes back to the replicas for the load phases

    loads = {}
    for replicas in (1, 2):
        if replicas == 2:
            deploy(2, made.entry.model_dump(), http_port, grpc_port, args.cpus)
            http_round(base, made.key, 10, image_b64)
        runs = [load(base, made.key, args.clients, seconds, image_b64) for _ in range(repeats)]
        for repeat, run in enumerate(runs):
            work_log.add(Work(f"load {replicas} replica(s) {repeat}", run["requests"], run["answered"]))
        loads[replicas] = {key: statistics.median(run[key] for run in runs) for key in runs[0] if key != "answered"}
        print(f"  load, {replicas} replica(s): " + ", ".join(f"{k} {v:.1f}" for k, v in loads[replicas].items()),
              flush=True)
    import ray
    from ray import serve

    serve.delete(APP)  # a joined cluster keeps running; its Serve keeps this bench's ports until shut down
    ray.shutdown()

    print()
    print(f"caption of a 32x32 PNG, tiny profile, {count} requests one at a time x {repeats} repeats (medians)")
    print(f"{'':34}{'p50 ms':>10}{'p99 ms':>10}")
    print(f"{'direct, in-process':34}{med['direct_p50']:>10.1f}{med['direct_p99']:>10.1f}")
    print(f"{'HTTP, 1 replica':34}{med['http_p50']:>10.1f}{med['http_p99']:>10.1f}")
    print(f"{'gRPC, 1 replica':34}{med['grpc_p50']:>10.1f}{med['grpc_p99']:>10.1f}")
    print(f"{'HTTP overhead (wall - model time)':34}{med['http_over_p50']:>10.1f}{med['http_over_p99']:>10.1f}")
    print(f"{'gRPC overhead (wall - model time)':34}{med['grpc_over_p50']:>10.1f}{med['grpc_over_p99']:>10.1f}")
    print(f"where it goes, p50: HTTP -> proxy -> ingress -> back (GET /healthz) {med['healthz_p50']:.1f} ms; "
          f"handle -> StackReplica -> back, minus model time {med['handle_over_p50']:.1f} ms")
    print(f"load: {args.clients} closed-loop HTTP clients, {seconds:g} s x {repeats} (medians)")
    for replicas, row in loads.items():
        print(f"  {replicas} replica(s): {row['rps']:.1f} req/s, p50 {row['p50']:.1f} ms, p99 {row['p99']:.1f} ms "
              f"({row['requests']:.0f} requests)")
    print(json.dumps({"one_at_a_time": med, "load": loads}))
    work_log.check()
    print(f"OVERHEAD HTTP p50 - direct p50: {med['http_p50'] - med['direct_p50']:.1f} ms; "
          f"gRPC p50 - direct p50: {med['grpc_p50'] - med['direct_p50']:.1f} ms  (aim: <= 5 ms)")
    print(f"RATIO 2 replicas / 1 replica: {loads[2]['rps'] / loads[1]['rps']:.2f}x throughput")


if __name__ == "__main__":
    main()
