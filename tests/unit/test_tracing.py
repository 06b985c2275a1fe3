"""Tracing in-process: the tracer set-up, trace context in and out, run scoping, the local trace store,
the request-span middleware, log correlation, and who may read which trace."""

from __future__ import annotations

import io
import json
import secrets
import sqlite3
from collections.abc import Iterator
from contextlib import redirect_stdout
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import structlog
from fastapi import FastAPI, Request
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from sqlalchemy import text
from starlette.testclient import TestClient
from starlette.types import ASGIApp, Receive, Scope, Send

from strata.agents.service import NotFound
from strata.api import trace_routes
from strata.api.auth import PRINCIPAL
from strata.api.errors import install_error_handlers
from strata.api.tracing_middleware import TracingMiddleware
from strata.config import LoggingConfig, TracingConfig
from strata.observability import tracing_genai as genai
from strata.observability.logging import configure_logging
from strata.observability.tracing import (
    INVALID_SPAN,
    Tracing,
    add_event,
    extract,
    inject,
    set_principal,
    traceparent,
    with_trace_headers,
)
from strata.observability.tracing_store import LocalSpanProcessor, SpanWriter, to_record
from strata.security.encryption import Keyring
from strata.security.principal import Principal
from strata.security.redaction import Redactor
from strata.store import spans as spans_store
from strata.store.database import Database
from strata.store.spans import SpanRecord, SpanStore

PARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@pytest.fixture
def memory() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def tracing(memory: InMemorySpanExporter) -> Iterator[Tracing]:
    tracing = Tracing.from_config(TracingConfig(local_store=False), exporters=[memory])
    yield tracing
    tracing._provider.shutdown()  # type: ignore[union-attr]


def finished(memory: InMemorySpanExporter, name: str) -> ReadableSpan:
    (span,) = [s for s in memory.get_finished_spans() if s.name == name]
    return span


def test_disabled_tracing_makes_nothing() -> None:
    tracing = Tracing.from_config(TracingConfig(enabled=False))
    assert not tracing.enabled and not tracing.capture_content
    with tracing.span("anything") as span:
        assert span is INVALID_SPAN
        assert traceparent() is None
        add_event("nothing happens")
    assert with_trace_headers({"X-Request-ID": "r"}, span) == {"X-Request-ID": "r"}


def test_a_client_traceparent_is_the_parent(tracing: Tracing, memory: InMemorySpanExporter) -> None:
    with tracing.span("child", kind=SpanKind.SERVER, parent=extract(PARENT, "vendor=1")) as span:
        headers = inject({})
        assert headers["traceparent"] == traceparent(span)
        assert headers["traceparent"].startswith("00-4bf92f3577b34da6a3ce929d0e0e4736-")
        assert headers["tracestate"] == "vendor=1"
    child = finished(memory, "child")
    assert child.parent is not None and child.parent.is_remote
    assert f"{child.parent.span_id:016x}" == "00f067aa0ba902b7"
    for bad in ("", "garbage", "00-00000000000000000000000000000000-00f067aa0ba902b7-01", "00-4bf92f35-01"):
        assert extract(bad) is None  # ignored, as the W3C spec asks: a new trace starts instead


def test_an_unsampled_parent_is_honoured(tracing: Tracing, memory: InMemorySpanExporter) -> None:
    with tracing.span("quiet", parent=extract(PARENT[:-2] + "00")) as span:
        assert not span.is_recording()
        assert traceparent(span) is not None and traceparent(span).endswith("-00")  # still propagated
    assert memory.get_finished_spans() == ()


def test_sampling_ratio_zero_records_no_new_trace(memory: InMemorySpanExporter) -> None:
    tracing = Tracing.from_config(TracingConfig(sample_ratio=0.0, local_store=False), exporters=[memory])
    with tracing.span("dropped") as span:
        assert not span.is_recording()
    with tracing.span("kept", parent=extract(PARENT)):  # a sampled caller still wins
        pass
    assert [s.name for s in memory.get_finished_spans()] == ["kept"]


def test_failures_and_cancellations_mark_the_span(tracing: Tracing, memory: InMemorySpanExporter) -> None:
    class Upstream(Exception):
        status = 503

    with pytest.raises(Upstream), tracing.span("failing"):
        raise Upstream("busy")
    span = finished(memory, "failing")
    assert span.attributes[genai.ERROR_TYPE] == "503"
    assert span.status.status_code.name == "ERROR" and span.status.description == "busy"


