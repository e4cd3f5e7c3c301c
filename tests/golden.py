"""The engine's outputs, file by file: what three real jobs write, recorded once and compared after every change.

    python -m tests.golden --write [--address HOST:PORT]    # record tests/golden.json (runs the jobs, minutes)
    python -m tests.golden [--address HOST:PORT]            # run them again and compare
    python -m tests.golden --repo DIR                       # ... with another checkout's `factory` (an older commit)

The jobs, run through the `factory` command as users run them (so the same script records any version):
- `catalog`: the demo job (jobs/catalog.yaml: manifests, a catalog expanded into ads, captions, VQA, rejects,
  a duplicate id, tenants with adapters), then the same job under a second run id, whose generation rows all
  reuse the first run's images (`_reuse/`).
- `manifests`: JSON lines, CSV, Parquet and gzipped JSON lines, 3 lines a chunk, captions, VQA and generation
  rows, duplicate ids across chunks and tenants, bad rows of every kind, an image outside its tenant's roots, a
  missing image, a prompt and a photo the safety policy blocks.
- `archive`: a folder (links, a FIFO, bad files, an exact duplicate), a zip and a tar shard, captioned with a
  question and trainer sidecars.

The jobs run in one fixed folder (`WORK`, emptied first): chunk ids are digests of the inputs' paths, and plans
record the inputs' modification times, which are fixed too. Every file under the outputs is recorded by its path
and a digest. Images, sidecars,
plans, chunk ids, run ids, seeds and reuse keys are compared byte for byte. What a run measures rather than
decides is left out: `finished_at`, `latency_ms` and `safety_ms` of result rows, the compute seconds summed from
them, and wall times and rates in summaries. A results part's name holds its writer's random token and its
split into parts follows commit timing: the parts of one (tenant, chunk) are compared as one set of rows, as are
a Parquet file's rows (sorted), and JSON whose key order follows worker timing (`dedup.json`) is compared sorted.

The tiny checkpoints' BUILD.json digest is recorded too: when the tiny builders change, every image and caption
changes, and the comparison says so instead of listing a thousand differences.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).with_name("golden.json")
REGENERATE = "python -m tests.golden --write"
FIXED_MTIME_NS = 1_700_000_000 * 10**9
WORK = Path("/tmp/factory-golden")  # fixed: chunk ids are digests of the inputs' absolute paths

# Measured, not decided: left out of what is compared (see the module docstring).
MEASURED_COLUMNS = frozenset({"finished_at", "latency_ms", "safety_ms"})
MEASURED_SUMMARY = frozenset({"wall_seconds", "replica_start_seconds", "images_per_second", "rows_per_second"})
_RESULTS_PART = re.compile(r"^(?P<folder>.*/results/tenant=[^/]+)/part-(?P<chunk>[0-9a-f]{16})-[0-9a-f]+-\d+\.parquet$")


# ---- the jobs ----------------------------------------------------------------------------------------------


def _fix_mtimes(folder: Path) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not path.is_symlink():
            os.utime(path, ns=(FIXED_MTIME_NS, FIXED_MTIME_NS))


def _catalog_inputs(work: Path) -> Path:
    shutil.copytree(REPO / "jobs", work / "jobs")
    return work / "jobs" / "catalog.yaml"


def _manifest_inputs(work: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = work / "manifests"
    shutil.copytree(REPO / "jobs" / "data" / "images", folder / "images")
    rows = [
        {"id": "cap-1", "tenant": "acme", "task": "caption", "image": "images/coffee.jpg"},
        {"id": "cap-2", "tenant": "acme", "prompt": "Describe: the animal", "image": "images/chelsea.jpg"},
        {"id": "vqa-1", "tenant": "beta", "prompt": "Question: how many cups?", "image": "images/coffee.jpg"},
        {"id": "blocked-photo", "tenant": "beta", "task": "caption", "image": "images/astronaut.jpg"},
        {"id": "gen-1", "tenant": "acme", "prompt": "a red bicycle poster", "seed": 3},
        {"id": "gen-2", "tenant": "beta", "prompt": "a blue car poster", "width": 64, "height": 96},
        {"id": "gen-1", "tenant": "beta", "prompt": "another tenant's gen-1: not a duplicate"},
        {"id": "bad-prompt", "tenant": "acme", "prompt": "an explicit poster for the sale"},
        {"id": "bad-width", "tenant": "acme", "prompt": "a poster", "width": 100},
        {"id": "bad-field", "tenant": "beta", "prompt": "a poster", "colour": "red"},
        {"id": "outside", "tenant": "acme", "task": "caption", "image": "/etc/hostname"},
        {"id": "missing", "tenant": "beta", "task": "caption", "image": "images/none.jpg"},
        {"id": "cap-1", "tenant": "acme", "prompt": "a duplicate of cap-1, two chunks later"},
    ]
    lines = [json.dumps(row) for row in rows]
    lines.insert(5, '{"id": "broken", "tenant": "acme", "prompt": "unterminated')
    (folder / "rows.jsonl").write_text("\n".join(lines) + "\n")
    (folder / "more.csv").write_text(
        "id,tenant,task,prompt,question,image,seed\n"
        "csv-vqa,acme,vqa,,Is it indoors?,images/rocket.jpg,\n"
        "csv-gen,beta,,\"a poster, with a comma\",,,9\n"
        "csv-bad,beta,,a poster,,,not-a-number\n"
    )
    pq.write_table(pa.Table.from_pylist([
        {"id": "pq-gen", "tenant": "acme", "prompt": "a lamp poster", "seed": 5},
        {"id": "pq-cap", "tenant": "beta", "prompt": None, "task": "caption", "image": "images/rocket.jpg"},
        {"id": "gen-2", "tenant": "beta", "prompt": "a duplicate of gen-2 in another file", "seed": None},
    ]), folder / "extra.parquet")
    with gzip.GzipFile(folder / "old.jsonl.gz", "wb", mtime=0) as handle:
        handle.write(json.dumps({"id": "gz-gen", "tenant": "acme", "prompt": "an old poster"}).encode() + b"\n")
    spec = folder / "manifests.yaml"
    spec.write_text(
        "name: manifests\ninputs: [rows.jsonl, more.csv, extra.parquet, old.jsonl.gz]\noutput: out\n"
        "defaults: {steps: 2, width: 64, height: 64}\nchunk_rows: 3\n"
        "safety: {thresholds: {FACE_FEMALE: 0.5}, prompt_terms: [explicit]}\n"
        "serve: {num_cpus: 1, max_batch_size: 2}\nerror_budget: {max_failed_fraction: 1.0}\n"
    )
    return spec


def _archive_inputs(work: Path) -> Path:
    from PIL import Image

    from tests.archives import build_folder, good_images

    folder = work / "archive"
    build_folder(folder)
    # The zip's and the shard's images are other images than the folder's: an exact duplicate in another chunk
    # is claimed by whichever chunk gets there first (a race); the folder's duplicate is in its one chunk.
    others = {}
    for name, (data, _) in list(good_images().items())[:4]:
        image = Image.open(io.BytesIO(data)).convert("RGB").rotate(90, expand=True)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        others[name.rsplit(".", 1)[0] + ".png"] = buffer.getvalue()
    with zipfile.ZipFile(folder / "set.zip", "w") as archive:
        for name, data in list(others.items())[:2]:
            info = zipfile.ZipInfo(f"imgs/{name}", date_time=(2024, 1, 1, 0, 0, 0))
            archive.writestr(info, data)
        archive.writestr(zipfile.ZipInfo("imgs/readme.txt", date_time=(2024, 1, 1, 0, 0, 0)), b"companion")
    with tarfile.open(folder / "shard-000.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
        for index, data in enumerate(list(others.values())[2:]):
            for name, payload in ((f"{index:04d}.png", data), (f"{index:04d}.txt", b"a caption\n")):
                info = tarfile.TarInfo(name)
                info.size, info.mtime = len(payload), 0
                tar.addfile(info, io.BytesIO(payload))
    spec = folder / "archive.yaml"
    spec.write_text(
        "name: archive\noutput: out\n"
        "archive: {sources: [photos, bad, set.zip, shard-000.tar], prompt: 'Describe: one short line', "
        "question: 'Is there text?', sidecars: true, chunk_objects: 1000}\n"
        "serve: {num_cpus: 1, max_batch_size: 4}\n"
    )
    return spec


def runs(work: Path) -> list[list[str]]:
    """The `factory` commands, in order; every output lands under <work>/out."""
    out = str(work / "out")
    catalog, manifests, archive = _catalog_inputs(work), _manifest_inputs(work), _archive_inputs(work)
    _fix_mtimes(work)
    return [
        ["run", str(catalog), "--set", f"output={out}"],
        ["run", str(catalog), "--set", f"output={out}", "--run-id", "catalog-again"],
        ["run", str(manifests), "--set", f"output={out}"],
        ["run", str(archive), "--set", f"output={out}"],
    ]


def run_jobs(work: Path, address: str | None, repo: Path = REPO) -> None:
    env = {**os.environ, "PYTHONPATH": str(repo)}
    for command in runs(work):
        done = subprocess.run([sys.executable, "-m", "factory", *command, *(["--address", address] if address else [])],
                              cwd=repo, env=env, capture_output=True, text=True, timeout=900)
        if done.returncode:
            raise RuntimeError(f"factory {' '.join(command)} failed: {done.stderr[-3000:]}")


# ---- digests -----------------------------------------------------------------------------------------------


def _text(data: bytes, work: str) -> bytes:
    try:
        return data.decode("utf-8").replace(work, "<WORK>").encode()
    except UnicodeDecodeError:
        return data  # an image: compared as it is


def _plain(value, work: str):
    if isinstance(value, str):
        return value.replace(work, "<WORK>")
    if isinstance(value, dict):
        return {key: _plain(item, work) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item, work) for item in value]
    return value


def _rows_digest(rows: list[dict], work: str) -> str:
    kept = [{key: _plain(value, work) for key, value in row.items() if key not in MEASURED_COLUMNS} for row in rows]
    lines = sorted(json.dumps(row, sort_keys=True, default=str) for row in kept)
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def _drop_measured(value, keys: frozenset[str]):
    if isinstance(value, dict):
        return {key: _drop_measured(item, keys) for key, item in sorted(value.items()) if key not in keys}
    return value


def _json_digest(name: str, data: bytes, work: str) -> str:
    text = _text(data, work)
    if name in ("summary.json", "validation.json", "done.json", "failed.json"):
        value = _drop_measured(json.loads(text), MEASURED_SUMMARY | {"compute_seconds"})
    elif name == "dedup.json":
        value = json.loads(text)
        value["chunks"] = {chunk: sorted(shards) for chunk, shards in value.get("chunks", {}).items()}
        value = _drop_measured(value, frozenset())
    else:
        return hashlib.sha256(text).hexdigest()
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def digest_outputs(out: Path, work: Path) -> dict[str, str]:
    """Relative path -> digest for every file under `out` (results parts grouped per tenant and chunk)."""
    import pyarrow.parquet as pq

    text_root = str(work)
    found: dict[str, str] = {}
    grouped: dict[str, list[dict]] = {}
    for path in sorted(out.rglob("*")):
        if not path.is_file():
            continue
        relative = path.relative_to(out).as_posix()
        if path.suffix == ".parquet":
            rows = pq.read_table(path).to_pylist()
            part = _RESULTS_PART.match(relative)
            if part:
                grouped.setdefault(f"{part['folder']}/part-{part['chunk']}-*.parquet", []).extend(rows)
            else:
                found[relative] = _rows_digest(rows, text_root)
        elif path.suffix == ".json":
            found[relative] = _json_digest(path.name, path.read_bytes(), text_root)
        else:
            found[relative] = hashlib.sha256(_text(path.read_bytes(), text_root)).hexdigest()
    found.update({key: _rows_digest(rows, text_root) for key, rows in grouped.items()})
    return dict(sorted(found.items()))


def tiny_build_digest() -> str:
    from factory.model.tiny import ensure_tiny

    return hashlib.sha256((ensure_tiny() / "BUILD.json").read_bytes()).hexdigest()


def record(address: str | None, repo: Path = REPO) -> dict:
    """Run the jobs in the work folder, emptied first, and digest what they wrote."""
    work = WORK
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        run_jobs(work, address, repo)
        return {"tiny_build": tiny_build_digest(), "files": digest_outputs(work / "out", work)}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def differences(golden: dict, now: dict) -> list[str]:
    """What differs, one line each; a changed tiny build is one line that says how to regenerate."""
    if golden["tiny_build"] != now["tiny_build"]:
        return [f"the tiny checkpoints changed (BUILD.json {now['tiny_build'][:12]}, recorded "
                f"{golden['tiny_build'][:12]}): every model output differs; regenerate with `{REGENERATE}`"]
    lines = []
    for path in sorted(set(golden["files"]) | set(now["files"])):
        before, after = golden["files"].get(path), now["files"].get(path)
        if before is None:
            lines.append(f"new file: {path}")
        elif after is None:
            lines.append(f"missing: {path}")
        elif before != after:
            lines.append(f"differs: {path}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true", help=f"record {GOLDEN.name} instead of comparing")
    parser.add_argument("--address", default=None, help="run the jobs on this Ray cluster (host:port)")
    parser.add_argument("--repo", type=Path, default=REPO, help="the checkout whose `factory` runs the jobs")
    args = parser.parse_args()
    now = record(args.address, args.repo)
    if args.write:
        GOLDEN.write_text(json.dumps(now, indent=1, sort_keys=True) + "\n")
        print(f"{GOLDEN}: {len(now['files'])} files")
        return
    lines = differences(json.loads(GOLDEN.read_text()), now)
    print("\n".join(lines) or f"the same {len(now['files'])} files")
    raise SystemExit(1 if lines else 0)


if __name__ == "__main__":
    main()
