"""The engine's outputs, file by file: the demo job, a manifest job and an archive job run again on the shared
test cluster and compared with tests/golden.json (tests/golden.py says what is compared, what is left out and
why, and how to record it anew when outputs change on purpose)."""

from __future__ import annotations

import json

import pytest

from tests.golden import GOLDEN, differences, record

pytestmark = pytest.mark.slow


def test_the_jobs_write_the_same_files_as_recorded(ray_cluster):
    now = record(ray_cluster["address"])
    lines = differences(json.loads(GOLDEN.read_text()), now)
    assert not lines, "\n".join(lines)
