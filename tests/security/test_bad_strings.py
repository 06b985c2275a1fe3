"""Strings no database can store, sent to a real `strata serve` on SQLite and on PostgreSQL: a NUL character or a
lone surrogate in the model, a message, a run's input, session metadata, a path or query parameter, a header, and
a WebSocket message. Each is refused with 400 (or the WebSocket's error event) naming the field; afterwards usage
still counts the next good request, its trace is still written, and shutdown is prompt. (A NUL in a header,
X-Request-ID or X-Strata-Tag, never gets that far: the HTTP parser answers 400.) A WebSocket message has
the same size bound as a REST body (`limits.max_body_bytes`)."""

from __future__ import annotations

import base64
import contextlib
import json
import re
import secrets
import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from websockets.exceptions import ConnectionClosedError, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from tests.conftest import mock_model
from tests.support.databases import postgres_database
from tests.support.mock_backend import MockBackend
from tests.support.strata_process import StrataProcess

MAX_BODY = 1 << 20  # limits.max_body_bytes, for REST bodies and WebSocket messages alike
NUL = "\u0000"
LONE = "\udfff"  # a low surrogate with no high one before it
CHAT = {"model": "mock-model", "messages": [{"role": "user", "content": "hello"}]}


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def strata(
    request: pytest.FixtureRequest, mock_backend: MockBackend, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[StrataProcess]:
    config: dict[str, Any] = {
        "models": [mock_model(mock_backend)],  # with no agents configured, the demo agent runs on it
        "server": {"drain_delay_s": 0, "shutdown_grace_s": 5},
        "limits": {"max_body_bytes": MAX_BODY},
        "cost": {"usage_flush_interval_s": 0.2},
    }
    workdir = tmp_path_factory.mktemp(f"strings-{request.param}")
    env = {"MOCK_API_KEY": "mock-secret"}
    with postgres_database() if request.param == "postgresql" else contextlib.nullcontext() as database_url:
        if database_url:
            config["database_url"] = database_url
            env["STRATA_ENCRYPTION_KEY"] = base64.b64encode(secrets.token_bytes(32)).decode()
        process = StrataProcess(workdir, config, env=env).start()
        try:
            yield process
        finally:
            started = time.monotonic()
            code = process.stop(timeout_s=20)  # killed past it: a writer stuck on a bad row holds shutdown up
            assert code == 0, f"shutdown was not clean ({code}) after {time.monotonic() - started:.1f} s"
        assert '"unhandled error"' not in process.logs()


def post_raw(strata: StrataProcess, path: str, document: Any) -> httpx.Response:
    """JSON as Python writes it (`\\u` escapes): httpx would refuse to encode a lone surrogate."""
    body = json.dumps(document).encode()
    headers = {**strata.headers, "Content-Type": "application/json"}
    return httpx.post(strata.url + path, content=body, headers=headers, timeout=30)


def assert_refused(response: httpx.Response, param: str | None) -> None:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["code"], error["param"]) == ("unstorable_value", param), error
    assert error["message"].startswith(f"{param}: contains "), error
    assert error["request_id"] == response.headers["x-request-id"]


@pytest.mark.parametrize("bad", [NUL, LONE], ids=["nul", "lone-surrogate"])
def test_chat_completions_refuse_the_model_and_the_content(strata: StrataProcess, bad: str) -> None:
    assert_refused(post_raw(strata, "/v1/chat/completions", {**CHAT, "model": f"m1{bad}"}), "model")
    content = {**CHAT, "messages": [{"role": "user", "content": f"hi {bad} there"}]}
    assert_refused(post_raw(strata, "/v1/chat/completions", content), "messages[0].content")
    parts = {**CHAT, "messages": [{"role": "user", "content": [{"type": "text", "text": bad}]}]}
    assert_refused(post_raw(strata, "/v1/chat/completions", parts), "messages[0].content[0].text")


@pytest.mark.parametrize("bad", [NUL, LONE], ids=["nul", "lone-surrogate"])
def test_runs_sessions_and_parameters_refuse_them(strata: StrataProcess, bad: str) -> None:
    assert_refused(post_raw(strata, "/v1/agents/demo/runs", {"input": f"do {bad}"}), "input")
    message = {"input": {"role": "user", "content": bad}}
    assert_refused(post_raw(strata, "/v1/agents/demo/runs", message), "input.content")
    assert_refused(post_raw(strata, "/v1/sessions", {"agent": "demo", "metadata": {"note": bad}}), "metadata.note")
    escaped = "%00" if bad == NUL else "%ED%BF%BF"  # the surrogate's UTF-8 bytes: not valid UTF-8
    with strata.client(timeout=30) as client:
        if bad == NUL:  # percent-decoding a URL never yields a surrogate (invalid bytes become U+FFFD)
            assert_refused(client.get(f"/v1/runs/run{escaped}x"), "run_id")
            assert_refused(client.get(f"/v1/usage?group_by=model&kind={escaped}"), "kind")
            assert_refused(client.post(f"/v1/agents/demo{escaped}/runs", json={"input": "hi"}), "agent")
        else:
            assert client.get(f"/v1/runs/run{escaped}x").status_code == 404


