"""The `factory` command. Thin: it parses arguments and calls into the package; errors are one line."""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from factory.errors import FactoryError, one_line, validation_problems

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Batch content factory: manifests in, content out.")
models_app = typer.Typer(no_args_is_help=True, help="Build and list model profiles.")
app.add_typer(models_app, name="models")
lora_app = typer.Typer(no_args_is_help=True, help="Make LoRA adapter files.")
app.add_typer(lora_app, name="lora")

ProfileOption = Annotated[str, typer.Option("--profile", "-p", help="Model profile (see `factory models list`)")]


def one_line_errors(command):
    """A person gets `error: <what and why>` and exit status 2, never a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        from pydantic import ValidationError

        try:
            return command(*args, **kwargs)
        except FactoryError as error:
            typer.echo(f"error: {error}", err=True)
            raise typer.Exit(2) from None
        except ValidationError as error:
            typer.echo(f"error: {one_line(validation_problems(error))}", err=True)
            raise typer.Exit(2) from None
        except OSError as error:
            typer.echo(f"error: {error.strerror or error}: {error.filename or ''}".rstrip(": "), err=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            typer.echo("interrupted: committed rows are kept; run the same command again to resume", err=True)
            raise typer.Exit(130) from None
        except Exception as error:  # a bug or an infrastructure failure: still one line, traceback on request
            if os.environ.get("FACTORY_DEBUG") == "1":
                raise
            message = str(error).strip().splitlines()[0] if str(error).strip() else ""
            typer.echo(f"error: unexpected {type(error).__name__}: {message} (FACTORY_DEBUG=1 shows the traceback)",
                       err=True)
            raise typer.Exit(1) from None

    return wrapper


def _configure_logging() -> None:
    from factory.logs import configure_logging

    configure_logging(os.environ.get("FACTORY_LOG_LEVEL", "warning"))


def _run_single(row: dict, profile: str, tenants: Path | None = None):
    """One request through the same parser, registry, adapter pool and executor the replicas use."""
    from factory.routing.local import run_local

    _configure_logging()
    result = run_local(row, profile, tenants)
    if result.error:
        raise FactoryError(result.error)
    if result.status.value == "blocked":
        raise FactoryError(f"blocked by the safety policy: {result.safety_reason}")
    return result


@app.command()
@one_line_errors
def generate(
    prompt: Annotated[str, typer.Argument(help="What to draw")],
    output: Annotated[Path, typer.Option("--output", "-o", help="PNG file to write")] = Path("out.png"),
    seed: Annotated[Optional[int], typer.Option(help="Random seed; same seed, same bytes")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Denoising steps (profile default)")] = None,
    width: Annotated[Optional[int], typer.Option(help="Multiple of 16")] = None,
    height: Annotated[Optional[int], typer.Option(help="Multiple of 16")] = None,
    guidance: Annotated[Optional[float], typer.Option(help="Guidance scale")] = None,
    profile: ProfileOption = "tiny",
    tenants: Annotated[Optional[Path], typer.Option(help="Tenants registry YAML (adapters per tenant/region)")] = None,
    tenant: Annotated[str, typer.Option(help="Tenant whose adapters apply")] = "cli",
    region: Annotated[Optional[str], typer.Option(help="Region: picks the tenant's region adapter")] = None,
    adapter: Annotated[Optional[str], typer.Option(help="Adapter name from the tenant's list")] = None,
):
    """Generate one image from a prompt."""
    from factory.model.lora.ref import BASE_ADAPTER

    if region is not None and adapter is not None:
        raise FactoryError("use --region or --adapter, not both")
    row = {"id": "cli", "tenant": tenant, "task": "generate", "prompt": prompt, "seed": seed, "steps": steps,
           "width": width, "height": height, "guidance": guidance, "region": region, "adapter": adapter}
    result = _run_single(row, profile, tenants)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_bytes(result.image_png or b"")
    typer.echo(f"{output}  seed={result.seed} steps={result.steps} {result.width}x{result.height} "
               f"adapter={result.adapter or BASE_ADAPTER} {result.latency_ms:.0f} ms")


@app.command()
@one_line_errors
def describe(
    image: Annotated[str, typer.Argument(help="Image path or s3:// URI")],
    instruction: Annotated[Optional[str], typer.Option("--prompt", help="Caption instruction")] = None,
    profile: ProfileOption = "tiny",
):
    """Caption an image."""
    result = _run_single({"id": "cli", "tenant": "cli", "task": "caption", "image": image, "prompt": instruction}, profile)
    typer.echo(result.caption)


@app.command()
@one_line_errors
def ask(
    image: Annotated[str, typer.Argument(help="Image path or s3:// URI")],
    question: Annotated[str, typer.Argument(help="Question about the image")],
    profile: ProfileOption = "tiny",
):
    """Answer a question about an image."""
    result = _run_single({"id": "cli", "tenant": "cli", "task": "vqa", "image": image, "question": question}, profile)
    typer.echo(result.answer)


@app.command()
@one_line_errors
def run(
    spec_path: Annotated[Path, typer.Argument(metavar="JOB.yaml", help="Job spec")],
    overrides: Annotated[Optional[list[str]], typer.Option("--set", help="Override a spec key: key=value")] = None,
    run_id: Annotated[Optional[str], typer.Option(help="Run id (default: the job name); same id resumes")] = None,
    address: Annotated[Optional[str], typer.Option(help="Ray address to join (default: $RAY_ADDRESS or local)")] = None,
    retry_failed: Annotated[
        Optional[bool], typer.Option("--retry-failed/--no-retry-failed",
                                     help="Whether a re-run retries rows that ended failed (default: the spec's)")
    ] = None,
):
    """Run a job: manifests through the replicas to results, exactly once per row."""
    from factory.jobs.report.tables import print_summary
    from factory.jobs.run import run_job
    from factory.jobs.spec import load_spec

    _configure_logging()
    spec = load_spec(spec_path, overrides or [])
    summary = run_job(spec, run_id=_checked_run_id(run_id), address=address, retry_failed=retry_failed)
    print_summary(summary)
    if spec.train is not None:
        _print_training(summary)


@app.command()
@one_line_errors
def caption(
    sources: Annotated[list[str], typer.Argument(
        metavar="SOURCE...", help="Folders, s3:// prefixes, tar shards (shard-{000..009}.tar) or zip files")],
    output: Annotated[str, typer.Option("--output", "-o", help="Output folder or s3:// prefix (DEST)")],
    prompt: Annotated[Optional[str], typer.Option(help="Caption instruction, e.g. 'Describe: ...'")] = None,
    question: Annotated[Optional[str], typer.Option(help="Also ask every image this question")] = None,
    sidecars: Annotated[bool, typer.Option(
        "--sidecars", help="Write DEST/<run>/dataset/<name>.<ext> + <name>.txt (kohya / ai-toolkit layout)")] = False,
    profile: ProfileOption = "tiny",
    overrides: Annotated[Optional[list[str]], typer.Option("--set", help="Override a spec key: key=value")] = None,
    run_id: Annotated[Optional[str], typer.Option(
        help="Run id (default: caption-<digest of the sources>); the same id resumes")] = None,
    address: Annotated[Optional[str], typer.Option(help="Ray address to join (default: $RAY_ADDRESS or local)")] = None,
):
    """Caption every image of archives: rows in DEST/<run>/results/, optional trainer sidecars; resumable."""
    from factory.jobs.report.tables import print_summary
    from factory.jobs.run import run_job
    from factory.jobs.sources.archives.source import caption_spec, default_run_id

    _configure_logging()
    spec = caption_spec(sources, output, prompt=prompt, question=question, sidecars=sidecars, profile=profile,
                        overrides=overrides or [])
    print_summary(run_job(spec, run_id=_checked_run_id(run_id) or default_run_id(spec), address=address))


@app.command()
@one_line_errors
def validate(
    spec_path: Annotated[Path, typer.Argument(metavar="JOB.yaml", help="Job spec")],
    overrides: Annotated[Optional[list[str]], typer.Option("--set", help="Override a spec key: key=value")] = None,
    run_id: Annotated[Optional[str], typer.Option(help="Run id (default: the job name); a later run reuses it")] = None,
    address: Annotated[Optional[str], typer.Option(help="Ray address to join (default: $RAY_ADDRESS or local)")] = None,
):
    """Read and validate a job's rows with no model replicas: counts, rejects and an estimate of model time."""
    from factory.jobs.report.tables import print_validation
    from factory.jobs.run import validate_job
    from factory.jobs.spec import load_spec

    _configure_logging()
    spec = load_spec(spec_path, overrides or [])
    print_validation(validate_job(spec, run_id=_checked_run_id(run_id), address=address))


