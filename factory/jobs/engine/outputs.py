"""The small output rows of a Ray Data stage, read by the driver; a worker that fails becomes one line.

Every stage of a run hands the driver only small rows (a chunk's counts, a shard's duplicate files). When a
worker fails, what the driver raises says why in one line and how to resume; when the run's error budget ran out
(the workers stop taking rows once their tally says so), it says that instead, whatever the worker raised.
"""

from __future__ import annotations

from collections.abc import Iterator

from factory.errors import FactoryError
from factory.jobs.engine.tally import budget_stop


def stage_rows(dataset, *, job: str, run_id: str, root: str, tally=None) -> Iterator[dict]:
    """The output rows of `dataset` as dicts; a failure as `JobAborted` (the budget ran out) or one line."""
    try:
        for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
            yield from batch.to_pylist()
    except Exception as error:
        stop = budget_stop(tally, job, run_id, root) if tally is not None else None
        if stop is not None:
            raise stop from None
        raise worker_failure(error, job, run_id, root) from None


def worker_failure(error: BaseException, job: str, run_id: str, root: str) -> FactoryError:
    """A Ray-wrapped exception from a worker, as the one line a person needs (the cause, and how to resume)."""
    cause: BaseException | None = error
    seen = set()
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        # Ray's wrapper (RayTaskError) also passes for the class it wraps, and its text is a traceback: the
        # exception it carries (`cause`) says the same thing in one line.
        inner = getattr(cause, "cause", None)
        if isinstance(inner, BaseException):
            cause = inner
        elif isinstance(cause, FactoryError):
            break
        else:
            cause = cause.__cause__
    text = str(cause if isinstance(cause, FactoryError) else error).strip().splitlines()
    message = text[-1] if text else type(error).__name__
    return FactoryError(f"job {job}: a worker failed: {message}; committed work is kept under {root} "
                        f"(re-run with --run-id {run_id} to resume)")
