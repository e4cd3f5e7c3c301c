"""An output inside Ray's unpacked working-dir copy is refused; everything else is left alone."""

from __future__ import annotations

import pytest

from factory.errors import ConfigError
from factory.jobs.cluster.durable import check_durable_output


def test_an_output_inside_rays_working_dir_copy_is_refused(tmp_path):
    package = tmp_path / "ray" / "session_2026-11-26_01-30-00_1" / "runtime_resources" / "working_dir_files"
    inside = package / "_ray_pkg_0123abcd" / "out"
    with pytest.raises(ConfigError, match="inside Ray's temporary copy of the job's working directory"):
        check_durable_output(str(inside))


@pytest.mark.parametrize("output", ["s3://bucket/out", "/mnt/shared/out", "out/catalog"])
def test_durable_outputs_pass(output):
    check_durable_output(output)