@app.command()
@one_line_errors
def submit(
    spec_path: Annotated[Path, typer.Argument(metavar="JOB.yaml", help="Job spec")],
    address: Annotated[str, typer.Option(help="Ray dashboard address")] = "http://127.0.0.1:8265",
    overrides: Annotated[Optional[list[str]], typer.Option("--set", help="Override a spec key: key=value")] = None,
    run_id: Annotated[Optional[str], typer.Option(help="Run id (default: the job name)")] = None,
    wait: Annotated[bool, typer.Option(help="Follow the job's logs until it ends")] = True,
):
    """Submit a job to a Ray cluster through its Jobs API (same as `ray job submit ... factory run`)."""
    from factory.jobs.cluster.submit import submit_job
    from factory.jobs.spec import load_spec

    load_spec(spec_path, overrides or [])  # fail here, not on the cluster, when the spec is wrong
    status = submit_job(spec_path, address=address, overrides=overrides or [], run_id=_checked_run_id(run_id), wait=wait)
    if status not in ("SUCCEEDED", "PENDING", "RUNNING"):
        raise FactoryError(f"job ended {status}")


@app.command()
@one_line_errors
def report(
    output: Annotated[str, typer.Argument(metavar="OUTPUT", help="A run's output: OUTPUT/<run id>, local or s3://")],
    out: Annotated[Optional[str], typer.Option("--out", "-o", help="HTML file to write (default: OUTPUT/report.html)")] = None,
    per_group: Annotated[int, typer.Option(min=1, help="Cards per tenant and region; the rest are counted")] = 60,
):
    """Write a run's static HTML gallery: thumbnails by tenant and region, captions, answers, verdicts, counts; for
    a training run, its validation images per checkpoint beside the base model's, and its loss curve."""
    from factory.io.storage import join
    from factory.jobs.report.gallery import write_gallery
    from factory.jobs.report.training import is_training_run, write_training_page

    _configure_logging()
    destination = out or join(output, "report.html")
    if is_training_run(output):
        page = write_training_page(output, destination)
        typer.echo(f"{destination}: {page.images} validation images at {page.checkpoints} checkpoints (base "
                   f"model's included), loss curve, {page.rejects} rejects")
        return
    stats = write_gallery(output, destination, per_group=per_group)
    typer.echo(f"{destination}: {stats.rows} rows, {stats.thumbnails} thumbnails in {stats.groups} groups")


