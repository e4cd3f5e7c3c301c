"""The console stays quiet: what reaches it, what goes to the log file, and how worker output is filtered."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from factory.logs import LevelFilteredPrinter, line_level

REPO = Path(__file__).resolve().parents[2]


def run_python(code: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    """A fresh driver process, so logging is configured exactly as the `factory` command does it."""
    environment = {key: value for key, value in os.environ.items()
                   if key not in ("FACTORY_LOG_LEVEL", "FACTORY_LOG_JSON")}
    environment.update({"FACTORY_LOG_FILE": str(tmp_path / "factory.log"), **env})
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, env=environment,
                          capture_output=True, text=True, timeout=120)


DRIVER = """
    import logging, os, sys, warnings
    import structlog
    from factory.logs import configure_logging
    configure_logging(os.environ.get("FACTORY_LOG_LEVEL", "warning"))
    log = structlog.get_logger("factory.jobs.run")
    log.info("run starting", rows=3)
    log.warning("error budget close", failed=2)
    logging.getLogger("ray.data").warning("Progress bars disabled.")
    logging.getLogger("ray.serve").info("Started Serve in namespace serve.")
    logging.getLogger("ray").error("GCS is unreachable")
    logging.getLogger("ray.serve").warning("Deployment has 1 replicas that have taken more than 30s to be scheduled.")
    warnings.warn("something is deprecated", DeprecationWarning)
    print("summary table", flush=True)
