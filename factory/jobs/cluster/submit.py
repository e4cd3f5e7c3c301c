"""`factory submit`: the same `factory run` command, sent to a cluster through Ray's JobSubmissionClient."""

from __future__ import annotations

import shlex
from pathlib import Path

from factory.errors import FactoryError


def submit_job(spec_path: Path, *, address: str, overrides: list[str], run_id: str | None, wait: bool) -> str:
    from ray.job_submission import JobSubmissionClient

    command = ["factory", "run", str(spec_path)]
    for override in overrides:
        command += ["--set", override]
    if run_id:
        command += ["--run-id", run_id]
    try:
        client = JobSubmissionClient(address)
    except Exception as error:  # connection refused, bad address, auth
        raise FactoryError(f"cannot reach the Ray Jobs API at {address}: {error}") from error
    # The working dir ships this checkout (spec, manifests, package) to the cluster, like --working-dir .
    job_id = client.submit_job(
        entrypoint=shlex.join(command),
        runtime_env={"working_dir": ".", "excludes": [".venv", "out", ".git", "*.png"]},
    )
    print(f"submitted {job_id} to {address}")
    if not wait:
        return "PENDING"
    import asyncio

    async def follow() -> None:
        async for lines in client.tail_job_logs(job_id):
            print(lines, end="")

    asyncio.run(follow())
    return client.get_job_status(job_id).value