def raw_request(strata: StrataProcess, head: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", strata.port), timeout=10) as sock:
        sock.sendall(head)
        answer = b""
        while b"\r\n\r\n" not in answer and (chunk := sock.recv(4096)):
            answer += chunk
        return answer


def nul_in_header(strata: StrataProcess, header: str) -> bytes:
    """A chat completion with a NUL in one header (httpx refuses to send one): the status line of the answer."""
    body = json.dumps(CHAT).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: strata\r\nAuthorization: Bearer {strata.api_key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n{header}: a\0b\r\n\r\n"
    ).encode()
    return raw_request(strata, head + body).split(b"\r\n", 1)[0]


def socket_to(strata: StrataProcess, path: str = "/v1/agents/demo/ws") -> ClientConnection:
    url = strata.url.replace("http://", "ws://") + path
    return connect(url, additional_headers=strata.headers, max_size=None, open_timeout=10)


@pytest.mark.parametrize("bad", [NUL, LONE], ids=["nul", "lone-surrogate"])
def test_the_websocket_names_the_field_and_stays_open(strata: StrataProcess, bad: str) -> None:
    with socket_to(strata) as ws:
        for message, param in (
            ({"type": "message", "input": f"do {bad}"}, "input"),
            ({"type": "message", "input": "hi", "session_id": bad}, "session_id"),
        ):
            ws.send(json.dumps(message))
            event = json.loads(ws.recv(timeout=10))
            assert (event["type"], event["code"], event["param"]) == ("error", "unstorable_value", param), event
        ws.send(json.dumps({"type": "nothing"}))  # the socket is still served
        assert json.loads(ws.recv(timeout=10))["type"] == "error"
    with pytest.raises(InvalidStatus) as refused:  # a bad path parameter refuses the handshake
        socket_to(strata, "/v1/agents/demo%00/ws").close()
    assert refused.value.response.status_code == 403


def test_a_websocket_message_has_the_bound_of_a_rest_body(strata: StrataProcess) -> None:
    over = {"model": "mock-model", "messages": [{"role": "user", "content": "x" * (MAX_BODY + 1000)}]}
    with strata.client(timeout=30) as client:
        assert client.post("/v1/chat/completions", json=over).status_code == 413
    with socket_to(strata) as ws:
        ws.send(json.dumps({"type": "nothing", "pad": "x" * (MAX_BODY - 1000)}))  # under the bound: served
        assert json.loads(ws.recv(timeout=10))["type"] == "error"
        ws.send(json.dumps({"type": "message", "input": "x" * (MAX_BODY + 1000)}))
        with pytest.raises(ConnectionClosedError) as closed:
            ws.recv(timeout=10)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009  # message too big


def requests_counted(client: httpx.Client) -> int:
    total = client.get("/v1/usage").json()["total"]
    return int(total["requests"]) if total else 0


def test_after_the_attack_usage_and_traces_are_still_written(strata: StrataProcess) -> None:
    for bad in (NUL, LONE):  # whatever the edge let through would reach the writers now
        post_raw(strata, "/v1/chat/completions", {**CHAT, "model": f"m1{bad}"})
        post_raw(strata, "/v1/agents/demo/runs", {"input": bad})
    for header in ("X-Request-ID", "X-Strata-Tag"):  # both end up in the usage row and the span
        assert nul_in_header(strata, header).startswith(b"HTTP/1.1 400 "), "the HTTP parser refuses a NUL"
    with strata.client(timeout=30) as client:
        before = requests_counted(client)
        good = client.post("/v1/chat/completions", json=CHAT)
        assert good.status_code == 200, good.text
        deadline = time.monotonic() + 15
        while requests_counted(client) < before + 1 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert requests_counted(client) == before + 1, "usage stopped counting"

        trace_id = good.headers["traceparent"].split("-")[1]
        spans: list[dict[str, Any]] = []
        while time.monotonic() < deadline + 15:
            spans = client.get(f"/v1/traces/{trace_id}").json().get("spans") or []
            if spans:
                break
            time.sleep(0.2)
        assert spans, "the trace store stopped"
        metrics = client.get("/metrics").text
    # The edge refused every bad string: no writer had a row to set aside.
    assert re.findall(r'^strata_rows_rejected_total\{writer="(\w+)"\} 0\.0$', metrics, re.MULTILINE) == [
        "audit",
        "spans",
        "usage",
    ]
