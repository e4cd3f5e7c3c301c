"""Refuse an output that would not outlive the job.

`ray job submit --working-dir . -- factory run jobs/catalog.yaml` runs the entrypoint in Ray's unpacked copy of
the working directory (`<session>/runtime_resources/working_dir_files/_ray_pkg_<hash>/`), so a relative `output:`
lands there, and Ray deletes that copy when it garbage-collects the package. The job would report success and
its results would vanish later.
"""

from __future__ import annotations

import os

from factory.errors import ConfigError

# Every runtime-env package Ray unpacks (working_dir, py_modules) lives under this folder of its session.
RAY_RUNTIME_RESOURCES = f"{os.sep}runtime_resources{os.sep}"


def check_durable_output(output: str) -> None:
    if output.startswith("s3://"):
        return
    real = os.path.realpath(output) + os.sep
    if RAY_RUNTIME_RESOURCES in real and f"{os.sep}session_" in real:
        raise ConfigError(
            f"output: {output} is inside Ray's temporary copy of the job's working directory, which Ray deletes "
            "after the job; pass an s3:// URI or an absolute path on storage every node shares, e.g. "
            "--set output=s3://bucket/prefix"
        )
