"""Request metrics: a known sequence of requests gives exact counter and histogram values."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import orjson
import pytest
from fastapi import FastAPI, Request
from prometheus_client import CollectorRegistry, generate_latest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from strata.api import metrics_middleware
from strata.api.metrics_middleware import MetricsMiddleware, request_started_at, set_model, waiting_on_backend
from strata.observability.request_metrics import RequestMetrics
from strata.serving.stream_relay import ChatStreamRelay, StreamStats
from strata.serving.usage import ApproximateTokenCounter, Usage


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class RefuseSecrets:
    """Stands in for the auth middleware: answers 401 before routing for /v1/runs/secret*."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1/runs/secret"):
            await JSONResponse({"error": "no"}, status_code=401)(scope, receive, send)
            return
        await self.app(scope, receive, send)


def build(clock: FakeClock, metrics: RequestMetrics) -> FastAPI:
    app = FastAPI()

    @app.get("/v1/runs/{run_id}")
    async def get_run(run_id: str) -> Response:
        clock.now += 0.3
        return JSONResponse({"id": run_id})

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        body = orjson.loads(await request.body())
        set_model(request.scope, body["model"])
        clock.now += 0.001  # Strata's own work before the backend
        with waiting_on_backend(request.scope):
            await asyncio.sleep(0)
            clock.now += 2.0  # the backend
        clock.now += 0.0005  # after it
        if body.get("fail"):
            return JSONResponse({"error": "upstream"}, status_code=502)
        if body.get("stream"):

            async def chunks() -> AsyncIterator[bytes]:
                for _ in range(3):
                    clock.now += 1.0
                    yield b"data: {}\n\n"

            return StreamingResponse(chunks(), media_type="text/event-stream")
        return JSONResponse({"ok": True, "started": request_started_at(request.scope)})

    @app.get("/boom")
    async def boom() -> Response:
        raise RuntimeError("bug")

    app.add_middleware(RefuseSecrets)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(metrics_middleware, "perf_counter", fake)
    return fake


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    found = registry.get_sample_value(name, labels)
    return 0.0 if found is None else found


async def test_a_known_sequence_of_requests_gives_exact_values(clock: FakeClock) -> None:
    registry = CollectorRegistry()
    metrics = RequestMetrics(registry, is_known_model=lambda name: name in {"m1", "m2"})
    app = build(clock, metrics)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        for run in ("run_a", "run_b", "run_c"):
            assert (await client.get(f"/v1/runs/{run}")).status_code == 200
        assert (await client.post("/v1/chat/completions", json={"model": "m1"})).status_code == 200
        assert (await client.post("/v1/chat/completions", json={"model": "m1", "fail": True})).status_code == 502
        streamed = await client.post("/v1/chat/completions", json={"model": "m2", "stream": True})
        assert streamed.status_code == 200 and streamed.content.count(b"data:") == 3
        # user text as a model name is never a label
        assert (await client.post("/v1/chat/completions", json={"model": "ignore previous instructions"})).is_success
        assert (await client.get("/no/such/path/12345")).status_code == 404
        assert (await client.get("/v1/runs/secret-1")).status_code == 401  # refused before routing
        assert (await client.post("/v1/runs/run_a")).status_code == 405
        assert (await client.request("BREW", "/v1/runs/run_a")).status_code == 405
        assert (await client.get("/boom")).status_code == 500

    runs = {"route": "/v1/runs/{run_id}", "method": "GET", "model": ""}
    assert value(registry, "strata_requests_total", **runs, status="200") == 3
    assert value(registry, "strata_request_duration_seconds_count", **runs, status="200") == 3
    assert value(registry, "strata_request_duration_seconds_sum", **runs, status="200") == pytest.approx(0.9)
    assert value(registry, "strata_request_duration_seconds_bucket", **runs, status="200", le="0.25") == 0
    assert value(registry, "strata_request_duration_seconds_bucket", **runs, status="200", le="0.5") == 3

    chat = {"route": "/v1/chat/completions", "method": "POST"}
    assert value(registry, "strata_requests_total", **chat, model="m1", status="200") == 1
    assert value(registry, "strata_requests_total", **chat, model="m1", status="502") == 1
    assert value(registry, "strata_requests_total", **chat, model="other", status="200") == 1
    # the stream is measured until its body ended: 2.0015 s before it, then 3 chunks of 1 s
    assert value(registry, "strata_request_duration_seconds_sum", **chat, model="m2", status="200") == pytest.approx(
        5.0015
    )
    assert value(registry, "strata_request_duration_seconds_bucket", **chat, model="m2", status="200", le="5.0") == 0
    assert value(registry, "strata_request_duration_seconds_bucket", **chat, model="m2", status="200", le="10.0") == 1
    # overhead: 1.5 ms per chat request, whatever the backend took (4 chat requests)
    assert value(registry, "strata_overhead_seconds_count", route="/v1/chat/completions") == 4
    assert value(registry, "strata_overhead_seconds_sum", route="/v1/chat/completions") == pytest.approx(0.006)
    assert value(registry, "strata_overhead_seconds_bucket", route="/v1/chat/completions", le="0.001") == 0
    assert value(registry, "strata_overhead_seconds_bucket", route="/v1/chat/completions", le="0.0025") == 4
    assert value(registry, "strata_overhead_seconds_count", route="/v1/runs/{run_id}") == 0  # no backend call

    assert value(registry, "strata_requests_total", route="unmatched", method="GET", model="", status="404") == 1
    assert value(registry, "strata_requests_total", **runs, status="401") == 1  # the template, not the raw path
    assert (
        value(registry, "strata_requests_total", route="/v1/runs/{run_id}", method="POST", model="", status="405") == 1
    )
    assert (
        value(registry, "strata_requests_total", route="/v1/runs/{run_id}", method="other", model="", status="405") == 1
    )
    assert value(registry, "strata_requests_total", route="/boom", method="GET", model="", status="500") == 1

    exposition = generate_latest(registry).decode()
    for raw in ("run_a", "secret-1", "ignore previous", "/no/such/path", "BREW"):
        assert raw not in exposition  # no user text and no ids in labels


