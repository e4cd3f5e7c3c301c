"""What every kind of run shares: where its output goes, its generation defaults, where its chunks stand, the
tally actor that counts its rows, and the error that stops it."""

from __future__ import annotations

from factory.errors import FactoryError
from factory.io.layout import OutputLayout
from factory.io.storage import Storage, join
from factory.jobs.spec import JobSpec
from factory.routing.parser import GenerationDefaults


class JobAborted(FactoryError):
    """The error budget ran out; what was committed stays committed."""


def output_root(spec: JobSpec, run_id: str) -> str:
    return join(spec.output, run_id)


def generation_defaults(spec: JobSpec) -> GenerationDefaults:
    from factory.model.profiles import get_profile

    profile = get_profile(spec.profile).generator
    given = spec.defaults
    return GenerationDefaults(
        steps=given.steps or profile.steps, width=given.width or profile.width,
        height=given.height or profile.height,
        guidance=given.guidance if given.guidance is not None else profile.guidance,
    )


def chunk_states(storage: Storage, layout: OutputLayout) -> dict[str, set[str]]:
    states: dict[str, set[str]] = {}
    prefix = layout.chunks.rstrip("/") + "/"
    for uri in storage.list_files(layout.chunks):
        relative = uri[len(prefix):] if uri.startswith(prefix) else uri.rsplit("/_chunks/", 1)[-1]
        chunk, _, name = relative.partition("/")
        if name:
            states.setdefault(chunk, set()).add(name)
    return states


def start_tally(spec: JobSpec | None):
    import ray

    from factory.jobs.tally import RunTally

    budget = spec.error_budget if spec is not None else None
    return ray.remote(RunTally).options(num_cpus=0).remote(budget)


def worker_failure(error: BaseException, job: str, run_id: str, root: str) -> FactoryError:
    """A Ray-wrapped exception from a worker, as the one line a person needs (the cause, and how to resume)."""
    cause: BaseException | None = error
    seen = set()
    while cause is not None and id(cause) not in seen and not isinstance(cause, FactoryError):
        seen.add(id(cause))
        cause = getattr(cause, "cause", None) or cause.__cause__
    text = str(cause if isinstance(cause, FactoryError) else error).strip().splitlines()
    message = text[-1] if text else type(error).__name__
    return FactoryError(f"job {job}: a worker failed: {message}; committed work is kept under {root} "
                        f"(re-run with --run-id {run_id} to resume)")


def budget_stop(tally, job: str, run_id: str, root: str) -> JobAborted | None:
    """The error to stop with when the run's tally says the error budget ran out, else None."""
    import ray

    _, stopped = ray.get(tally.snapshot.remote())
    if not stopped:
        return None
    return JobAborted(f"job {job}: {stopped}; stopped, committed rows are kept under {root} "
                      f"(re-run with --run-id {run_id} to resume)")
