"""Streams that fail after their 200 went out, against a real `strata serve`: the client gets an error event,
and operators see the failure in /metrics and in one log line (the status code alone cannot tell them)."""

from __future__ import annotations

import json
import signal
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import mock_model
from tests.support.mock_backend import MockBackend, Reply
from tests.support.strata_process import StrataProcess

WORDS = " ".join(f"w{i}" for i in range(12))


def stream_body(model: str = "mock-model") -> dict[str, Any]:
    return {"model": model, "stream": True, "messages": [{"role": "user", "content": "hi"}]}


def data_events(text: str) -> list[str]:
    return [line[6:] for line in text.splitlines() if line.startswith("data: ")]


def stream_errors(strata: StrataProcess) -> dict[tuple[str, str], float]:
    """strata_stream_errors_total by (model, error_type)."""
    text = httpx.get(f"{strata.url}/metrics", headers=strata.headers, timeout=10).text
    return {
        (sample.labels["model"], sample.labels["error_type"]): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "strata_stream_errors_total"
    }


def log_records(strata: StrataProcess, event: str) -> list[dict[str, Any]]:
    records = []
    for line in strata.logs().splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            if record.get("event") == event:
                records.append(record)
    return records


@pytest.mark.parametrize(
    ("model", "reply", "error_type"),
    [
        ("mock-model", Reply(content=WORDS, reset="mid_stream"), "upstream_unavailable"),
        ("mock-model", Reply(content=WORDS, stop_after_chunks=4), "upstream_unavailable"),
        ("mock-fast-timeout", Reply(content=WORDS, chunk_delay_s=3.0), "upstream_timeout"),  # read_s is 1 s
    ],
    ids=["backend-dies", "closed-without-done", "backend-stalls"],
)
def test_a_stream_cut_mid_way_is_counted_and_logged(
    strata: StrataProcess, mock_backend: MockBackend, model: str, reply: Reply, error_type: str
) -> None:
    mock_backend.script(reply)
    before = stream_errors(strata).get((model, error_type), 0.0)
    request_id = f"cut-{uuid.uuid4().hex[:12]}"
    headers = {**strata.headers, "X-Request-ID": request_id}
    with httpx.stream(
        "POST", f"{strata.base_url}/chat/completions", json=stream_body(model), headers=headers, timeout=30
    ) as response:
        assert response.status_code == 200
        events = data_events(response.read().decode())

    assert "[DONE]" not in events
    error = json.loads(events[-1])["error"]
    assert error["code"] == error_type and error["deployment"]
    relayed = [json.loads(e) for e in events[:-1]]
    assert relayed and all("choices" in e for e in relayed)

    assert stream_errors(strata).get((model, error_type), 0.0) == before + 1
    [record] = [r for r in log_records(strata, "stream failed after it started") if r.get("request_id") == request_id]
    assert record["level"] == "warning"
    assert record["error_type"] == error_type
    assert record["chunks_relayed"] == len(relayed)
    assert record["deployment"] == error["deployment"] and str(mock_backend.port) in record["deployment"]


async def test_streams_open_when_the_shutdown_grace_ends_get_an_error_event(
    tmp_path: Path, mock_backend: MockBackend
) -> None:
    mock_backend.default = Reply(content=" ".join(["w"] * 300), chunk_delay_s=0.1)  # 30 s: longer than the grace
    config = {
        "models": [mock_model(mock_backend)],
        "server": {"health_interval_s": 0.5, "drain_delay_s": 0, "shutdown_grace_s": 1},
    }
    strata = StrataProcess(tmp_path, config, env={"MOCK_API_KEY": "mock-secret"}).start()
    request_id = f"grace-{uuid.uuid4().hex[:12]}"
    events: list[str] = []
    try:
        headers = {**strata.headers, "X-Request-ID": request_id}
        async with (
            httpx.AsyncClient(timeout=30, headers=headers) as client,
            client.stream("POST", f"{strata.base_url}/chat/completions", json=stream_body()) as response,
        ):
            assert response.status_code == 200
            try:
                async for line in response.aiter_lines():
                    if line.startswith("data: "):
                        events.append(line[6:])
                        if len(events) == 3:
                            strata.signal(signal.SIGTERM)
            except httpx.RemoteProtocolError:
                pass  # the connection was dropped mid-body: what the assertions below rule out
        assert strata.process is not None and strata.process.wait(30) == 0
    finally:
        strata.stop()

    assert "[DONE]" not in events
    error = json.loads(events[-1])["error"]
    assert (error["code"], error["type"]) == ("server_shutting_down", "server_error")
    logs = strata.logs()
    assert "Traceback" not in logs and "Exception in ASGI application" not in logs
    [record] = [r for r in log_records(strata, "stream failed after it started") if r.get("request_id") == request_id]
    assert record["error_type"] == "server_shutting_down"
    assert record["chunks_relayed"] == len(events) - 1
