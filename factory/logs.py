"""structlog setup: key-value lines for people, JSON for machines (FACTORY_LOG_JSON=1)."""

from __future__ import annotations

import logging
import os

import structlog


def configure_logging(level: str = "info") -> None:
    numeric = logging.getLevelName(level.upper())
    numeric = numeric if isinstance(numeric, int) else logging.INFO
    logging.basicConfig(level=numeric, format="%(message)s")
    renderer = (
        structlog.processors.JSONRenderer()
        if os.environ.get("FACTORY_LOG_JSON") == "1"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
    )


class _DropTorchvisionFallbackNotice(logging.Filter):
    """transformers warns that it uses the PIL image processors because torchvision is absent: that is the
    intended setup on CPU machines (DESIGN.md), so the notice is noise in every CLI call and replica log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed)" not in record.getMessage()


def quiet_library_noise() -> None:
    """Progress bars and known-harmless notices from diffusers/transformers; call before loading models."""
    logging.getLogger("transformers.utils.import_utils").addFilter(_DropTorchvisionFallbackNotice())
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