def test_spans_under_a_run_belong_to_it(tracing: Tracing, memory: InMemorySpanExporter) -> None:
    attributes = {genai.RUN_ID: "run_1", genai.OWNER: "alice", genai.CONVERSATION_ID: "sess_1"}
    with tracing.span("invoke_agent a", attributes=attributes), tracing.span("chat m"), tracing.span("deeper"):
        pass
    with tracing.span("unrelated"):
        pass
    for name in ("chat m", "deeper"):
        span = finished(memory, name)
        assert span.attributes[genai.RUN_ID] == "run_1" and span.attributes[genai.OWNER] == "alice"
        assert span.attributes[genai.CONVERSATION_ID] == "sess_1"
    assert genai.RUN_ID not in finished(memory, "unrelated").attributes


def test_set_principal_marks_the_request_span_and_later_spans(tracing: Tracing, memory: InMemorySpanExporter) -> None:
    structlog.contextvars.clear_contextvars()
    with tracing.span("POST /v1/chat/completions"):
        set_principal("bob", "key_1", "user")
        with tracing.span("chat m"):
            pass
    assert finished(memory, "POST /v1/chat/completions").attributes[genai.KEY_ID] == "key_1"
    assert finished(memory, "chat m").attributes[genai.OWNER] == "bob"
    assert structlog.contextvars.get_contextvars()["key_id"] == "key_1"
    structlog.contextvars.clear_contextvars()


def test_content_helpers_follow_the_conventions() -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"id": "c1", "function": {"name": "calc", "arguments": "{}"}}],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "4"},
    ]
    attributes = genai.input_messages(messages)
    assert json.loads(attributes[genai.SYSTEM_INSTRUCTIONS]) == [{"type": "text", "content": "Be brief."}]
    assert json.loads(attributes[genai.INPUT_MESSAGES]) == [
        {"role": "user", "parts": [{"type": "text", "content": "2+2?"}]},
        {"role": "assistant", "parts": [{"type": "tool_call", "id": "c1", "name": "calc", "arguments": "{}"}]},
        {"role": "tool", "parts": [{"type": "tool_call_response", "id": "c1", "response": "4"}]},
    ]
    assert genai.clip("x" * (genai.MAX_CONTENT_CHARS + 5)).endswith("[5 more characters]")
    assert genai.chat_request_attributes("m", {"max_tokens": 5, "temperature": 0, "top_p": True}) == {
        genai.OPERATION: "chat",
        genai.REQUEST_MODEL: "m",
        genai.REQUEST_MAX_TOKENS: 5,
        genai.REQUEST_TEMPERATURE: 0.0,
    }
    assert genai.provider_name("embedded") == "llama.cpp" and genai.provider_name("openai") == "openai"


# -- the local trace store --------------------------------------------------------------------------------


@pytest.fixture
async def db(tmp_path: Path) -> Any:
    database = Database(f"sqlite+aiosqlite:///{tmp_path}/strata.db")
    await database.upgrade()
    yield database
    await database.dispose()


async def test_finished_spans_reach_the_local_store(db: Database) -> None:
    tracing = Tracing.from_config(TracingConfig())
    await tracing.start(db)
    assert tracing.store is not None
    run = {genai.RUN_ID: "run_7", genai.OWNER: "alice"}
    with (
        tracing.span("POST /v1/agents/{agent}/runs", kind=SpanKind.SERVER, parent=extract(PARENT)),
        tracing.span("invoke_agent helper", attributes=run) as root,
    ):
        with tracing.span("chat m", kind=SpanKind.CLIENT) as chat:
            chat.add_event(genai.EVENT_RETRY, {"attempt": 1})
            chat.set_attribute(genai.FINISH_REASONS, ("stop",))
        with pytest.raises(ValueError), tracing.span("execute_tool calc"):
            raise ValueError("no")
    await tracing.flush()

    spans = await tracing.store.for_run("run_7")
    assert [s.name for s in spans] == ["invoke_agent helper", "chat m", "execute_tool calc"]
    by_name = {s.name: s for s in spans}
    root_record = by_name["invoke_agent helper"]
    assert root_record.span_id == f"{root.get_span_context().span_id:016x}"
    assert by_name["chat m"].parent_span_id == root_record.span_id
    assert by_name["chat m"].kind == "client" and by_name["chat m"].owner == "alice"
    assert by_name["chat m"].attributes[genai.FINISH_REASONS] == ["stop"]
    assert by_name["chat m"].events[0]["name"] == genai.EVENT_RETRY
    assert by_name["execute_tool calc"].status == "error" and by_name["execute_tool calc"].status_message == "no"
    whole = await tracing.store.trace("4bf92f3577b34da6a3ce929d0e0e4736")
    assert len(whole) == 4 and whole[0].name == "POST /v1/agents/{agent}/runs" and whole[0].run_id is None
    assert await tracing.store.run_traces("run_7") == ["4bf92f3577b34da6a3ce929d0e0e4736"]

    assert await tracing.store.prune(whole[-1].start_ns + 1) == 4
    assert await tracing.store.trace("4bf92f3577b34da6a3ce929d0e0e4736") == []
    await tracing.shutdown()