"""


def test_driver_console_shows_own_warnings_and_library_errors_only(tmp_path):
    done = run_python(DRIVER, tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "summary table\n"
    console = done.stderr.splitlines()
    assert len(console) == 3, done.stderr
    assert "error budget close" in console[0] and "failed=2" in console[0]
    assert "GCS is unreachable" in console[1]
    assert "to be scheduled" in console[2]  # a library warning that explains a stalled run
    logged = (tmp_path / "factory.log").read_text()
    for text in ("run starting", "error budget close", "Progress bars disabled", "Started Serve",
                 "GCS is unreachable", "something is deprecated"):
        assert text in logged, text
    assert "pid=" in logged  # several processes may share the file


def test_info_level_shows_library_info_too(tmp_path):
    done = run_python(DRIVER, tmp_path, FACTORY_LOG_LEVEL="info")
    assert done.returncode == 0, done.stderr
    for text in ("run starting", "Progress bars disabled", "Started Serve", "GCS is unreachable"):
        assert text in done.stderr, text


def test_json_lines_for_machines(tmp_path):
    done = run_python(DRIVER, tmp_path, FACTORY_LOG_JSON="1")
    records = [json.loads(line) for line in done.stderr.splitlines()]
    assert records[0]["event"] == "error budget close" and records[0]["level"] == "warning"


def test_native_stderr_goes_to_the_log_file_and_python_stderr_stays(tmp_path):
    done = run_python("""
        import os, sys
        from factory.logs import configure_logging
        configure_logging("warning")
        os.write(2, b"[2026-01-01 00:00:00,000 E 1 1] core_worker.cc:1: a native notice\\n")
        print("progress line", file=sys.stderr, flush=True)
    """, tmp_path)
    assert done.returncode == 0
    assert done.stderr == "progress line\n"
    assert "a native notice" in (tmp_path / "factory.log").read_text()


def test_native_stderr_is_left_alone_without_a_log_file(tmp_path):
    done = run_python("""
        import os
        from factory.logs import redirect_native_stderr
        redirect_native_stderr()
        os.write(2, b"native\\n")
    """, tmp_path)
    assert done.stderr == "native\n"


def test_an_unwritable_log_file_is_one_line_and_nothing_else(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    done = run_python(DRIVER, tmp_path, FACTORY_LOG_FILE=str(blocker / "factory.log"))
    assert done.returncode == 0
    lines = done.stderr.splitlines()
    assert lines[0].startswith(f"warning: cannot write the log file {blocker / 'factory.log'}")
    assert len(lines) == 4  # that line, then the same three as with a file


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("2026-11-26 12:40:38,159\tWARNING authentication_token_setup.py:85 -- Token", (logging.WARNING, False)),
        ("INFO 2026-11-26 12:40:43,608 proxy 192.0.2.2 -- Proxy starting", (logging.INFO, False)),
        ("WARNING 2026-11-26 12:51:14,041 serve 704 -- Failed to get queue length", (logging.WARNING, False)),
        ("2026-11-26 12:40:55 [debug    ] manifest.read   rows=29", (logging.DEBUG, True)),
        ("2026-11-26T12:40:55.123Z [warning  ] row failed  error=x", (logging.WARNING, True)),
        ('{"event": "row failed", "level": "warning"}', (logging.WARNING, True)),
        ("[2026-11-26 12:40:50,956 E 7285 7285] core_worker.cc:2465: Actor", (logging.ERROR, False)),
        ("Traceback (most recent call last):", None),
        ("plain print", None),
    ],
)
def test_line_level(line, expected):
    assert line_level(line) == expected


def test_forwarded_worker_output_keeps_warnings_errors_and_prints():
    printed = []
    printer = LevelFilteredPrinter(printed.append, logging.WARNING, logging.ERROR)
    printer({"pid": 7, "lines": [
        "INFO 2026-11-26 12:40:43,608 proxy 192.0.2.2 -- Proxy starting on node x (HTTP port: 8000).",
        "2026-11-26 12:40:55 [debug    ] manifest.read                  rows=29",
        "WARNING 2026-11-26 12:51:14,041 serve 704 -- Failed to get queue length from Replica",
        "2026-11-26T12:40:55Z [warning  ] adapter missing                tenant=acme",
        "ERROR 2026-11-26 12:51:14,041 controller 9 -- Exception in replica constructor:",
        "Traceback (most recent call last):",
        "  File \"x.py\", line 1, in <module>",
        "WARNING 2026-11-26 12:51:14,041 controller 9 -- 1 replicas have taken more than 30s to be scheduled.",
        "a plain print",
    ]})
    assert len(printed) == 1 and printed[0]["pid"] == 7
    assert printed[0]["lines"] == [
        "2026-11-26T12:40:55Z [warning  ] adapter missing                tenant=acme",
        "ERROR 2026-11-26 12:51:14,041 controller 9 -- Exception in replica constructor:",
        "Traceback (most recent call last):",
        "  File \"x.py\", line 1, in <module>",
        "WARNING 2026-11-26 12:51:14,041 controller 9 -- 1 replicas have taken more than 30s to be scheduled.",
        "a plain print",
    ]


def test_forwarded_worker_output_drops_a_dropped_records_continuation_lines():
    printed = []
    printer = LevelFilteredPrinter(printed.append, logging.WARNING, logging.ERROR)
    printer({"pid": 7, "lines": ["INFO 2026-11-26 12:40:43,608 controller 1 -- two lines:", "    second"]})
    assert printed == []


# What Serve's controller forwarded to the driver while a worker node was lost (Ray 2.60, abridged).
LOST_NODE = [
    "ERROR 2026-12-07 12:54:40,899 controller 2195 -- Unexpected error invoking health check for proxy on 36d1",
    "Traceback (most recent call last):",
    '  File "ray/serve/_private/proxy_state.py", line 265, in is_healthy',
    "    return self._health_check_future.result()",
    "ray.exceptions.ActorUnavailableError: The actor 0581 is unavailable: The actor is temporarily unavailable",
    "ERROR 2026-12-07 12:54:43,925 controller 2195 -- The deployments ['StackReplica'] are UNHEALTHY.",
    "ERROR 2026-12-07 12:54:45,879 controller 2195 -- Exception when trying to gracefully shutdown replica:",
    "Traceback (most recent call last):",
    '  File "ray/serve/_private/deployment_state.py", line 1613, in check_stopped',
    "ray.exceptions.ActorUnavailableError: The actor fece is unavailable: The actor is temporarily unavailable",
    "Traceback (most recent call last):",
    '  File "ray/_private/worker.py", line 1055, in get_objects',
    "ray.exceptions.ActorUnavailableError: The actor fece is unavailable: The actor is temporarily unavailable",
]


def test_serves_recovery_from_a_lost_node_goes_to_the_log_file_and_a_real_error_still_shows(caplog):
    printed = []
    printer = LevelFilteredPrinter(printed.append, logging.WARNING, logging.ERROR)
    with caplog.at_level(logging.INFO, logger="factory.recoveries"):
        printer({"pid": 2195, "actor_name": "ServeController", "lines": LOST_NODE[:7]})
        # The record's traceback comes in the next batch of the same process: still the recovery's.
        printer({"pid": 2195, "actor_name": "ServeController", "lines": [
            *LOST_NODE[7:], " Attempting to recover 1 lost objects by resubmitting their tasks."]})
        printer({"pid": 2195, "lines": ["ERROR 2026-12-07 12:55:00,000 controller 2195 -- Exception in replica "
                                        "constructor:", "Traceback (most recent call last):", "ValueError: bad"]})
    assert [line for batch in printed for line in batch["lines"]] == [
        "ERROR 2026-12-07 12:55:00,000 controller 2195 -- Exception in replica constructor:",
        "Traceback (most recent call last):", "ValueError: bad"]
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert all(line in logged for line in LOST_NODE) and "lost objects" in logged
    assert all(record.levelno == logging.INFO for record in caplog.records)  # the file, never the console


def test_workers_get_the_setup_hook_and_the_drivers_settings(monkeypatch):
    from factory.jobs.cluster import connection as cluster
    from factory.jobs.cluster.connection import _worker_runtime_env

    for key in getattr(cluster, "FORWARDED_ENV", ()):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("FACTORY_HOME", "/models")
    monkeypatch.setenv("FACTORY_LOG_LEVEL", "info")
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert _worker_runtime_env() == {
        "env_vars": {"FACTORY_HOME": "/models", "FACTORY_LOG_LEVEL": "info"},
        "worker_process_setup_hook": "factory.logs.setup_worker_logging",
    }
    # Under `ray job submit`, keys the submitted runtime_env already sets are left to it (ray.init would
    # refuse to merge two values for one key).
    submitted = {"runtime_env": {"env_vars": {"FACTORY_HOME": "/elsewhere"}, "worker_process_setup_hook": "x.y"}}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(submitted))
    assert _worker_runtime_env() == {"env_vars": {"FACTORY_LOG_LEVEL": "info"}}
