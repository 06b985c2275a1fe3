"""structlog set-up: JSON lines for machines, a readable console for people at a terminal.

Request-scoped values (request id, later trace and run ids) are bound through contextvars, so every
line logged while serving a request carries them without being passed around.
"""

from __future__ import annotations

import logging
import sys

import structlog

from strata.config import LoggingConfig
from strata.security.redaction import Redactor


def configure_logging(config: LoggingConfig, redactor: Redactor | None = None) -> None:
    level = getattr(logging, config.level.upper())
    use_console = config.format == "console" or (config.format == "auto" and sys.stdout.isatty())
    renderer: structlog.typing.Processor = (
        structlog.dev.ConsoleRenderer() if use_console else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            *([redactor.processor] if redactor is not None else []),  # after the traceback is text
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stdout),
        cache_logger_on_first_use=True,
    )
    # Uvicorn and aiohttp log through the standard library: keep their warnings, drop their chatter.
    logging.basicConfig(
        level=max(level, logging.WARNING), stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s"
    )
