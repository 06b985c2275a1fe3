"""Tracing end to end: a real `strata serve` exports OTLP/HTTP (protobuf) to a receiver inside this test,
which decodes every `ExportTraceServiceRequest`; the tests check span names, parent/child structure and the
GenAI attributes of requests, agent runs, model calls and tool calls, the W3C `traceparent` going in and
out, span events for retries, content capture, the local trace store and log correlation."""

from __future__ import annotations

import contextlib
import json
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span as SpanProto

from strata.agents.tools.base import ToolContext
from strata.agents.tools.http_fetch import HttpFetchTool
from strata.agents.tools.mcp_tools import McpServerConnection
from strata.api.permissions import ROUTE_PERMISSIONS
from strata.config import HttpFetchConfig, McpServerConfig, TracingConfig
from strata.observability.tracing import Tracing, traceparent
from tests.conftest import mock_model
from tests.support.mock_backend import MockBackend, Reply, ToolCallSpec
from tests.support.strata_process import StrataProcess

CLIENT_TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN_ID = "00f067aa0ba902b7"


# -- an OTLP/HTTP receiver ------------------------------------------------------------------------------


@dataclass
class ReceivedSpan:
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str | None
    kind: str
    attributes: dict[str, Any]
    events: list[tuple[str, dict[str, Any]]]
    status: str
    start_ns: int
    end_ns: int
    resource: dict[str, Any]


def _value(value: AnyValue) -> Any:
    which = value.WhichOneof("value")
    if which == "array_value":
        return [_value(v) for v in value.array_value.values]
    if which == "kvlist_value":
        return {kv.key: _value(kv.value) for kv in value.kvlist_value.values}
    return getattr(value, which) if which else None


def _attributes(pairs: Any) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in pairs}


@dataclass
class OtlpReceiver:
    """Accepts `POST /v1/traces` (application/x-protobuf) and keeps every span it decodes."""

    spans: list[ReceivedSpan] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1/traces"

    def start(self) -> OtlpReceiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                request = ExportTraceServiceRequest()
                request.ParseFromString(body)
                receiver.add(request, dict(self.headers))
                reply = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()

    def add(self, request: ExportTraceServiceRequest, headers: dict[str, str]) -> None:
        decoded = []
        for resource_spans in request.resource_spans:
            resource = _attributes(resource_spans.resource.attributes)
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    decoded.append(
                        ReceivedSpan(
                            name=span.name,
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_span_id=span.parent_span_id.hex() or None,
                            kind=SpanProto.SpanKind.Name(span.kind).removeprefix("SPAN_KIND_").lower(),
                            attributes=_attributes(span.attributes),
                            events=[(e.name, _attributes(e.attributes)) for e in span.events],
                            status=span.status.StatusCode.Name(span.status.code).removeprefix("STATUS_CODE_").lower(),
                            start_ns=span.start_time_unix_nano,
                            end_ns=span.end_time_unix_nano,
                            resource=resource,
                        )
                    )
        with self.lock:
            self.spans.extend(decoded)
            self.headers.append({k.lower(): v for k, v in headers.items()})

    def wait_for(self, predicate: Callable[[list[ReceivedSpan]], bool], timeout_s: float = 15.0) -> list[ReceivedSpan]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self.lock:
                spans = list(self.spans)
            if predicate(spans):
                return spans
            time.sleep(0.05)
        raise AssertionError(f"the receiver never got the spans expected; it has: {[s.name for s in spans]}")

    def trace(self, trace_id: str, until: Callable[[list[ReceivedSpan]], bool]) -> list[ReceivedSpan]:
        spans = self.wait_for(lambda all_spans: until([s for s in all_spans if s.trace_id == trace_id]))
        return [s for s in spans if s.trace_id == trace_id]


# -- servers ----------------------------------------------------------------------------------------------


def agent(name: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "model": "mock-model", "system_prompt": "You are a test agent.", **extra}