@app.command("eval")
@one_line_errors
def evaluate(
    results: Annotated[str, typer.Argument(metavar="RESULTS", help="A run folder (OUTPUT/<run id>) or its results/, "
                                           "local or s3://")],
    against: Annotated[Optional[str], typer.Option("--against", metavar="RUN", help="Compare with this run's "
                                                   "results on the same rows (paired by tenant and id)")] = None,
    profile: Annotated[Optional[str], typer.Option("--profile", "-p", help="Profile whose CLIP model scores images "
                                                   "(default: the one the results name)")] = None,
    clip: Annotated[str, typer.Option(help="Score images with CLIP: 'missing' (those without a clip_score), 'all' "
                                      "(one CLIP model for both sides of a comparison), or 'none'")] = "missing",
    resamples: Annotated[int, typer.Option(min=10, help="Bootstrap resamples per figure")] = 2000,
    confidence: Annotated[float, typer.Option(min=0.5, max=0.999, help="Interval coverage")] = 0.95,
    seed: Annotated[int, typer.Option(min=0, help="Seed of the resampling")] = 0,
    out: Annotated[Optional[str], typer.Option("--out", "-o", help="Also write the evaluation as JSON here")] = None,
):
    """Score a run's results after the fact (VQA accuracy, BLEU, CIDEr-D, CLIPScore), or compare two runs."""
    from factory.io.storage import Storage
    from factory.jobs.report.evaluate import evaluation_lines, evaluate as evaluate_results
    from factory.quality.groups import BootstrapOptions

    if clip not in ("missing", "all", "none"):
        raise FactoryError(f"--clip: expected missing, all or none, got {clip!r}")
    _configure_logging()
    storage = Storage()
    evaluation = evaluate_results(results, against=against, profile=profile, clip=clip, storage=storage,
                                  bootstrap=BootstrapOptions(resamples=resamples, confidence=confidence, seed=seed))
    for line in evaluation_lines(evaluation):
        typer.echo(line)
    if out:
        storage.write_bytes(out, evaluation.model_dump_json(indent=2).encode())
        typer.echo(f"{out}: written")


