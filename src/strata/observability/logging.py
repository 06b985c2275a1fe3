"""structlog set-up: JSON lines for machines, a readable console for people at a terminal.

Request-scoped values (request id, key id, model, a run's id) are bound through contextvars, so every
line logged while serving a request carries them without being passed around; `trace_id` and `span_id`
come from the current OpenTelemetry span (the request's span, a run's `invoke_agent`, a tool call's).

The libraries log through the standard library (opentelemetry, uvicorn, aiohttp, httpx, mcp, alembic,
asyncio, Python's warnings): their records go through structlog's `ProcessorFormatter`, so they come out
as the same JSON lines (with `logger`, the library's logger name), redacted alike, never as plain text in
a JSON log. Both kinds of line are written whole under one lock (`_LineSink`): the OTLP exporter logs from
its own thread. A library that repeats itself (an exporter whose collector is down fails every few
seconds) is rate-limited by `RepeatLimiter`: the first few lines of each message, then one line with a
`suppressed` count per window.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import IO

import structlog
from opentelemetry import trace

from strata.config import LoggingConfig
from strata.security.redaction import Redactor

_MAX_TRACKED = 1024  # distinct messages remembered; the oldest is forgotten beyond this
_HANDLER_NAME = "strata"


def configure_logging(
    config: LoggingConfig, redactor: Redactor | None = None, stream: IO[str] | None = None
) -> logging.Handler:
    """Set up structlog and route the standard library's logging through it; returns the handler installed on
    the root logger (tests write to their own `stream`)."""
    level = getattr(logging, config.level.upper())
    stream = stream or sys.stdout
    use_console = config.format == "console" or (config.format == "auto" and stream.isatty())
    renderer: structlog.typing.Processor = (
        structlog.dev.ConsoleRenderer() if use_console else structlog.processors.JSONRenderer()
    )
    finish: list[structlog.typing.Processor] = [
        structlog.processors.format_exc_info,
        *([redactor.processor] if redactor is not None else []),  # after the traceback is text
        renderer,
    ]
    sink = _LineSink(stream)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            add_trace_context,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            *finish,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.WriteLoggerFactory(file=sink),  # type: ignore[arg-type]
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sink)  # type: ignore[arg-type]
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[
                structlog.stdlib.add_logger_name,
                structlog.stdlib.add_log_level,
                add_trace_context,
                structlog.processors.TimeStamper(fmt="iso", utc=True),
                _add_suppressed,
            ],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *finish],
        )
    )
    handler.addFilter(RepeatLimiter(config.repeat_burst, config.repeat_window_s))
    handler.name = _HANDLER_NAME
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.name == _HANDLER_NAME]:  # ours, from an earlier call
        root.removeHandler(old)
    root.addHandler(handler)
    # The libraries' warnings and errors; their info chatter (a line per HTTP request) stays out.
    root.setLevel(max(level, logging.WARNING))
    logging.captureWarnings(True)
    return handler


class _LineSink:
    """The one stream every log line goes to, a whole line per `write` under one lock, so that lines written
    from other threads never interleave with the event loop's."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream
        self._lock = threading.Lock()

    def write(self, text: str) -> int:
        with self._lock:
            return self._stream.write(text)

    def flush(self) -> None:
        with self._lock:
            self._stream.flush()

    def isatty(self) -> bool:
        return self._stream.isatty()


class RepeatLimiter(logging.Filter):
    """Lets each library message (its logger, level and text before its arguments are filled in) through `burst`
    times per `window_s`; the first let through after some were held back carries their number (`suppressed`).
    Strata's own lines (structlog's) are never held back."""

    def __init__(self, burst: int = 3, window_s: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.burst = burst
        self.window_s = window_s
        self._clock = clock
        self._seen: OrderedDict[tuple[str, int, str], list[float]] = OrderedDict()  # [window start, let, held]
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, dict):  # structlog's, through ProcessorFormatter.wrap_for_formatter
            return True
        key = (record.name, record.levelno, str(record.msg))
        now = self._clock()
        with self._lock:
            seen = self._seen.get(key)
            if seen is None or now - seen[0] >= self.window_s:
                held = int(seen[2]) if seen is not None else 0
                self._seen[key] = [now, 1, 0]
                self._seen.move_to_end(key)
                if len(self._seen) > _MAX_TRACKED:
                    self._seen.popitem(last=False)
                if held:
                    record.suppressed = held
                    record.suppressed_window_s = self.window_s
                return True
            if seen[1] < self.burst:
                seen[1] += 1
                return True
            seen[2] += 1
            return False


def _add_suppressed(
    _logger: object, _method: str, event_dict: structlog.typing.EventDict
) -> structlog.typing.EventDict:
    """How many lines like this one `RepeatLimiter` held back in the window before."""
    record = event_dict.get("_record")
    held = getattr(record, "suppressed", None)
    if held:
        event_dict["suppressed"] = held
        event_dict["suppressed_window_s"] = record.suppressed_window_s  # type: ignore[union-attr]
    return event_dict


def add_trace_context(
    _logger: object, _method: str, event_dict: structlog.typing.EventDict
) -> structlog.typing.EventDict:
    """`trace_id` and `span_id` of the current span (over any bound earlier: the innermost span wins)."""
    context = trace.get_current_span().get_span_context()
    if context.is_valid:
        event_dict["trace_id"] = f"{context.trace_id:032x}"
        event_dict["span_id"] = f"{context.span_id:016x}"
    return event_dict
