"""Failpoints: named places where a test can stop a worker, the way etcd and FoundationDB test crash safety.

Off unless `FACTORY_FAILPOINT=<name>=<flag file>` is set (the job forwards it to its Ray workers); a point that
passes a key (a chunk's ordinal, say) can be armed for one key only, as `<name>[<key>]=<flag file>`. The worker
that reaches the armed point writes its pid to the flag file and waits there, so a test can kill the driver at
exactly that point (say, between two parts of one commit) and then check what a re-run does.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

ENV = "FACTORY_FAILPOINT"


def failpoint(name: str, key: object = None) -> None:
    armed = os.environ.get(ENV)
    if not armed:
        return
    point, _, flag = armed.partition("=")
    if not flag or point not in (name, f"{name}[{key}]"):
        return
    Path(flag).write_text(str(os.getpid()))
    while True:  # until the test kills the run
        time.sleep(1)
