"""Strata's log stays structured when its libraries complain: a real `strata serve` exporting traces to an
OTLP endpoint where nothing listens. The exporter fails again and again; what it logs comes out as JSON lines
like Strata's own, and its repeats are held back and counted rather than flooding the log."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from strata.serving.supervisor import free_port
from tests.conftest import mock_model
from tests.support.mock_backend import MockBackend
from tests.support.strata_process import StrataProcess

WINDOW_S = 2.0  # repeat_window_s, with repeat_burst 1: one line per message per window


@pytest.fixture(scope="module")
def server(mock_backend: MockBackend, tmp_path_factory: pytest.TempPathFactory) -> Iterator[StrataProcess]:
    closed = free_port()  # free: nothing listens on it
    config = {
        "models": [mock_model(mock_backend)],
        "tracing": {"otlp_endpoint": f"http://127.0.0.1:{closed}/v1/traces"},
        "logging": {"format": "json", "level": "info", "repeat_burst": 1, "repeat_window_s": WINDOW_S},
        "server": {"drain_delay_s": 0, "shutdown_grace_s": 2},
    }
    # Export a batch every 50 ms (not every 5 s), so the exporter fails often within the test.
    env = {"MOCK_API_KEY": "mock-secret", "OTEL_BSP_SCHEDULE_DELAY": "50"}
    process = StrataProcess(tmp_path_factory.mktemp("logs"), config, env, split_stderr=True).start()
    yield process
    process.stop()


def json_lines(text: str) -> list[dict[str, Any]]:
    """Every line, parsed: a line that is not a JSON object fails the test, naming it."""
    lines = []
    for line in text.splitlines():
        try:
            parsed = orjson.loads(line)
        except orjson.JSONDecodeError:
            pytest.fail(f"a log line is not JSON: {line!r}")
        assert isinstance(parsed, dict), line
        lines.append(parsed)
    return lines


def exporter_lines(server: StrataProcess) -> list[dict[str, Any]]:
    return [line for line in json_lines(server.logs()) if str(line.get("logger", "")).startswith("opentelemetry")]


def test_library_lines_are_json_and_their_repeats_are_counted(server: StrataProcess) -> None:
    client = server.client()
    started = time.monotonic()
    deadline = started + 90
    while not any(line.get("suppressed") for line in exporter_lines(server)):
        assert time.monotonic() < deadline, f"no exporter line says what it held back:\n{server.logs()[-3000:]}"
        response = client.post(
            "/v1/chat/completions", json={"model": "mock-model", "messages": [{"role": "user", "content": "hi"}]}
        )
        assert response.status_code == 200, response.text
        time.sleep(0.2)
    elapsed = time.monotonic() - started

    lines = exporter_lines(server)  # the whole log parses as JSON lines
    assert lines, "the exporter's failures were not logged"
    for line in lines:
        assert line["level"] in ("warning", "error") and line["timestamp"] and line["event"]
        assert "Traceback" not in line["event"]
    # Bounded: one line per message (template) per window, at most; the rest are counted, not written.
    templates = Counter((line["logger"], line["level"], _template(line["event"])) for line in lines)
    for template, count in templates.items():
        assert count <= elapsed / WINDOW_S + 2, (template, count, elapsed)
    held = sum(line.get("suppressed", 0) for line in lines)
    assert held >= 1 and all(line.get("suppressed_window_s", WINDOW_S) == WINDOW_S for line in lines)

    # Nothing from the logging system reached standard error as plain text.
    assert server.stderr_path is not None
    stderr = Path(server.stderr_path).read_text(errors="replace")
    for word in ("opentelemetry", "Failed to export", "Transient error", "Traceback", "WARNING", "ERROR"):
        assert word not in stderr, stderr


def _template(event: str) -> str:
    """The message with its numbers and parenthesised details taken out: one shape per kind of failure."""
    return "".join("#" if c.isdigit() else c for c in event.split("(", 1)[0])