@app.command("serve")
@one_line_errors
def serve_api(
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="Serving config YAML (see infra/serve-api.yaml)")] = None,
    address: Annotated[Optional[str], typer.Option(help="Ray address to join (default: $RAY_ADDRESS or local)")] = None,
):
    """Serve the online API (HTTP and gRPC) in front of the model replicas until Ctrl-C."""
    import time

    from factory.jobs.cluster import connect
    from factory.jobs.cluster.serve_app import wait_until_ready
    from factory.routing.app import deploy_serving, load_serving

    _configure_logging()
    serving = load_serving(path=config)
    connect(address)
    deploy_serving(serving)
    settings, name = serving.config.api, serving.config.app_name
    typer.echo(f"app {name}: replicas loading (profile {serving.config.profile})", err=True)
    wait_until_ready(name, serving.config.serve.ready_timeout_s)
    prefix = settings.route_prefix.rstrip("/")
    docs = f"docs: {prefix}/docs" if settings.public_docs else f"schema: {prefix}/openapi.json, with a key"
    typer.echo(f"HTTP  http://{settings.http.host}:{settings.http.port}{prefix}/v1/tasks   ({docs})")
    if settings.grpc.enabled:
        typer.echo(f"gRPC  {settings.grpc.bind_address()} (every interface)  factory.v1.Factory  "
                   f"(metadata application={name})")
    if not settings.keys:
        typer.echo("warning: no api.keys configured: every request is 401 (make one with `factory api-key TENANT`)",
                   err=True)
    try:
        while True:
            time.sleep(3600)
    finally:
        from ray import serve

        try:
            serve.delete(name)
        except Exception:  # noqa: BLE001 - shutting down anyway
            pass


@app.command("api-key")
@one_line_errors
def api_key(tenant: Annotated[str, typer.Argument(help="Tenant the key acts for")]):
    """Make an API key: prints the key (give it to the tenant; it is not stored) and the config entry (a hash)."""
    import json

    from factory.routing.auth import new_key

    made = new_key(tenant)
    typer.echo(f"key:    {made.key}")
    typer.echo(f"config: {json.dumps(made.entry.model_dump())}    # under api.keys")


def _checked_run_id(run_id: str | None) -> str | None:
    from factory.routing.requests import NAME_PATTERN

    if run_id is not None and not NAME_PATTERN.fullmatch(run_id):
        raise FactoryError(f"--run-id: {run_id!r} must be letters, digits, '.', '_' or '-'")
    return run_id


@models_app.command("build")
@one_line_errors
def models_build(
    profile: Annotated[str, typer.Argument(help="Profile to build")] = "tiny",
    force: Annotated[bool, typer.Option(help="Rebuild even if cached")] = False,
):
    """Build a profile's offline checkpoints (only `tiny` and `tiny-flux2` are built; others load from their
    sources)."""
    import time

    from factory.model.profiles import TINY_FLUX2_SOURCE, TINY_SOURCE, get_profile
    from factory.paths import factory_home
    from factory.model.tiny import ensure_tiny, ensure_tiny_flux2

    resolved = get_profile(profile)
    if TINY_SOURCE not in (resolved.generator.source, resolved.vlm.source):
        typer.echo(f"{profile}: nothing to build; loads {resolved.generator.source} and {resolved.vlm.source}")
        return
    builders = [ensure_tiny] + ([ensure_tiny_flux2] if resolved.generator.source == TINY_FLUX2_SOURCE else [])
    for build in builders:
        started = time.perf_counter()
        path = build(factory_home(), force=force)
        size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        typer.echo(f"{path}  {size / 1e6:.1f} MB  {time.perf_counter() - started:.1f} s")


