"""Logging: a quiet console for people, a log file for everything else, JSON for machines (FACTORY_LOG_JSON=1).

In the driver (the `factory` command, benchmarks) the console (stderr) gets factory's own records at
FACTORY_LOG_LEVEL (default: warning) and other libraries' records only from ERROR up, plus the few library
warnings that explain a stalled run (all of them at the chosen level when that is info or debug). Everything from
INFO up (DEBUG with FACTORY_LOG_LEVEL=debug) goes to one log file, `$FACTORY_HOME/logs/factory.log` (override with
FACTORY_LOG_FILE; rotated at 20 MB, shared by concurrent drivers, each line with its pid): factory's records,
Ray's, Ray Data's and Serve's driver loggers, Python warnings, and what native code writes straight to the
process's stderr (Ray's C++ core worker). Nothing is printed about the file unless it cannot be written.

In Ray workers (Ray Data tasks and actors, Serve replicas) factory's records go to the worker's stderr at
FACTORY_LOG_LEVEL; Ray keeps that in the session's worker log files (/tmp/ray/session_*/logs) and forwards it to
the driver, whose console applies the same policy to it (filter_forwarded_worker_output).
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import re
import sys
from pathlib import Path

import structlog

LOG_FILE_ENV = "FACTORY_LOG_FILE"
LOG_FILE_MAX_BYTES = 20 * 1024 * 1024
LOG_FILE_BACKUPS = 3

# Ray's loggers that print to the console by themselves (a StreamHandler, propagate=False): their records are
# sent through the root logger instead, i.e. to the log file, and to the console only from ERROR up.
LIBRARY_LOGGERS = ("ray", "ray.data", "ray.serve")


def _factory_file_handler() -> logging.handlers.RotatingFileHandler | None:
    """The driver's log file handler, when configure_logging installed one (logging's own state is the record)."""
    for handler in logging.getLogger().handlers:
        if getattr(handler, "_factory", False) and isinstance(handler, logging.handlers.RotatingFileHandler):
            return handler
    return None


def _level_number(level: str | int) -> int:
    if isinstance(level, int):
        return level
    numeric = logging.getLevelName(str(level).upper())
    return numeric if isinstance(numeric, int) else logging.INFO


def in_ray_worker() -> bool:
    """True inside a Ray worker process (a task, an actor, a Serve replica); False in a driver."""
    ray = sys.modules.get("ray")
    if ray is None:
        return False
    try:
        worker = ray._private.worker
        return worker.global_worker.mode == worker.WORKER_MODE
    except Exception:  # pragma: no cover - a Ray without these internals: treat as a driver
        return False


def configure_logging(level: str = "info") -> None:
    """Set up logging for this process: the driver's console and log file, or a Ray worker's stderr."""
    if in_ray_worker():
        # One variable sets every process: connect() forwards FACTORY_LOG_LEVEL to the workers.
        _configure_worker(os.environ.get("FACTORY_LOG_LEVEL") or level)
    else:
        _configure_driver(level)


def setup_worker_logging() -> None:
    """Ray's `worker_process_setup_hook` (set by connect()): every worker of a run logs like the driver asked,
    including Ray Data tasks that never call configure_logging themselves."""
    _configure_worker(os.environ.get("FACTORY_LOG_LEVEL", "warning"))


def _renderer(colors: bool = False):
    if os.environ.get("FACTORY_LOG_JSON") == "1":
        return structlog.processors.JSONRenderer()
    return structlog.dev.ConsoleRenderer(colors=colors, exception_formatter=structlog.dev.plain_traceback)


def _configure_worker(level: str) -> None:
    numeric = _level_number(level)
    logging.basicConfig(level=numeric, format="%(message)s")
    install_notice_filters()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _renderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        # stderr, not stdout: Ray forwards it to the driver's stderr, away from the summary table on stdout.
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )


def default_log_file() -> Path:
    configured = os.environ.get(LOG_FILE_ENV)
    if configured:
        return Path(configured).expanduser()
    from factory.paths import factory_home

    return factory_home() / "logs" / "factory.log"


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (it changes when native stderr goes to the log file)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it; the property always wins
        pass


class _ConsoleFilter(logging.Filter):
    """factory's records at the chosen level; other libraries' from `library_level` up, and the few warnings
    that explain a stalled run (ACTIONABLE_LIBRARY_WARNINGS)."""

    def __init__(self, level: int, library_level: int):
        super().__init__()
        self.level = level
        self.library_level = library_level

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "factory" or record.name.startswith("factory."):
            return record.levelno >= self.level
        if record.levelno >= self.library_level:
            return True
        return record.levelno >= logging.WARNING and _actionable(record.getMessage())


def _add_pid(logger, method_name: str, event_dict: dict) -> dict:
    event_dict.setdefault("pid", os.getpid())
    return event_dict


def _configure_driver(level: str) -> None:
    numeric = _level_number(level)
    file_level = min(numeric, logging.INFO)
    library_level = library_console_level(numeric)
    shared = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]

    def formatter(renderer, *extra) -> structlog.stdlib.ProcessorFormatter:
        return structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[*extra, structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )

    root = logging.getLogger()
    for handler in list(root.handlers):  # idempotent: a second call replaces what the first installed
        if getattr(handler, "_factory", False):
            root.removeHandler(handler)
            handler.close()

    console = _StderrHandler()
    console.setLevel(min(numeric, library_level, logging.WARNING))
    console.addFilter(_ConsoleFilter(numeric, library_level))
    console.setFormatter(formatter(_renderer()))
    console._factory = True
    root.addHandler(console)

    path = default_log_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        file_handler = logging.handlers.RotatingFileHandler(
            path, maxBytes=LOG_FILE_MAX_BYTES, backupCount=LOG_FILE_BACKUPS, encoding="utf-8"
        )
    except OSError as error:
        # The one thing said about the log file: that there is none, and so where library logs go instead.
        print(f"warning: cannot write the log file {path}: {error.strerror or error}; library logs are dropped",
              file=sys.stderr)
    else:
        file_handler.setLevel(file_level)
        file_renderer = (
            structlog.processors.JSONRenderer() if os.environ.get("FACTORY_LOG_JSON") == "1"
            else structlog.dev.ConsoleRenderer(colors=False, exception_formatter=structlog.dev.plain_traceback)
        )
        # Which library said it, and which process: several drivers may share the file.
        file_handler.setFormatter(formatter(file_renderer, structlog.stdlib.add_logger_name, _add_pid))
        file_handler._factory = True
        root.addHandler(file_handler)

    root.setLevel(min(file_level, console.level))
    logging.captureWarnings(True)  # library DeprecationWarnings and the like: the file, not the console
    redirect_native_stderr()  # first thing, so streams opened later (the progress line's) are the terminal
    install_notice_filters()
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.make_filtering_bound_logger(file_level),
        cache_logger_on_first_use=False,
    )
    route_library_logs()


def route_library_logs() -> None:
    """Ray, Ray Data and Serve each install a console handler on their logger when imported (and turn off
    propagation); take those off so their records go through the root logger: the file, and the console only
    when they matter. Their own file handlers (e.g. Ray Data's ray-data.log) stay. Safe to call repeatedly;
    call it after importing ray.data / ray.serve, which install theirs at import."""
    for name in LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            # Console handlers only (Ray's PlainRayHandler, Serve's StreamHandler); file handlers stay.
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                logger.removeHandler(handler)
        logger.propagate = True
    ray_logger = logging.getLogger("ray")
    # Ray's own default is INFO; keep it (so the file has it) unless debug was asked for.
    root_level = logging.getLogger().level
    ray_logger.setLevel(logging.DEBUG if root_level and root_level <= logging.DEBUG else logging.INFO)


def log_file() -> Path | None:
    """The driver's log file, when configure_logging set one up in this process."""
    handler = _factory_file_handler()
    return Path(handler.baseFilename) if handler is not None else None


def redirect_native_stderr() -> None:
    """Native code (Ray's C++ core worker, gRPC, torch) writes to file descriptor 2 directly, past Python's
    logging: point descriptor 2 at the log file and give sys.stderr (the progress line, factory's warnings,
    one-line errors) a new descriptor on the terminal. Done by configure_logging in a driver that has a log
    file; a no-op otherwise (Ray workers, whose stderr Ray already keeps in files) and when done already."""
    path = log_file()
    if path is None or in_ray_worker():
        return
    try:
        if os.path.samestat(os.fstat(2), os.stat(path)):
            return  # done already: descriptor 2 is the log file
        sys.stderr.flush()
        terminal = os.dup(2)
        target = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError:
        return
    encoding = getattr(sys.stderr, "encoding", None) or "utf-8"
    sys.stderr = open(terminal, "w", buffering=1, encoding=encoding, errors="backslashreplace")  # noqa: SIM115
    os.dup2(target, 2)
    os.close(target)


def console_level() -> int:
    """The console's level for factory's own records: FACTORY_LOG_LEVEL, default warning."""
    return _level_number(os.environ.get("FACTORY_LOG_LEVEL", "warning"))


def library_console_level(level: int) -> int:
    """Other libraries reach the console from ERROR up, unless someone asked for info or debug."""
    return level if level < logging.WARNING else max(level, logging.ERROR)


# Library warnings that explain a stalled run (not enough CPUs/GPUs for the replicas or the Ray Data stages):
# a user must act on those, so they reach the console although other library warnings do not.
ACTIONABLE_LIBRARY_WARNINGS = ("to be scheduled", "cannot be scheduled", "may hang", "will hang",
                               "stuck in scheduling")


def _actionable(message: str) -> bool:
    return any(fragment in message for fragment in ACTIONABLE_LIBRARY_WARNINGS)


# The level a line printed by a Ray worker declares, as Ray forwards it to the driver: Ray's and Ray Data's
# loggers ("2026-01-01 10:00:00,123\tINFO file.py:1 -- ..."), Serve's ("INFO 2026-01-01 10:00:00,123 proxy
# ..."), structlog's console and JSON renderers ("2026-01-01T10:00:00Z [info     ] event", '"level": "info"'),
# Ray's C++ logs ("[2026-01-01 10:00:00,123 E 12 34] core_worker.cc:1: ...").
_LEVEL_WORDS = {"TRACE": 5, "DEBUG": logging.DEBUG, "INFO": logging.INFO, "WARNING": logging.WARNING,
                "WARN": logging.WARNING, "ERROR": logging.ERROR, "CRITICAL": logging.CRITICAL,
                "FATAL": logging.CRITICAL}
_CPP_LEVELS = {"D": logging.DEBUG, "I": logging.INFO, "W": logging.WARNING, "E": logging.ERROR,
               "F": logging.CRITICAL}
_LINE_LEVEL = re.compile(
    r"^(?:\d{4}-\d\d-\d\d[ T][\d:.,]+\s+(?P<ray>[A-Z]+)\s"
    r"|(?P<serve>[A-Z]+) \d{4}-\d\d-\d\d "
    r"|\S+(?: \S+)? \[(?P<structlog>[a-z]+)\s*\]"
    r"|\[\d{4}-\d\d-\d\d [\d:.,]+ (?P<cpp>[DIWEF]) \d+ \d+\])"
)
_JSON_LEVEL = re.compile(r'"level": ?"(?P<level>[a-z]+)"')


def line_level(line: str) -> tuple[int, bool] | None:
    """(level, whether factory's structlog wrote it) for a forwarded worker line; None when the line declares
    no level (a plain print, a traceback line)."""
    match = _LINE_LEVEL.match(line)
    if match:
        if match.group("cpp"):
            return _CPP_LEVELS[match.group("cpp")], False
        if match.group("structlog"):
            level = _LEVEL_WORDS.get(match.group("structlog").upper())
            return (level, True) if level is not None else None
        level = _LEVEL_WORDS.get((match.group("ray") or match.group("serve")).upper())
        return (level, False) if level is not None else None
    if line.startswith("{"):
        match = _JSON_LEVEL.search(line)
        if match and match.group("level").upper() in _LEVEL_WORDS:
            return _LEVEL_WORDS[match.group("level").upper()], True
    return None


# What Serve and Ray report, at ERROR and with a traceback, while they recover by themselves from a lost node, replica
# or proxy: Serve replaces the replicas and proxies it held, Ray rebuilds the objects it lost. Expected, so they go
# to the log file, not the console. A recovery that fails shows up as the run's own one-line error (rows failed
# after their retries, replicas not ready in time), and a lost node as one line of the run (factory.jobs.cluster).
EXPECTED_RECOVERIES = (
    "Unexpected error invoking health check for proxy", "Unexpected error invoking drain-check for proxy",
    "Exception when trying to gracefully shutdown replica", "are UNHEALTHY",
    "lost objects by resubmitting their tasks",
)
_recoveries = logging.getLogger("factory.recoveries")


def _recovery(line: str) -> bool:
    return any(fragment in line for fragment in EXPECTED_RECOVERIES)


class LevelFilteredPrinter:
    """Wraps Ray's printer of forwarded worker output (log_to_driver) with the driver console's policy:
    factory's records from `level` up, Ray's/Serve's/Ray Data's from `library_level` up (plus the warnings
    that explain a stalled run). What it drops stays in the worker log files Ray writes anyway. Lines without
    a level (prints, tracebacks) are printed as before; an indented one continues the record above it.

    A library's record of an expected recovery (EXPECTED_RECOVERIES) goes to the log file instead, with every
    line after it up to the next record (its traceback), in this batch of lines or the process's next."""

    def __init__(self, printer, level: int, library_level: int):
        self.printer = printer
        self.level = level
        self.library_level = library_level
        self.recovering: dict = {}  # pid -> whether its last record was an expected recovery

    def keep(self, line: str, level: int, own: bool) -> bool:
        if own:
            return level >= self.level
        return level >= self.library_level or (level >= logging.WARNING and _actionable(line))

    def __call__(self, data: dict) -> None:
        if data.get("pid") == "autoscaler":  # Ray filters those events itself
            self.printer(data)
            return
        pid = data.get("pid")
        kept, recovered, dropping = [], [], False
        recovering = self.recovering.get(pid, False)
        for line in data.get("lines", []):
            declared = line_level(line)
            if declared is not None:
                recovering = not declared[1] and _recovery(line)
                dropping = not self.keep(line, *declared)
            elif not recovering and _recovery(line):
                recovering = True
            elif not line[:1].isspace():
                dropping = False
            if recovering:
                recovered.append(line)
            elif not dropping:
                kept.append(line)
        self.recovering[pid] = recovering
        if recovered:
            _recoveries.info("%s (pid %s) recovering:\n%s", data.get("actor_name") or data.get("task_name") or "a Ray "
                             "worker", pid, "\n".join(recovered))
        if kept:
            self.printer({**data, "lines": kept})


def filter_forwarded_worker_output(level: int | None = None) -> None:
    """Put LevelFilteredPrinter in front of Ray's printer of worker output, once ray.init has connected."""
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:  # pragma: no cover - another Ray layout: worker output is forwarded unfiltered
        return
    level = console_level() if level is None else level
    for name, printer in list(dispatcher.handlers):
        if name == "ray_print_logs" and not isinstance(printer, LevelFilteredPrinter):
            dispatcher.remove_handler(name)
            dispatcher.add_handler(name, LevelFilteredPrinter(printer, level, library_console_level(level)))


class _DropKnownNotice(logging.Filter):
    """Drops one known-harmless library notice that would otherwise repeat in every CLI call and replica log."""

    def __init__(self, fragment: str):
        super().__init__()
        self.fragment = fragment

    def filter(self, record: logging.LogRecord) -> bool:
        return self.fragment not in record.getMessage()


# (logger, message fragment): transformers uses its PIL image processors because torchvision is absent, which
# is the intended CPU setup (DESIGN.md); diffusers says a FLUX LoRA has no text-encoder keys, which is normal.
_KNOWN_NOTICES = (
    ("transformers.utils.import_utils", "requires torchvision (not installed)"),
    ("diffusers.loaders.lora_base", "No LoRA keys associated to CLIPTextModel"),
    ("diffusers.loaders.lora_pipeline", "No LoRA keys associated to CLIPTextModel"),
)


def install_notice_filters() -> None:
    for name, fragment in _KNOWN_NOTICES:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropKnownNotice) and f.fragment == fragment for f in logger.filters):
            logger.addFilter(_DropKnownNotice(fragment))


def quiet_library_noise() -> None:
    """Progress bars and known-harmless notices from diffusers/transformers; call before loading models."""
    import warnings

    install_notice_filters()
    # The LoRA pool keeps several named adapters on one transformer on purpose (one active per batch).
    warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute in the model")
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
