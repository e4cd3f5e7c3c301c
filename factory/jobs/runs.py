"""What every kind of run shares: where its output goes, its generation defaults, where its chunks stand, the
tally actor that counts its rows, and the error that stops it."""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from factory.errors import FactoryError
from factory.io.layout import OutputLayout
from factory.io.storage import Storage, join
from factory.jobs.commit import DONE, DONE_WITH_FAILURES
from factory.jobs.spec import JobSpec
from factory.jobs.summary import ChunkStats
from factory.routing.parser import GenerationDefaults

MARKER_READERS = 16


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


def chunk_finished(names: set[str], retry_failed: bool) -> bool:
    """Whether a chunk whose `_chunks/<chunk>/` holds `names` needs no work this attempt."""
    return DONE in names or (DONE_WITH_FAILURES in names and not retry_failed)


def read_markers(storage: Storage, layout: OutputLayout, chunks: Sequence[tuple[str, str]],
                 states: dict[str, set[str]], fresh: dict[str, ChunkStats]) -> list[ChunkStats]:
    """Every chunk's marker, for `chunks` as (chunk id, its source as the error names it): this attempt's from
    the workers' output, earlier attempts' from storage. A chunk not finished this attempt was skipped as
    finished, so the start-of-run `states` already say which marker it has: no lookup per chunk."""
    def read(chunk: tuple[str, str]) -> ChunkStats:
        chunk_id, source = chunk
        if chunk_id in fresh:
            return fresh[chunk_id]
        for name in (DONE, DONE_WITH_FAILURES):
            if name in states.get(chunk_id, ()):
                return ChunkStats.model_validate_json(storage.read_bytes(layout.chunk_file(chunk_id, name)))
        raise FactoryError(f"chunk {chunk_id} of {source} has no marker: the run did not finish it")

    with ThreadPoolExecutor(MARKER_READERS) as pool:
        return list(pool.map(read, chunks))


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