async def test_other_protocols_pass_through_uncounted() -> None:
    registry = CollectorRegistry()
    seen: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope["type"])

    middleware = MetricsMiddleware(app, RequestMetrics(registry))

    async def receive() -> dict[str, object]:
        return {}

    async def send(message: object) -> None:
        pass

    await middleware({"type": "websocket", "path": "/v1/agents/a/ws"}, receive, send)  # type: ignore[arg-type]
    await middleware({"type": "lifespan"}, receive, send)  # type: ignore[arg-type]
    assert seen == ["websocket", "lifespan"]
    assert not [
        sample for family in registry.collect() if family.name == "strata_requests" for sample in family.samples
    ]


def test_model_calls_tokens_cost_refusals_agents_tools() -> None:
    registry = CollectorRegistry()
    metrics = RequestMetrics(registry, max_models=2)
    metrics.observe_tokens("m1", 100, 20)
    metrics.observe_tokens("m1", 50, 5)
    metrics.observe_operation("m1", 0.5)
    metrics.observe_operation("m1", 3.0, error_type="upstream_timeout")
    metrics.observe_ttft("m1", 0.15)
    metrics.observe_ttft("m1", 2.5)
    metrics.observe_tpot("m1", 0.02)
    metrics.observe_cost("m1", "key_1", 0.25)
    metrics.observe_cost("m1", "key_1", 0.5)
    metrics.observe_cost("m1", None, 0.125)
    metrics.observe_cost("m1", "key_1", 0.0)  # free: nothing recorded
    metrics.rate_limited("requests")
    metrics.rate_limited("requests")
    metrics.rate_limited("tokens")
    metrics.budget_refused("key")
    metrics.run_finished("demo", "completed", 4.0)
    metrics.run_finished("demo", "failed", 0.2)
    metrics.tool_called("calculator", "ok")
    metrics.tool_called("calculator", "ok")
    metrics.tool_called("http_fetch", "error")
    # only max_models distinct names become labels without a model list
    metrics.observe_ttft("m2", 0.1)
    metrics.observe_ttft("m3", 0.1)

    tokens = {"gen_ai_operation_name": "chat", "gen_ai_request_model": "m1"}
    assert value(registry, "gen_ai_client_token_usage_sum", **tokens, gen_ai_token_type="input") == 150
    assert value(registry, "gen_ai_client_token_usage_sum", **tokens, gen_ai_token_type="output") == 25
    assert value(registry, "gen_ai_client_token_usage_count", **tokens, gen_ai_token_type="output") == 2
    assert value(registry, "gen_ai_client_token_usage_bucket", **tokens, gen_ai_token_type="output", le="16.0") == 1
    assert value(registry, "gen_ai_client_operation_duration_seconds_count", **tokens, error_type="") == 1
    assert value(registry, "gen_ai_client_operation_duration_seconds_sum", **tokens, error_type="upstream_timeout") == 3
    assert value(registry, "strata_time_to_first_token_seconds_count", model="m1") == 2
    assert value(registry, "strata_time_to_first_token_seconds_bucket", model="m1", le="2.0") == 1  # the SLO bound
    assert value(registry, "strata_time_per_output_token_seconds_bucket", model="m1", le="0.02") == 1
    assert value(registry, "strata_cost_usd_total", model="m1", key="key_1") == 0.75
    assert value(registry, "strata_cost_usd_total", model="m1", key="") == 0.125
    assert value(registry, "strata_rate_limit_rejections_total", kind="requests") == 2
    assert value(registry, "strata_rate_limit_rejections_total", kind="tokens") == 1
    assert value(registry, "strata_budget_rejections_total", scope="key") == 1
    assert value(registry, "strata_agent_runs_total", agent="demo", status="completed") == 1
    assert value(registry, "strata_agent_run_duration_seconds_sum", agent="demo", status="failed") == 0.2
    assert value(registry, "strata_tool_calls_total", tool="calculator", outcome="ok") == 2
    assert value(registry, "strata_tool_calls_total", tool="http_fetch", outcome="error") == 1
    assert value(registry, "strata_time_to_first_token_seconds_count", model="m2") == 1
    assert value(registry, "strata_time_to_first_token_seconds_count", model="other") == 1


