"""The built-in alerter against a real webhook receiver (aiohttp on 127.0.0.1).

Requests go through a FastAPI app with the metrics middleware, so the alerter sees exactly what
`/metrics` shows. One test runs the alerter's own loop on the real clock with sub-second windows;
the other steps a fake clock through evaluations to check repeats and a receiver that fails first.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from aiohttp import web
from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from starlette.responses import JSONResponse, Response

from strata.api.metrics_middleware import MetricsMiddleware
from strata.config import AlertsConfig
from strata.observability.alerts import Alerter
from strata.observability.request_metrics import RequestMetrics


@dataclass
class Receiver:
    url: str
    received: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    fail_next: int = 0  # answer 503 to this many posts first

    def statuses(self) -> list[str]:
        return [body["status"] for body in self.received]


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    state = Receiver(url="")

    async def hook(request: web.Request) -> web.Response:
        if state.fail_next > 0:
            state.fail_next -= 1
            return web.Response(status=503)
        state.received.append(await request.json())
        state.headers.append(dict(request.headers))
        return web.Response(status=200)

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    state.url = f"http://127.0.0.1:{port}/hook"
    yield state
    await runner.cleanup()


class Service:
    """A FastAPI app whose chat route fails while `failing` is set, with Strata's request metrics."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.metrics = RequestMetrics(self.registry)
        self.failing = False
        app = FastAPI()

        @app.post("/v1/chat/completions")
        async def chat() -> Response:
            if self.failing:
                return JSONResponse({"error": {"code": "upstream_unavailable"}}, status_code=502)
            return JSONResponse({"ok": True})

        app.add_middleware(MetricsMiddleware, metrics=self.metrics)
        self.client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://strata")

    async def requests(self, n: int) -> None:
        for _ in range(n):
            await self.client.post("/v1/chat/completions", json={"model": "m"})


async def wait_for(predicate: Any, limit_s: float = 10.0) -> None:
    async with asyncio.timeout(limit_s):
        while not predicate():
            await asyncio.sleep(0.01)


async def test_a_sustained_error_rate_fires_once_and_resolves_once(receiver: Receiver) -> None:
    service = Service()
    config = AlertsConfig.model_validate(
        {
            "webhooks": [{"url": receiver.url, "headers_env": {"X-Hook-Token": "HOOK_TOKEN"}}],
            "interval_s": 0.05,
            "repeat_s": 3600,
            "rules": [{"name": "HighErrorRate", "kind": "error_rate", "threshold": 0.2, "window_s": 0.5,
                       "for_s": 0.2, "min_requests": 5, "severity": "critical"}],
        },
        context={"environ": {"HOOK_TOKEN": "t0ken"}},
    )  # fmt: skip
    alerter = Alerter(config, service.registry, environ={"HOOK_TOKEN": "t0ken"})
    await alerter.start()
    try:
        service.failing = True
        loop = asyncio.get_running_loop()
        end = loop.time() + 1.5
        while loop.time() < end:  # errors for 1.5 s: several evaluations while firing
            await service.requests(5)
            await asyncio.sleep(0.02)
        assert receiver.statuses() == ["firing"]  # once, not once per evaluation
        service.failing = False
        end = loop.time() + 1.5
        while loop.time() < end:
            await service.requests(5)
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.3)
    finally:
        await alerter.stop()
        await service.client.aclose()
    assert receiver.statuses() == ["firing", "resolved"]
    firing, resolved = receiver.received
    assert firing["alert"] == "HighErrorRate" and firing["labels"]["severity"] == "critical"
    assert firing["value"] >= 0.99 and firing["threshold"] == 0.2
    assert firing["alerts"][0]["status"] == "firing"
    assert resolved["alerts"][0]["endsAt"] == resolved["ended_at"] and resolved["ended_at"] > resolved["started_at"]
    assert resolved["started_at"] == firing["started_at"]
    assert all(h.get("X-Hook-Token") == "t0ken" for h in receiver.headers)


async def test_repeats_after_repeat_s_and_survives_a_failing_receiver(receiver: Receiver) -> None:
    service = Service()
    config = AlertsConfig.model_validate(
        {
            "webhooks": [{"url": receiver.url}],
            "interval_s": 3600,  # the test drives every evaluation
            "repeat_s": 60,
            "rules": [{"name": "HighErrorRate", "kind": "error_rate", "threshold": 0.2, "window_s": 30,
                       "for_s": 10, "min_requests": 5}],
        }
    )  # fmt: skip
    now = [0.0]
    alerter = Alerter(config, service.registry, clock=lambda: now[0], backoff_initial_s=0.01)
    receiver.fail_next = 2  # the first notification goes through on its third attempt
    await alerter.start()  # its loop evaluates once now (t=0): the baseline
    try:
        await asyncio.sleep(0.05)
        service.failing = True
        for t in range(5, 100, 5):
            await service.requests(10)
            now[0] = float(t)
            await alerter.evaluate()
        await wait_for(lambda: len(receiver.received) == 2)
        assert receiver.statuses() == ["firing", "firing"]  # t=15, and again 60 s later at t=75
        service.failing = False
        for t in range(100, 200, 5):
            await service.requests(10)
            now[0] = float(t)
            await alerter.evaluate()
        await wait_for(lambda: len(receiver.received) == 3)
        await asyncio.sleep(0.1)
    finally:
        await alerter.stop()
        await service.client.aclose()
    assert receiver.statuses() == ["firing", "firing", "resolved"]
    assert alerter.sent == 3 and alerter.failed == 0
