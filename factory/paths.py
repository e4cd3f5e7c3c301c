"""Where factory keeps what it builds and writes on a machine: one folder, $FACTORY_HOME."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs


def factory_home() -> Path:
    """Where built checkpoints and the driver's log file live: $FACTORY_HOME, else the user's cache dir."""
    configured = os.environ.get("FACTORY_HOME")
    return Path(configured) if configured else Path(platformdirs.user_cache_dir("factory"))