def server_config(mock: MockBackend, tracing: dict[str, Any]) -> dict[str, Any]:
    return {
        "models": [mock_model(mock)],
        "agents": [agent("helper", tools=["calculator"])],
        "tracing": tracing,
        "runs": {"poll_s": 0.1},
        "server": {"drain_delay_s": 0, "shutdown_grace_s": 5},
    }


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    receiver = OtlpReceiver().start()
    yield receiver
    receiver.stop()


@contextlib.contextmanager
def serving(workdir: Path, config: dict[str, Any]) -> Iterator[StrataProcess]:
    # OTEL_BSP_SCHEDULE_DELAY: the batch processor exports every 100 ms instead of every 5 s.
    env = {"MOCK_API_KEY": "mock-secret", "OTEL_BSP_SCHEDULE_DELAY": "100"}
    process = StrataProcess(workdir, config, env=env).start()
    yield process
    assert process.stop() == 0
    assert '"unhandled error"' not in process.logs()


@pytest.fixture(scope="module")
def strata(
    mock_backend: MockBackend, receiver: OtlpReceiver, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[StrataProcess]:
    tracing = {"otlp_endpoint": receiver.url, "otlp_headers": {"x-collector-key": "collector-secret"}}
    with serving(tmp_path_factory.mktemp("tracing"), server_config(mock_backend, tracing)) as process:
        yield process


def calc(expression: str) -> Reply:
    return Reply(tool_calls=[ToolCallSpec("calculator", {"expression": expression}, id="call_calc")])


def traceparent_of(response: httpx.Response) -> tuple[str, str]:
    version, trace_id, span_id, flags = response.headers["traceparent"].split("-")
    assert version == "00" and int(flags, 16) & 1  # sampled (0x02, a random trace id, may be set too)
    return trace_id, span_id


def by_name(spans: list[ReceivedSpan], name: str) -> list[ReceivedSpan]:
    return sorted((s for s in spans if s.name == name), key=lambda s: s.start_ns)


def wait_run(strata: StrataProcess, run_id: str, timeout_s: float = 15.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        run = httpx.get(f"{strata.url}/v1/runs/{run_id}", headers=strata.headers).json()
        if run["status"] in ("completed", "failed", "cancelled"):
            return run
        time.sleep(0.05)
    raise AssertionError(f"run {run_id} did not finish: {run}")


# -- tests ------------------------------------------------------------------------------------------------


def test_span_tree_of_an_agent_run_with_a_tool_call(
    strata: StrataProcess, mock_backend: MockBackend, receiver: OtlpReceiver
) -> None:
    mock_backend.script(calc("6*7"), Reply(content="It is 42."))
    client_parent = f"00-{CLIENT_TRACE_ID}-{CLIENT_SPAN_ID}-01"
    response = httpx.post(
        f"{strata.url}/v1/agents/helper/runs",
        json={"input": "What is 6 times 7?", "mode": "background"},  # runs after the request's span has ended
        headers={**strata.headers, "traceparent": client_parent},
        timeout=30,
    )
    assert response.status_code == 202, response.text
    run_id, session_id = response.json()["id"], response.json()["session_id"]
    trace_id, server_span_id = traceparent_of(response)
    assert trace_id == CLIENT_TRACE_ID  # the client's trace, honoured
    assert wait_run(strata, run_id)["status"] == "completed"

    spans = receiver.trace(CLIENT_TRACE_ID, lambda s: len(by_name(s, "invoke_agent helper")) == 1)
    (server,) = by_name(spans, "POST /v1/agents/{agent}/runs")
    assert (server.span_id, server.parent_span_id, server.kind) == (server_span_id, CLIENT_SPAN_ID, "server")
    assert server.attributes["http.request.method"] == "POST"
    assert server.attributes["http.route"] == "/v1/agents/{agent}/runs"
    assert server.attributes["http.response.status_code"] == 202
    assert server.resource["service.name"] == "strata"
    assert server.resource["openinference.project.name"] == "strata"  # Phoenix's project: not its "default"

    (run_span,) = by_name(spans, "invoke_agent helper")
    assert run_span.parent_span_id == server.span_id  # joined through the traceparent stored with the run
    assert run_span.kind == "internal"
    attributes = run_span.attributes
    assert attributes["gen_ai.operation.name"] == "invoke_agent"
    assert attributes["gen_ai.agent.name"] == "helper"
    assert attributes["gen_ai.conversation.id"] == session_id
    assert attributes["gen_ai.request.model"] == "mock-model"
    assert attributes["gen_ai.provider.name"] == "openai"
    assert attributes["strata.run.id"] == run_id
    assert attributes["strata.run.status"] == "completed"
    assert attributes["gen_ai.usage.input_tokens"] > 0 and attributes["gen_ai.usage.output_tokens"] > 0
    assert run_span.status != "error"

    chats = by_name(spans, "chat mock-model")
    (tool,) = by_name(spans, "execute_tool calculator")
    assert len(chats) == 2
    assert {s.parent_span_id for s in [*chats, tool]} == {run_span.span_id}
    assert chats[0].end_ns <= tool.start_ns and tool.end_ns <= chats[1].start_ns  # model, tool, model
    for chat, reason in zip(chats, ["tool_calls", "stop"], strict=True):
        assert chat.kind == "client"
        assert chat.attributes["gen_ai.operation.name"] == "chat"
        assert chat.attributes["gen_ai.request.model"] == "mock-model"
        assert chat.attributes["gen_ai.provider.name"] == "openai"
        assert chat.attributes["gen_ai.response.finish_reasons"] == [reason]
        assert chat.attributes["gen_ai.usage.input_tokens"] == 11
        assert chat.attributes["gen_ai.usage.output_tokens"] > 0
        assert chat.attributes["gen_ai.conversation.id"] == session_id
        assert chat.attributes["strata.run.id"] == run_id
    assert tool.attributes["gen_ai.operation.name"] == "execute_tool"
    assert tool.attributes["gen_ai.tool.name"] == "calculator"
    assert tool.attributes["gen_ai.tool.call.id"] == "call_calc"
    assert tool.attributes["gen_ai.tool.type"] == "function"

    # Content is off by default: no prompt, answer or tool argument anywhere.
    content_keys = {"gen_ai.input.messages", "gen_ai.output.messages", "gen_ai.system_instructions"}
    content_keys |= {"gen_ai.tool.call.arguments", "gen_ai.tool.call.result"}
    for span in spans:
        assert not content_keys & set(span.attributes)
        assert "6*7" not in json.dumps(span.attributes)

    # Each model call went to the backend with its own span as the parent.
    sent = [r.headers.get("Traceparent") or r.headers.get("traceparent") for r in mock_backend.chat_requests()]
    assert sent == [f"00-{CLIENT_TRACE_ID}-{chat.span_id}-01" for chat in chats]
    # The exporter sent the configured headers.
    assert receiver.headers[-1]["x-collector-key"] == "collector-secret"


def test_a_retry_is_an_event_of_the_chat_span(
    strata: StrataProcess, mock_backend: MockBackend, receiver: OtlpReceiver
) -> None:
    mock_backend.script(Reply(status=503, error_message="warming up"), Reply(content="Hello after a retry."))
    response = httpx.post(
        f"{strata.base_url}/chat/completions",
        json={"model": "mock-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8},
        headers=strata.headers,
        timeout=30,
    )
    assert response.status_code == 200, response.text
    trace_id, server_span_id = traceparent_of(response)
    spans = receiver.trace(trace_id, lambda s: bool(by_name(s, "POST /v1/chat/completions")))
    (server,) = by_name(spans, "POST /v1/chat/completions")
    (chat,) = by_name(spans, "chat mock-model")
    assert server.parent_span_id is None and server.span_id == server_span_id
    assert chat.parent_span_id == server.span_id
    assert chat.attributes["gen_ai.request.max_tokens"] == 8
    assert chat.attributes["gen_ai.response.finish_reasons"] == ["stop"]
    assert chat.attributes["strata.deployment"].startswith("mock-model/")
    retries = [attrs for name, attrs in chat.events if name == "strata.retry"]
    assert len(retries) == 1
    assert retries[0]["attempt"] == 1 and retries[0]["error.type"] == "503"
    assert chat.status != "error"  # the call succeeded in the end
    assert mock_backend.chat_requests()[0].headers["traceparent"].split("-")[1] == trace_id


def test_a_refused_request_is_traced(strata: StrataProcess, receiver: OtlpReceiver) -> None:
    response = httpx.post(f"{strata.base_url}/chat/completions", json={}, headers={"Authorization": "Bearer nope"})
    assert response.status_code == 401
    trace_id, _ = traceparent_of(response)
    (server,) = receiver.trace(trace_id, lambda s: len(s) == 1)
    assert server.name == "POST /v1/chat/completions"  # the route's template, though auth refused before routing
    assert server.attributes["http.response.status_code"] == 401
    assert server.status != "error"  # a client error is no server failure


def test_a_failed_backend_call_marks_the_span(
    strata: StrataProcess, mock_backend: MockBackend, receiver: OtlpReceiver
) -> None:
    mock_backend.script(Reply(status=400, error_message="bad request", error_param="messages"))
    response = httpx.post(
        f"{strata.base_url}/chat/completions",
        json={"model": "mock-model", "messages": [{"role": "user", "content": "hi"}]},
        headers=strata.headers,
        timeout=30,
    )
    assert response.status_code == 400
    trace_id, _ = traceparent_of(response)
    spans = receiver.trace(trace_id, lambda s: bool(by_name(s, "POST /v1/chat/completions")))
    (chat,) = by_name(spans, "chat mock-model")
    assert chat.status == "error" and chat.attributes["error.type"] == "400"


def test_a_streamed_completion_records_its_usage(
    strata: StrataProcess, mock_backend: MockBackend, receiver: OtlpReceiver
) -> None:
    mock_backend.script(Reply(content="one two three", finish_reason="length"))
    with httpx.stream(
        "POST",
        f"{strata.base_url}/chat/completions",
        json={"model": "mock-model", "messages": [{"role": "user", "content": "count"}], "stream": True},
        headers=strata.headers,
        timeout=30,
    ) as response:
        assert response.status_code == 200
        trace_id, _ = traceparent_of(response)
        body = response.read()
    assert body.endswith(b"data: [DONE]\n\n")
    spans = receiver.trace(trace_id, lambda s: bool(by_name(s, "POST /v1/chat/completions")))
    (chat,) = by_name(spans, "chat mock-model")
    assert chat.attributes["gen_ai.usage.input_tokens"] == 11
    assert chat.attributes["gen_ai.usage.output_tokens"] == 3
    assert chat.attributes["gen_ai.response.finish_reasons"] == ["length"]  # as the stream's last chunk said
    assert chat.status != "error"


def test_log_lines_of_a_request_share_its_ids(strata: StrataProcess, mock_backend: MockBackend) -> None:
    # Two failed attempts: the dispatcher logs a "retrying" line for each.
    mock_backend.script(Reply(status=503), Reply(status=503), Reply(content="third time lucky"))
    request_id = f"log-correlation-{uuid.uuid4().hex[:8]}"
    response = httpx.post(
        f"{strata.base_url}/chat/completions",
        json={"model": "mock-model", "messages": [{"role": "user", "content": "hi"}]},
        headers={**strata.headers, "X-Request-ID": request_id},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    trace_id, server_span_id = traceparent_of(response)
    lines = []
    for raw in strata.logs().splitlines():
        try:
            line = json.loads(raw)
        except ValueError:
            continue
        if line.get("request_id") == request_id:
            lines.append(line)
    assert len(lines) >= 2, strata.logs()[-3000:]
    for line in lines:
        assert line["trace_id"] == trace_id
        assert len(line["span_id"]) == 16
        assert line["model"] == "mock-model"
    # Lines logged inside the model call carry the chat span's id, not the request's.
    retrying = [line for line in lines if line["event"] == "retrying"]
    assert len(retrying) == 2 and all(line["span_id"] != server_span_id for line in retrying)


def test_content_is_captured_when_enabled(mock_backend: MockBackend, receiver: OtlpReceiver, tmp_path: Path) -> None:
    tracing = {
        "otlp_endpoint": receiver.url,
        "capture_content": True,
        "service_name": "strata-eu",
        "project": "support-bot",
        "environment": "staging",
        "resource_attributes": {"service.namespace": "acme"},
    }
    with serving(tmp_path, server_config(mock_backend, tracing)) as strata:
        mock_backend.script(calc("2+3"), Reply(content="It is five."))
        response = httpx.post(
            f"{strata.url}/v1/agents/helper/runs",
            json={"input": "What is two plus three?"},
            headers=strata.headers,
            timeout=30,
        )
        assert response.status_code == 200, response.text
        trace_id, _ = traceparent_of(response)
        spans = receiver.trace(trace_id, lambda s: bool(by_name(s, "invoke_agent helper")))
        first, second = by_name(spans, "chat mock-model")
        (tool,) = by_name(spans, "execute_tool calculator")
        # Grouped as configured: the service, Phoenix's project, the environment Langfuse and others filter by.
        grouping = {
            "service.name": "strata-eu",
            "openinference.project.name": "support-bot",
            "deployment.environment.name": "staging",
            "deployment.environment": "staging",
            "service.namespace": "acme",
        }
        assert {k: first.resource.get(k) for k in grouping} == grouping
        messages = json.loads(first.attributes["gen_ai.input.messages"])
        assert messages == [{"role": "user", "parts": [{"type": "text", "content": "What is two plus three?"}]}]
        instructions = json.loads(first.attributes["gen_ai.system_instructions"])
        assert instructions == [{"type": "text", "content": "You are a test agent."}]
        (call,) = json.loads(first.attributes["gen_ai.output.messages"])[0]["parts"]
        assert (call["type"], call["name"], call["arguments"]) == ("tool_call", "calculator", '{"expression":"2+3"}')
        assert json.loads(tool.attributes["gen_ai.tool.call.arguments"]) == {"expression": "2+3"}
        assert tool.attributes["gen_ai.tool.call.result"] == "5"
        (answer,) = json.loads(second.attributes["gen_ai.output.messages"])
        assert answer == {
            "role": "assistant",
            "parts": [{"type": "text", "content": "It is five."}],
            "finish_reason": "stop",
        }


@pytest.mark.skipif(
    ("GET", "/v1/runs/{run_id}/trace") not in ROUTE_PERMISSIONS,
    reason="the trace routes are not wired yet (api/permissions.py and app.py); remove this mark once they are",
)
def test_the_local_store_shows_a_run_trace_without_a_collector(mock_backend: MockBackend, tmp_path: Path) -> None:
    with serving(tmp_path, server_config(mock_backend, {})) as strata:  # the embedded default: no OTLP
        mock_backend.script(calc("6*7"), Reply(content="It is 42."))
        user_key = strata.create_key("user", name="tracer")
        other_key = strata.create_key("user", name="other")
        response = httpx.post(
            f"{strata.url}/v1/agents/helper/runs",
            json={"input": "What is 6 times 7?"},
            headers={"Authorization": f"Bearer {user_key}"},
            timeout=30,
        )
        assert response.status_code == 200, response.text
        run_id, session_id = response.json()["id"], response.json()["session_id"]
        trace_id, server_span_id = traceparent_of(response)

        def run_trace(key: str) -> httpx.Response:
            return httpx.get(f"{strata.url}/v1/runs/{run_id}/trace", headers={"Authorization": f"Bearer {key}"})

        deadline = time.monotonic() + 10
        while True:  # the invoke_agent span ends just after the run; the writer stores spans twice a second
            body = run_trace(user_key).json()
            if any(s["name"] == "invoke_agent helper" for s in body.get("spans", [])) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert body["trace_ids"] == [trace_id]
        spans = {s["span_id"]: s for s in body["spans"]}
        names = sorted(s["name"] for s in spans.values())
        assert names == ["chat mock-model", "chat mock-model", "execute_tool calculator", "invoke_agent helper"]
        (root,) = [s for s in spans.values() if s["name"] == "invoke_agent helper"]
        assert root["parent_span_id"] == server_span_id
        assert root["attributes"]["gen_ai.conversation.id"] == session_id
        assert all(s["parent_span_id"] == root["span_id"] for s in spans.values() if s is not root)
        assert all(s["trace_id"] == trace_id for s in spans.values())
        (chat, _) = [s for s in spans.values() if s["name"] == "chat mock-model"]
        assert chat["kind"] == "client" and chat["attributes"]["gen_ai.usage.input_tokens"] == 11
        assert chat["duration_ms"] >= 0 and chat["start_time"] <= chat["end_time"]

        assert run_trace(other_key).status_code == 404  # another user's run: as if it did not exist
        assert run_trace(strata.api_key).status_code == 200  # the admin may read every run

        def whole_trace(key: str) -> httpx.Response:
            return httpx.get(f"{strata.url}/v1/traces/{trace_id}", headers={"Authorization": f"Bearer {key}"})

        mine = whole_trace(user_key)
        assert mine.status_code == 200
        assert {s["span_id"] for s in mine.json()["spans"]} >= set(spans)
        assert whole_trace(other_key).status_code == 404
        everything = whole_trace(strata.api_key).json()["spans"]
        assert server_span_id in {s["span_id"] for s in everything}
        assert httpx.get(f"{strata.url}/v1/traces/not-a-trace", headers=strata.headers).status_code == 404


# -- propagation to tools ---------------------------------------------------------------------------------

MCP_META_SERVER = '''
import json, os, sys
from mcp.server.mcpserver import Context, MCPServer

server = MCPServer("meta", log_level="WARNING")


@server.tool()
def remember(ctx: Context) -> str:
    """Write the request's _meta to the file named on the command line."""
    with open(sys.argv[1], "w") as file:
        json.dump(dict(ctx.request_context.meta or {}), file, default=str)
    return "ok"


server.run("stdio")
'''


@pytest.fixture
def tracer() -> Tracing:
    return Tracing.from_config(TracingConfig(local_store=False))


async def test_http_fetch_passes_the_tool_span_on(tracer: Tracing) -> None:
    seen: list[dict[str, str]] = []

    async def hello(request: web.Request) -> web.Response:
        seen.append(dict(request.headers))
        return web.Response(text="hello")

    app = web.Application()
    app.router.add_get("/hello", hello)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    tool = HttpFetchTool(HttpFetchConfig(allow_networks=["127.0.0.1/32"]))
    context = ToolContext(run_id="run-1", idempotency_key="run-1:0:c", timeout_s=10)
    try:
        with tracer.span("execute_tool http_fetch") as span:
            await tool.invoke({"url": f"http://127.0.0.1:{port}/hello"}, context)
            mine = f"00-{CLIENT_TRACE_ID}-{CLIENT_SPAN_ID}-01"
            await tool.invoke({"url": f"http://127.0.0.1:{port}/hello", "headers": {"traceparent": mine}}, context)
    finally:
        await runner.cleanup()
    assert seen[0]["traceparent"] == traceparent(span)
    assert seen[1]["traceparent"] == mine  # the model's own header is left alone


async def test_mcp_calls_carry_the_trace_context_in_meta(tracer: Tracing, tmp_path: Path) -> None:
    script, record = tmp_path / "meta_server.py", tmp_path / "meta.json"
    script.write_text(MCP_META_SERVER)
    config = McpServerConfig(name="meta", transport="stdio", command=sys.executable, args=[str(script), str(record)])
    async with McpServerConnection(config) as connection:
        (tool,) = connection.tools()
        with tracer.span("execute_tool meta__remember") as span:
            result = await tool.invoke({}, ToolContext(run_id="r", idempotency_key="r:0:c", timeout_s=10))
    assert not result.is_error, result.content
    meta = json.loads(record.read_text())
    assert meta["traceparent"] == traceparent(span)  # SEP-414: W3C trace context in `_meta`
    assert meta["strata/idempotency-key"] == "r:0:c"
