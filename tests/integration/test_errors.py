"""Every failure a client can meet: OpenAI's error shape, the right status, and what failed where."""

from __future__ import annotations

import time
from typing import Any

import httpx
import openai
import pytest

from tests.support.mock_backend import MockBackend, Reply
from tests.support.strata_process import StrataProcess

USER = [{"role": "user", "content": "hi"}]


def post(strata: StrataProcess, body: Any, **kwargs: Any) -> httpx.Response:
    kwargs = {"headers": strata.headers, **kwargs}
    if isinstance(body, bytes | str):
        return httpx.post(strata.base_url + "/chat/completions", content=body, timeout=15, **kwargs)
    return httpx.post(strata.base_url + "/chat/completions", json=body, timeout=15, **kwargs)


def error_of(response: httpx.Response) -> dict[str, Any]:
    error = response.json()["error"]
    assert set(error) >= {"type", "code", "message", "param", "request_id"}
    assert error["request_id"] == response.headers["x-request-id"]
    return error


def test_unknown_model_is_404_naming_the_models(strata: StrataProcess) -> None:
    response = post(strata, {"model": "gpt-17", "messages": USER})
    assert response.status_code == 404
    error = error_of(response)
    assert (error["code"], error["param"]) == ("model_not_found", "model")
    assert "'gpt-17' does not exist" in error["message"] and "mock-model" in error["message"]


def test_openai_client_sees_unknown_model_as_not_found(strata: StrataProcess) -> None:
    client = openai.OpenAI(base_url=strata.base_url, api_key=strata.api_key, max_retries=0)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=USER)


