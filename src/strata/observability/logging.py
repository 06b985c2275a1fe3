"""structlog set-up: JSON lines for machines, a readable console for people at a terminal.

Request-scoped values (request id, key id, model, a run's id) are bound through contextvars, so every
line logged while serving a request carries them without being passed around; `trace_id` and `span_id`
come from the current OpenTelemetry span (the request's span, a run's `invoke_agent`, a tool call's).
"""

from __future__ import annotations

import logging
import sys

import structlog
from opentelemetry import trace

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
            add_trace_context,
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


def add_trace_context(
    _logger: object, _method: str, event_dict: structlog.typing.EventDict
) -> structlog.typing.EventDict:
    """`trace_id` and `span_id` of the current span (over any bound earlier: the innermost span wins)."""
    context = trace.get_current_span().get_span_context()
    if context.is_valid:
        event_dict["trace_id"] = f"{context.trace_id:032x}"
        event_dict["span_id"] = f"{context.span_id:016x}"
    return event_dict