async def test_the_local_queue_is_bounded_and_the_writer_drains_it(db: Database) -> None:
    source = LocalSpanProcessor(max_queue=2)
    tracing = Tracing.from_config(TracingConfig(local_store=False), exporters=[])
    tracing._provider.add_span_processor(source)  # type: ignore[union-attr]
    for name in ("a", "b", "c"):
        with tracing.span(name):
            pass
    assert (len(source.queue), source.dropped) == (2, 1)
    writer = SpanWriter(source, SpanStore(db), retention_s=3600, interval_s=0.05)
    await writer.start()
    await writer.stop()
    assert writer.written == 2 and not source.queue
    await tracing.shutdown()


async def test_stored_attributes_are_encrypted_at_rest(tmp_path: Path) -> None:
    database = Database(f"sqlite+aiosqlite:///{tmp_path}/enc.db", keyring=Keyring.from_keys(secrets.token_bytes(32)))
    await database.upgrade()
    store = SpanStore(database)
    record = SpanRecord(
        "a" * 32, "b" * 16, None, "chat m", "client", 1, 2, status_message="failed on: prompt text",
        attributes={genai.INPUT_MESSAGES: "prompt text"}, events=[{"name": "e", "attributes": {"x": "prompt text"}}],
    )  # fmt: skip
    await store.append([record])
    with sqlite3.connect(tmp_path / "enc.db") as raw:
        row = raw.execute("select attributes, sealed, status_message from spans").fetchone()
    assert not any("prompt text" in column for column in row)
    assert (await store.trace("a" * 32))[0] == record
    await database.dispose()


async def test_spans_without_content_or_events_need_no_encryption(db: Database) -> None:
    store = SpanStore(db)
    await store.append([SpanRecord("d" * 32, "e" * 16, None, "chat m", "client", 1, 2, attributes={"a": 1})])
    async with db.sessions() as session:
        (sealed,) = (await session.execute(text("select sealed from spans"))).one()
    assert sealed in (None, "null")  # nothing sealed: no encryption
    assert {
        genai.INPUT_MESSAGES,
        genai.OUTPUT_MESSAGES,
        genai.SYSTEM_INSTRUCTIONS,
        genai.TOOL_ARGUMENTS,
        genai.TOOL_RESULT,
    } == spans_store.CONTENT_ATTRIBUTES


def test_to_record_handles_a_root_span(tracing: Tracing, memory: InMemorySpanExporter) -> None:
    with tracing.span("root", attributes={"list": ("a", "b")}):
        pass
    record = to_record(finished(memory, "root"))
    assert record.parent_span_id is None and record.attributes == {"list": ["a", "b"]}
    assert record.end_ns >= record.start_ns > 0 and record.status == "unset"


# -- the request span ------------------------------------------------------------------------------------


def app_with(tracing: Tracing) -> FastAPI:
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)

    @app.get("/v1/items/{item}")
    async def item(item: str) -> dict[str, Any]:
        structlog.get_logger("test").info("inside the route", item=item)
        if item == "boom":
            raise RuntimeError("boom")
        return {"traceparent": traceparent()}

    @app.get("/healthz")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    class Refuse:  # stands for authentication: refuses before routing
        def __init__(self, app: ASGIApp) -> None:
            self.app = app

        async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] == "http" and scope["path"].endswith("/refused"):
                await send({"type": "http.response.start", "status": 401, "headers": []})
                await send({"type": "http.response.body", "body": b""})
                return
            await self.app(scope, receive, send)

    app.add_middleware(Refuse)
    app.add_middleware(TracingMiddleware, tracing=tracing)
    return app


def test_the_request_span(tracing: Tracing, memory: InMemorySpanExporter) -> None:
    client = TestClient(app_with(tracing), raise_server_exceptions=False)
    response = client.get("/v1/items/one", headers={"traceparent": PARENT})
    assert response.status_code == 200
    span = finished(memory, "GET /v1/items/{item}")  # the only one yet
    assert span.kind is SpanKind.SERVER
    assert f"{span.context.trace_id:032x}" == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert f"{span.parent.span_id:016x}" == "00f067aa0ba902b7"  # type: ignore[union-attr]
    assert response.headers["traceparent"] == traceparent(span)  # type: ignore[arg-type]
    assert response.json()["traceparent"] == response.headers["traceparent"]  # current inside the route
    assert span.attributes["http.route"] == "/v1/items/{item}"
    assert span.attributes["url.path"] == "/v1/items/one"
    assert span.attributes["http.response.status_code"] == 200

    def by_path(path: str) -> ReadableSpan:
        (span,) = [s for s in memory.get_finished_spans() if s.attributes.get("url.path") == path]
        return span

    assert client.get("/v1/items/refused").status_code == 401
    refused = by_path("/v1/items/refused")  # answered before routing: the template is found all the same
    assert refused.name == "GET /v1/items/{item}" and refused.attributes["http.response.status_code"] == 401
    assert refused.status.status_code.name == "UNSET"  # a 4xx is the client's error, not the server's

    assert client.get("/v1/items/boom").status_code == 500
    failed = by_path("/v1/items/boom")
    assert failed.attributes["http.response.status_code"] == 500
    assert failed.attributes[genai.ERROR_TYPE] == "RuntimeError" and failed.status.status_code.name == "ERROR"

    client.get("/healthz")
    client.get("/nowhere")
    names = [s.name for s in memory.get_finished_spans()]
    assert "GET /healthz" not in names and "GET" in names  # probes are not traced; an unknown path is the method


