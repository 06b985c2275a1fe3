"""The standard library's records (what the libraries log) come out as Strata's JSON lines, rate-limited."""

from __future__ import annotations

import io
import json
import logging
import warnings
from collections.abc import Iterator

import pytest
import structlog

from strata.config import LoggingConfig
from strata.observability.logging import RepeatLimiter, configure_logging
from strata.security.redaction import MASK, Redactor


@pytest.fixture
def out() -> Iterator[io.StringIO]:
    """A JSON log written to a buffer; the root logger and structlog as they were afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    stream = io.StringIO()
    # Another test in this worker may have left warnings captured: undone first, the capture below is installed
    # afresh (otherwise it is a no-op and the warning goes to pytest's recorder).
    logging.captureWarnings(False)
    configure_logging(
        LoggingConfig(format="json", repeat_burst=2, repeat_window_s=3600), Redactor([r"sk-test-\w+"]), stream
    )
    yield stream
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.captureWarnings(False)
    structlog.reset_defaults()


def lines(out: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_library_records_are_json_lines_like_strata_s_own(out: io.StringIO) -> None:
    structlog.get_logger("strata.test").info("ours", n=1)
    logging.getLogger("uvicorn.error").warning("theirs %s with key sk-test-abc123", "formatted")
    logging.getLogger("httpx").info("a request")  # libraries' info chatter stays out
    try:
        raise ValueError("boom [/usr/share]")
    except ValueError:
        logging.getLogger("asyncio").exception("Task exception was never retrieved")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("old API", DeprecationWarning, stacklevel=1)
    ours, theirs, failed, warned = lines(out)
    assert ours["event"] == "ours" and ours["level"] == "info"
    assert theirs["event"] == f"theirs formatted with key {MASK}"  # redacted like our own lines
    assert (theirs["logger"], theirs["level"]) == ("uvicorn.error", "warning") and theirs["timestamp"]
    assert failed["level"] == "error" and "ValueError: boom [/usr/share]" in str(failed["exception"])
    assert warned["logger"] == "py.warnings" and "old API" in str(warned["event"])


def test_repeats_of_a_library_message_are_held_back_and_counted(out: io.StringIO) -> None:
    exporter = logging.getLogger("opentelemetry.exporter.otlp.proto.http.trace_exporter")
    for attempt in range(50):
        exporter.warning("Transient error %s encountered, retrying in %.2fs.", "refused", attempt / 10)
    exporter.error("Failed to export %s batch.", "spans")
    for _ in range(10):
        structlog.get_logger("strata.test").warning("ours is never held back")
    logged = lines(out)
    assert [line["event"] for line in logged].count("ours is never held back") == 10
    transient = [line for line in logged if str(line["event"]).startswith("Transient")]
    assert len(transient) == 2  # repeat_burst, within the window
    assert [line["event"] for line in logged].count("Failed to export spans batch.") == 1


def test_the_first_line_after_a_window_says_how_many_were_held() -> None:
    now = [0.0]
    limiter = RepeatLimiter(burst=1, window_s=10, clock=lambda: now[0])

    def record(msg: str = "Failed to export %s batch") -> logging.LogRecord:
        return logging.LogRecord("otel", logging.ERROR, __file__, 1, msg, ("spans",), None)

    assert limiter.filter(record())
    assert [limiter.filter(record()) for _ in range(5)] == [False] * 5
    assert limiter.filter(record("another message"))  # each message has its own count
    now[0] = 10.0
    first = record()
    assert limiter.filter(first) and first.suppressed == 5  # type: ignore[attr-defined]
    assert not limiter.filter(record())