@pytest.mark.parametrize(
    ("body", "param", "fragment"),
    [
        (b"{not json", None, "not valid JSON"),
        (b"", None, "body is empty"),
        (b"[1, 2]", None, "must be a JSON object"),
        ({"messages": USER}, "model", "required field is missing"),
        ({"model": "mock-model"}, "messages", "required field is missing"),
        ({"model": "mock-model", "messages": []}, "messages", "at least 1 item"),
        ({"model": "mock-model", "messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role", "'user'"),
        ({"model": "mock-model", "messages": [{"role": "tool", "content": "x"}]}, "messages[0]", "tool_call_id"),
        ({"model": "mock-model", "messages": USER, "temperature": 5}, "temperature", "less than or equal to 2"),
        ({"model": "mock-model", "messages": USER, "max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
        ({"model": "mock-model", "messages": USER, "stream": "yes please"}, "stream", "valid boolean"),
        (
            {"model": "mock-model", "messages": USER, "tools": [{"type": "function", "function": {"name": "a b"}}]},
            "tools[0].function.name",
            "should match pattern",
        ),
        (
            {"model": "mock-model", "messages": USER, "tool_choice": {"type": "function", "function": {"name": "f"}}},
            "tool_choice",
            "not among 'tools'",
        ),
        (
            {"model": "mock-model", "messages": USER, "stream_options": {"include_usage": True}},
            "stream_options",
            "only allowed when 'stream' is true",
        ),
    ],
)
def test_invalid_bodies_are_400_with_the_offending_field(
    strata: StrataProcess, mock_backend: MockBackend, body: Any, param: str | None, fragment: str
) -> None:
    response = post(strata, body)
    assert response.status_code == 400, response.text
    error = error_of(response)
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert fragment in error["message"]
    assert mock_backend.chat_requests() == []  # nothing reached the backend


def test_backend_5xx_is_502_naming_the_deployment(strata: StrataProcess, mock_backend: MockBackend) -> None:
    mock_backend.script(*[Reply(status=500, error_message="CUDA out of memory")] * 3)
    response = post(strata, {"model": "mock-model", "messages": USER})
    assert response.status_code == 502
    error = error_of(response)
    assert "CUDA out of memory" in error["message"]
    assert error["deployment"].startswith("mock-model/127.0.0.1:")
    # Retried up to the model's max_attempts (3), each attempt named in the error.
    assert [a["deployment"] for a in error["attempts"]] == [error["deployment"]] * 3
    assert len(mock_backend.chat_requests()) == 3


def test_backend_overloaded_is_503_with_retry_after(strata: StrataProcess, mock_backend: MockBackend) -> None:
    mock_backend.script(Reply(status=503, error_message="queue full", retry_after="7"))
    response = post(strata, {"model": "mock-model", "messages": USER})
    assert response.status_code == 503
    assert response.headers["retry-after"] == "7"
    assert error_of(response)["code"] == "upstream_overloaded"


def test_backend_rate_limit_is_429_with_retry_after(strata: StrataProcess, mock_backend: MockBackend) -> None:
    # A Retry-After longer than the retry policy's cap is not waited out: the client gets it.
    mock_backend.script(Reply(status=429, error_message="slow down", retry_after="30"))
    response = post(strata, {"model": "mock-model", "messages": USER})
    assert (response.status_code, response.headers["retry-after"]) == (429, "30")
    assert len(mock_backend.chat_requests()) == 1


def test_backend_400_is_passed_on_with_its_message_and_param(strata: StrataProcess, mock_backend: MockBackend) -> None:
    mock_backend.script(Reply(status=400, error_message="max_tokens exceeds context", error_param="max_tokens"))
    # Within Strata's own max_tokens limit (limits.max_tokens), so the request reaches the backend, which refuses it.
    response = post(strata, {"model": "mock-model", "messages": USER, "max_tokens": 100_000})
    assert response.status_code == 400
    error = error_of(response)
    assert (error["message"], error["param"]) == ("max_tokens exceeds context", "max_tokens")


def test_unreachable_backend_is_502(strata: StrataProcess) -> None:
    response = post(strata, {"model": "nowhere", "messages": USER})
    assert response.status_code == 502
    error = error_of(response)
    assert error["code"] == "upstream_unavailable"
    assert "127.0.0.1:9" in error["message"]


def test_connection_reset_before_headers_is_502(strata: StrataProcess, mock_backend: MockBackend) -> None:
    mock_backend.script(*[Reply(reset="before_headers")] * 3)
    response = post(strata, {"model": "mock-model", "messages": USER})
    assert response.status_code == 502
    assert error_of(response)["code"] == "upstream_unavailable"


def test_hanging_backend_is_504(strata: StrataProcess, mock_backend: MockBackend) -> None:
    mock_backend.script(*[Reply(hang=True)] * 3)
    response = post(strata, {"model": "mock-fast-timeout", "messages": USER})  # the client waits 15s at most
    assert response.status_code == 504
    error = error_of(response)
    assert error["code"] == "upstream_timeout"
    assert "first byte 1s" in error["message"]  # the model's own read timeout, not the default


def test_stream_that_breaks_midway_ends_with_an_error_event(strata: StrataProcess, mock_backend: MockBackend) -> None:
    mock_backend.script(Reply(content="one two three four five six", reset="mid_stream"))
    client = openai.OpenAI(base_url=strata.base_url, api_key=strata.api_key, max_retries=0)
    received = []
    with pytest.raises(openai.APIError, match="stream"):
        for chunk in client.chat.completions.create(model="mock-model", messages=USER, stream=True):
            received.append(chunk)
    assert received, "the chunks before the break were delivered"


def test_stream_cut_without_done_is_reported(strata: StrataProcess, mock_backend: MockBackend) -> None:
    mock_backend.script(Reply(content="a b c d e f", stop_after_chunks=3))
    body = {"model": "mock-model", "messages": USER, "stream": True}
    with httpx.stream(
        "POST", strata.base_url + "/chat/completions", json=body, headers=strata.headers, timeout=10
    ) as response:
        raw = b"".join(response.iter_bytes())
    assert b"[DONE]" not in raw
    assert b'"code":"upstream_unavailable"' in raw
    assert b"before it was complete" in raw


def test_stream_error_before_first_byte_keeps_its_status(strata: StrataProcess, mock_backend: MockBackend) -> None:
    mock_backend.script(*[Reply(status=500)] * 3)
    response = post(strata, {"model": "mock-model", "messages": USER, "stream": True})
    assert response.status_code == 502
    assert response.headers["content-type"].startswith("application/json")


def test_client_disconnect_cancels_the_upstream_stream(strata: StrataProcess, mock_backend: MockBackend) -> None:
    mock_backend.script(Reply(content=" ".join(["tok"] * 200), chunk_delay_s=0.05))
    body = {"model": "mock-model", "messages": USER, "stream": True}
    with httpx.stream(
        "POST", strata.base_url + "/chat/completions", json=body, headers=strata.headers, timeout=10
    ) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
    # The client went away after the first event; the backend must see its stream abandoned soon.
    deadline = time.monotonic() + 5
    while mock_backend.disconnects == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert mock_backend.disconnects == 1
    assert mock_backend.completed_streams == 0


def test_unknown_route_uses_the_error_shape(strata: StrataProcess) -> None:
    response = httpx.get(strata.url + "/v1/nothing-here", headers=strata.headers)
    assert response.status_code == 404
    assert error_of(response)["code"] == "not_found"


def test_client_disconnect_cancels_a_plain_request_upstream(strata: StrataProcess, mock_backend: MockBackend) -> None:
    mock_backend.script(Reply(latency_s=1.5))
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            strata.base_url + "/chat/completions",
            json={"model": "mock-model", "messages": USER},
            headers=strata.headers,
            timeout=0.3,
        )
    deadline = time.monotonic() + 5
    while mock_backend.disconnects == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert mock_backend.disconnects == 1, "the backend request was abandoned along with the client"
