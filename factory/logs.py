"""structlog setup: key-value lines for people, JSON for machines (FACTORY_LOG_JSON=1)."""

from __future__ import annotations

import logging
import os

import structlog


def configure_logging(level: str = "info") -> None:
    numeric = logging.getLevelName(level.upper())
    numeric = numeric if isinstance(numeric, int) else logging.INFO
    logging.basicConfig(level=numeric, format="%(message)s")
    install_notice_filters()
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
