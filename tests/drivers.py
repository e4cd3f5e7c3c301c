"""Drivers in subprocesses, as users run them, and killed the way a crash would kill them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path


def start_driver(command: str, spec: Path, address: str, **env: str) -> subprocess.Popen:
    """`factory <command> SPEC --address ADDRESS` in a session of its own (so a kill takes all of it)."""
    return subprocess.Popen(
        [sys.executable, "-m", "factory", command, str(spec), "--address", address],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True, env={**os.environ, **env},
    )


def kill_when(driver: subprocess.Popen, ready: Callable[[], bool], timeout: float = 240) -> None:
    """SIGKILL the driver's whole session once `ready()` holds: no chance to clean up."""
    try:
        deadline = time.monotonic() + timeout
        while not ready():
            assert driver.poll() is None, driver.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the kill point was never reached"
            time.sleep(0.1)
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(timeout=30)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