@models_app.command("list")
@one_line_errors
def models_list():
    """List the model profiles."""
    from factory.model.profiles import PROFILES

    for profile in PROFILES.values():
        typer.echo(f"{profile.name:14} {profile.description}")
        typer.echo(f"{'':14} generator: {profile.generator.source} ({profile.generator.dtype}, "
                   f"{profile.generator.steps} steps, {profile.generator.width}x{profile.generator.height})")
        typer.echo(f"{'':14} speed:     {profile.generator.performance.tag()}")
        typer.echo(f"{'':14} vlm:       {profile.vlm.source} ({profile.vlm.dtype})")
        edit = profile.generator.edit
        edits = "no" if edit is None else f"up to {edit.max_references} reference image(s)" + (
            f", on {profile.edit_transformer.source}" if profile.edit_transformer is not None else "")
        typer.echo(f"{'':14} edits:     {edits}")
        typer.echo(f"{'':14} licence:   {profile.licence}")


@lora_app.command("create")
@one_line_errors
def lora_create(
    output: Annotated[Path, typer.Argument(metavar="OUT.safetensors", help="Adapter file to write")],
    rank: Annotated[int, typer.Option(min=1, max=512)] = 8,
    alpha: Annotated[float, typer.Option(min=0.0)] = 16,
    seed: Annotated[int, typer.Option(min=0)] = 0,
    profile: ProfileOption = "tiny",
    format: Annotated[str, typer.Option("--format", help="diffusers | kohya")] = "diffusers",
):
    """Write a valid random-init LoRA for a profile's transformer (attention projections)."""
    from factory.model.lora import create_lora_for_profile

    if format not in ("diffusers", "kohya"):
        raise FactoryError(f"--format: {format!r} is not one of diffusers, kohya")
    _configure_logging()
    path = create_lora_for_profile(output, profile, rank=rank, alpha=alpha, seed=seed, format=format)
    typer.echo(f"{path}  rank={rank} alpha={alpha:g} format={format} {path.stat().st_size / 1e3:.1f} kB")


@app.command()
@one_line_errors
def train(
    spec_path: Annotated[Path, typer.Argument(metavar="TRAIN.yaml", help="Training spec")],
    register: Annotated[bool, typer.Option("--register", help="Register the adapter in the spec's registry")] = False,
    run_id: Annotated[Optional[str], typer.Option(help="Run id (default: the spec's, else derived); same id resumes")] = None,
    address: Annotated[Optional[str], typer.Option(help="Ray address to join (default: $RAY_ADDRESS or local)")] = None,
):
    """Train a tenant's style adapter (LoRA) from captioned images on Ray Train; the same run id resumes."""
    from factory.jobs.report.tables import print_summary
    from factory.jobs.run import run_job
    from factory.jobs.training.spec import load_train_spec

    _configure_logging()
    spec = load_train_spec(spec_path)
    if register:
        spec = spec.model_copy(update={"add_to_registry": True})
    summary = run_job(spec.job(), run_id=_checked_run_id(run_id) or spec.resolved_run_id, address=address)
    print_summary(summary)
    _print_training(summary)


def _print_training(summary) -> None:
    """What a training run made: its adapter, its losses, its report."""
    from factory.io.storage import Storage
    from factory.jobs.training.fit import read_report, report_lines

    for line in report_lines(read_report(Storage(), summary.output), summary.output):
        typer.echo(line)


@lora_app.command("register")
@one_line_errors
def lora_register(
    adapter_file: Annotated[str, typer.Argument(metavar="ADAPTER.safetensors", help="Local path or s3:// URI")],
    registry: Annotated[Path, typer.Option(help="Tenants registry YAML (created if absent)")],
    tenant: Annotated[str, typer.Option(help="Tenant the adapter belongs to")],
    name: Annotated[str, typer.Option(help="Adapter name in the tenant's list")],
    region: Annotated[Optional[str], typer.Option(help="Region it styles (default: the tenant's default)")] = None,
):
    """Register an adapter file for a tenant (and region) with its sha256; refuses a name taken by another file."""
    from factory.jobs.training.registry import register_file

    changed, sha256 = register_file(registry, tenant=tenant, adapter=name, uri=adapter_file, region=region)
    typer.echo(f"{registry}: {tenant}/{name} sha256={sha256} {'registered' if changed else 'already registered'}")


def main() -> None:  # pragma: no cover - console entry for `python -m factory`
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