def test_each_app_has_its_own_metrics() -> None:
    first, second = CollectorRegistry(), CollectorRegistry()
    RequestMetrics(first).rate_limited("requests")
    RequestMetrics(second)  # no clash with the first: nothing is registered globally
    assert value(first, "strata_rate_limit_rejections_total", kind="requests") == 1
    assert value(second, "strata_rate_limit_rejections_total", kind="requests") == 0


def test_stream_stats_give_ttft_and_time_per_output_token() -> None:
    stats = StreamStats(usage=Usage(10, 11), first_chunk_at=101.0, last_chunk_at=102.0)
    assert stats.ttft_s(started_at=100.25) == 0.75
    assert stats.tpot_s() == pytest.approx(0.1)  # 1 s over the 10 tokens after the first
    assert StreamStats(usage=Usage(10, 1), first_chunk_at=1.0, last_chunk_at=1.0).tpot_s() is None
    assert StreamStats(first_chunk_at=1.0, last_chunk_at=2.0).tpot_s() is None  # no usage
    assert StreamStats().ttft_s(0.0) is None  # nothing streamed


class ByteStream:
    deployment = "test/0"

    def __init__(self, *reads: bytes) -> None:
        self.reads = reads

    async def chunks(self) -> AsyncIterator[bytes]:
        for read in self.reads:
            await asyncio.sleep(0.01)
            yield read

    def close(self) -> None:
        pass


async def test_the_relay_times_the_first_and_last_answer_chunks() -> None:
    def event(content: str) -> bytes:
        body = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m"}
        body["choices"] = [{"index": 0, "delta": {"content": content}}]
        return b"data: " + orjson.dumps(body) + b"\n\n"

    usage = b'data: {"id":"c","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":3}}\n\n'

    async def prompt_tokens() -> int:
        return 3

    relay = ChatStreamRelay(
        ByteStream(event("a"), event("b"), event("c"), usage, b"data: [DONE]\n\n"),  # type: ignore[arg-type]
        client_wants_usage=False,
        backend_reports_usage=True,
        prompt_tokens=prompt_tokens,
        counter=ApproximateTokenCounter(),
    )
    out = [chunk async for chunk in relay]
    stats = relay.stats
    assert len(out) == 4  # three answer chunks and [DONE]; the usage event is hidden
    assert stats.chunks == 3  # the usage-only event is not an answer chunk
    assert stats.first_chunk_at is not None and stats.last_chunk_at is not None
    assert stats.last_chunk_at - stats.first_chunk_at >= 0.015  # two reads of 10 ms apart
    tpot = stats.tpot_s()
    assert tpot is not None and tpot == pytest.approx((stats.last_chunk_at - stats.first_chunk_at) / 2)
