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