def test_log_lines_carry_the_current_span(tracing: Tracing, memory: InMemorySpanExporter) -> None:
    out = io.StringIO()
    with redirect_stdout(out):
        configure_logging(LoggingConfig(format="json"), Redactor([]))
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(request_id="req-1")
        with tracing.span("outer") as outer, tracing.span("inner") as inner:
            structlog.get_logger("test").info("in inner")
        structlog.get_logger("test").info("outside")
    structlog.contextvars.clear_contextvars()
    first, second = (json.loads(line) for line in out.getvalue().splitlines())
    assert first["request_id"] == "req-1"
    assert first["trace_id"] == f"{outer.get_span_context().trace_id:032x}"
    assert first["span_id"] == f"{inner.get_span_context().span_id:016x}"
    assert "trace_id" not in second


# -- who may read which trace ----------------------------------------------------------------------------


def traces_app(store: SpanStore, runs: dict[str, str]) -> tuple[FastAPI, list[Any]]:
    audited: list[Any] = []

    class Service:
        async def run(self, run_id: str) -> Any:
            if run_id not in runs:
                raise NotFound(f"no run {run_id!r}")
            return SimpleNamespace(id=run_id, owner=runs[run_id])

    app = FastAPI()
    app.include_router(trace_routes.router)
    app.state.strata = SimpleNamespace(
        chat=SimpleNamespace(tracing=SimpleNamespace(store=store)),
        agent_service=Service,
        guard=SimpleNamespace(audit=SimpleNamespace(record=audited.append)),
    )
    install_error_handlers(app, Redactor([]))

    @app.middleware("http")
    async def authenticate(request: Request, call_next: Any) -> Any:
        user, role = request.headers["x-test-user"].split(":")
        request.scope[PRINCIPAL] = Principal(user=user, role=role, via="key", key_id=f"key_{user}")  # type: ignore[arg-type]
        return await call_next(request)

    return app, audited


async def test_traces_are_shown_to_their_owners(db: Database) -> None:
    store = SpanStore(db)
    trace = "c" * 32
    await store.append(
        [
            SpanRecord(trace, "1" * 16, None, "POST /v1/agents/{agent}/runs", "server", 1, 9, owner="alice"),
            SpanRecord(trace, "2" * 16, "1" * 16, "invoke_agent a", "internal", 2, 8, run_id="run_a", owner="alice"),
            SpanRecord(trace, "3" * 16, "2" * 16, "chat m", "client", 3, 4, run_id="run_a", owner="alice"),
            SpanRecord(trace, "4" * 16, None, "POST /v1/chat/completions", "server", 5, 6, owner="bob"),
        ]
    )
    app, audited = traces_app(store, {"run_a": "alice"})
    with TestClient(app) as client:

        def get(path: str, who: str) -> Any:
            return client.get(path, headers={"x-test-user": who})

        mine = get("/v1/runs/run_a/trace", "alice:user")
        assert mine.status_code == 200
        assert [s["name"] for s in mine.json()["spans"]] == ["invoke_agent a", "chat m"]
        assert mine.json()["trace_ids"] == [trace]
        assert mine.json()["spans"][1]["parent_span_id"] == "2" * 16
        assert get("/v1/runs/run_a/trace", "bob:user").status_code == 404
        assert get("/v1/runs/run_b/trace", "alice:user").status_code == 404

        assert [s["span_id"] for s in get(f"/v1/traces/{trace}", "alice:user").json()["spans"]] == [
            "1" * 16,
            "2" * 16,
            "3" * 16,
        ]
        assert [s["span_id"] for s in get(f"/v1/traces/{trace.upper()}", "bob:user").json()["spans"]] == ["4" * 16]
        assert get(f"/v1/traces/{trace}", "carol:user").status_code == 404
        assert get("/v1/traces/nonsense", "alice:user").status_code == 404
        assert not audited
        assert len(get(f"/v1/traces/{trace}", "audra:auditor").json()["spans"]) == 4
        assert [record.action for record in audited] == ["data.read_other_user"]
        assert get("/v1/runs/run_a/trace", "audra:auditor").status_code == 200
