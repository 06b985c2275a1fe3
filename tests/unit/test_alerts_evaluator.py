"""The built-in alerter: rules, pending -> firing -> resolved, de-duplication, delivery with retries."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from pydantic import ValidationError

from strata.config import AlertsConfig
from strata.observability.alerts import Alerter, Notification, _quantile
from strata.observability.request_metrics import RequestMetrics

CHAT = "/v1/chat/completions"


class Clock:
    def __init__(self, start: float = 0.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


class Breakers(Collector):
    def __init__(self) -> None:
        self.open: set[str] = set()

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily("strata_deployment_breaker_state", "", labels=["model", "deployment", "state"])
        for deployment in ("m/0", "m/1"):
            current = "open" if deployment in self.open else "closed"
            for state in ("closed", "open", "half_open"):
                family.add_metric(["m", deployment, state], 1.0 if state == current else 0.0)
        yield family


def config(*rules: dict[str, Any], **extra: Any) -> AlertsConfig:
    data = {"webhooks": [{"url": "http://alerts.test/hook"}], "rules": list(rules), **extra}
    return AlertsConfig.model_validate(data)


class Setup:
    def __init__(self, cfg: AlertsConfig, **kwargs: Any) -> None:
        self.registry = CollectorRegistry()
        self.metrics = RequestMetrics(self.registry)
        self.breakers = Breakers()
        self.registry.register(self.breakers)
        self.clock = Clock()
        self.wall = Clock(1_700_000_000.0)
        self.alerter = Alerter(cfg, self.registry, clock=self.clock, wall=self.wall, **kwargs)

    def traffic(self, ok: int, errors: int, route: str = CHAT, seconds: float = 0.1) -> None:
        for _ in range(ok):
            self.metrics.observe_request(route, "POST", "m", 200, seconds)
        for _ in range(errors):
            self.metrics.observe_request(route, "POST", "m", 502, seconds)

    async def at(self, t: float) -> list[Notification]:
        self.clock.now = t
        self.wall.now = 1_700_000_000.0 + t
        return await self.alerter.evaluate()


ERROR_RATE = {"name": "Errors", "kind": "error_rate", "threshold": 0.1, "window_s": 60, "for_s": 30, "min_requests": 10}


async def test_a_sustained_error_rate_fires_once_repeats_after_repeat_s_and_resolves_once() -> None:
    s = Setup(config(ERROR_RATE, repeat_s=300))
    sent: list[tuple[float, Notification]] = []
    for t in range(0, 400, 10):  # half of the requests fail
        s.traffic(ok=5, errors=5)
        sent += [(t, n) for n in await s.at(t)]
    for t in range(400, 700, 10):  # healthy again
        s.traffic(ok=10, errors=0)
        sent += [(t, n) for n in await s.at(t)]
    assert [(t, n.status) for t, n in sent] == [(40, "firing"), (340, "firing"), (440, "resolved")]
    first = sent[0][1]
    assert first.alert == "Errors"
    assert first.value == pytest.approx(0.5)
    assert first.threshold == 0.1
    assert first.labels == {"alertname": "Errors", "severity": "warning", "kind": "error_rate"}
    assert first.started_at == 1_700_000_010.0  # when the condition began to hold (pending)
    resolved = sent[-1][1]
    assert resolved.ended_at == 1_700_000_440.0 and resolved.started_at == first.started_at
    assert s.alerter.active() == []


async def test_a_blip_shorter_than_for_s_never_fires() -> None:
    s = Setup(config(ERROR_RATE))
    out = await s.at(0)
    s.traffic(ok=0, errors=20)
    out += await s.at(10)  # pending
    s.traffic(ok=2000, errors=0)
    out += await s.at(20)  # 20 errors in 2020 requests: under the threshold again
    s.traffic(ok=100, errors=0)
    out += await s.at(50)
    assert out == []


async def test_too_few_requests_are_no_data() -> None:
    s = Setup(config({**ERROR_RATE, "min_requests": 100, "for_s": 0}))
    out = []
    for t in range(0, 120, 10):
        s.traffic(ok=1, errors=1)
        out += await s.at(t)
    assert out == []


async def test_probes_scrapes_and_other_routes_are_left_out() -> None:
    s = Setup(config({**ERROR_RATE, "for_s": 0}, {**ERROR_RATE, "name": "ChatErrors", "for_s": 0, "routes": [CHAT]}))
    await s.at(0)
    s.traffic(ok=0, errors=50, route="/readyz")
    s.traffic(ok=0, errors=50, route="/metrics")
    s.traffic(ok=50, errors=0)
    assert await s.at(10) == []
    s.traffic(ok=0, errors=50, route="/v1/runs/{run_id}")  # counts for the default rule only
    assert [n.alert for n in await s.at(20)] == ["Errors"]


async def test_streams_cut_short_after_their_200_count_as_errors() -> None:
    s = Setup(config({**ERROR_RATE, "for_s": 0}, {**ERROR_RATE, "name": "RunErrors", "for_s": 0,
                                                  "routes": ["/v1/runs/{run_id}"]}))  # fmt: skip
    await s.at(0)
    s.traffic(ok=50, errors=0)  # every answer started with 200 ...
    s.traffic(ok=10, errors=0, route="/v1/runs/{run_id}")
    for _ in range(10):
        s.metrics.stream_failed("m", "upstream_unavailable")  # ... but 10 of the streams broke off
    (firing,) = await s.at(10)
    assert firing.alert == "Errors" and firing.value == pytest.approx(10 / 60)
    assert "10 of 60 requests failed" in firing.summary


async def test_p95_latency_is_interpolated_like_histogram_quantile() -> None:
    rule = {"name": "Slow", "kind": "p95_latency", "threshold": 5, "window_s": 60, "for_s": 0, "min_requests": 10}
    s = Setup(config(rule))
    await s.at(0)
    s.traffic(ok=100, errors=0, seconds=0.2)
    s.traffic(ok=10, errors=0, seconds=20.0)
    (firing,) = await s.at(10)
    # rank 0.95 * 110 = 104.5 lies in the (10, 30] bucket, which holds requests 101..110
    assert firing.value == pytest.approx(10 + 20 * 4.5 / 10)
    assert firing.status == "firing" and "p95" in firing.summary
    s.traffic(ok=500, errors=0, seconds=0.2)
    s.clock.now = 100
    (resolved,) = await s.at(100)
    assert resolved.status == "resolved"


def test_quantile() -> None:
    bounds = [0.1, 1.0, math.inf]
    assert _quantile(0.5, bounds, (50.0, 100.0, 100.0)) == pytest.approx(0.1)
    assert _quantile(0.75, bounds, (50.0, 100.0, 100.0)) == pytest.approx(0.55)
    assert _quantile(0.95, bounds, (0.0, 0.0, 10.0)) == 1.0  # in +Inf: the highest finite bound
    assert math.isnan(_quantile(0.95, bounds, (0.0, 0.0, 0.0)))


async def test_an_open_breaker_fires_per_deployment_and_resolves_when_it_closes() -> None:
    s = Setup(config({"name": "Breaker", "kind": "breaker_open", "threshold": 1, "for_s": 20}))
    s.breakers.open = {"m/1"}
    assert await s.at(0) == []
    (firing,) = await s.at(20)
    assert firing.labels["deployment"] == "m/1" and firing.labels["model"] == "m"
    assert await s.at(30) == []
    s.breakers.open = set()
    (resolved,) = await s.at(40)
    assert (resolved.status, resolved.labels["deployment"]) == ("resolved", "m/1")


async def test_budget_alerts_fire_at_their_threshold_and_resolve_with_the_period() -> None:
    s = Setup(config({"name": "Budget", "kind": "budget", "threshold": 0.8, "for_s": 0}))
    s.alerter.fire_budget_alert("key", "key_1", spent_usd=50, limit_usd=100, period="month")
    assert await s.at(0) == []  # 50% spent: under the threshold
    s.alerter.fire_budget_alert("key", "key_1", spent_usd=85, limit_usd=100, period="month", until=s.wall.now + 60)
    (firing,) = await s.at(10)
    assert firing.labels == {"alertname": "Budget", "severity": "warning", "kind": "budget", "scope": "key",
                             "name": "key_1", "period": "month"}  # fmt: skip
    assert firing.value == pytest.approx(0.85)
    assert "$85.00 of $100.00" in firing.summary
    s.alerter.fire_budget_alert("key", "key_1", spent_usd=95, limit_usd=100, period="month", until=s.wall.now + 50)
    assert await s.at(20) == []  # still firing: not sent again
    (resolved,) = await s.at(61)  # the month is over
    assert resolved.status == "resolved"
    s.alerter.fire_budget_alert("agent", "demo", spent_usd=10, limit_usd=10, kind="soft")
    s.alerter.fire_budget_alert("agent", "demo", spent_usd=10, limit_usd=5, kind="hard")
    assert sorted(n.labels["budget_kind"] for n in await s.at(70)) == ["hard", "soft"]
    s.alerter.resolve_budget_alert("agent", "demo", kind="soft")
    (resolved,) = await s.at(71)
    assert (resolved.status, resolved.labels["budget_kind"]) == ("resolved", "soft")


class Receiver:
    """An httpx transport answering each POST with the next status of `statuses` (then 200)."""

    def __init__(self, *statuses: int) -> None:
        self.statuses = list(statuses)
        self.requests: list[httpx.Request] = []
        self.delivered: list[dict[str, Any]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        status = self.statuses.pop(0) if self.statuses else 200
        if status == 200:
            self.delivered.append(orjson.loads(request.content))
        return httpx.Response(status)


async def wait_for(predicate: Any, limit_s: float = 5.0) -> None:
    async with asyncio.timeout(limit_s):
        while not predicate():
            await asyncio.sleep(0.005)


BUDGET = {"name": "Budget", "kind": "budget", "threshold": 1.0, "for_s": 0}


async def test_delivery_retries_with_backoff_and_posts_alertmanager_json() -> None:
    receiver = Receiver(503, 500)
    cfg = AlertsConfig.model_validate(
        {"webhooks": [{"url": "http://alerts.test/hook", "headers_env": {"Authorization": "HOOK_AUTH"}}],
         "rules": [BUDGET], "labels": {"cluster": "prod"}},
        context={"environ": {"HOOK_AUTH": "Bearer s3cret"}},
    )  # fmt: skip
    client = httpx.AsyncClient(transport=httpx.MockTransport(receiver))
    s = Setup(cfg, client=client, environ={"HOOK_AUTH": "Bearer s3cret"}, backoff_initial_s=0.01)
    await s.alerter.start()
    try:
        s.alerter.fire_budget_alert("key", "key_1", spent_usd=12.5, limit_usd=10, period="day")
        await wait_for(lambda: receiver.delivered)
    finally:
        await s.alerter.stop()
        await client.aclose()
    assert len(receiver.requests) == 3  # 503, 500, then delivered
    assert s.alerter.sent == 1 and s.alerter.failed == 0
    request = receiver.requests[-1]
    assert request.headers["authorization"] == "Bearer s3cret"
    assert request.headers["content-type"] == "application/json"
    (body,) = receiver.delivered
    labels = {"alertname": "Budget", "severity": "warning", "kind": "budget", "cluster": "prod", "scope": "key",
              "name": "key_1", "period": "day"}  # fmt: skip
    # Alertmanager webhook (version 4) ...
    assert body["version"] == "4" and body["status"] == "firing" and body["receiver"] == "strata"
    assert body["groupLabels"] == {"alertname": "Budget"} and body["commonLabels"] == labels
    (alert,) = body["alerts"]
    assert alert["status"] == "firing" and alert["labels"] == labels
    assert alert["startsAt"].endswith("Z") and alert["endsAt"] == "0001-01-01T00:00:00Z"
    assert alert["annotations"]["summary"].startswith("Budget: budget 125% spent")
    assert len(alert["fingerprint"]) == 16
    # ... and the flat fields
    assert (body["alert"], body["value"], body["threshold"]) == ("Budget", 1.25, 1.0)
    assert body["labels"] == labels and body["started_at"] == alert["startsAt"] and body["ended_at"] is None


async def test_a_refused_payload_is_not_retried_and_a_dead_webhook_does_not_hold_up_the_others() -> None:
    refusing, healthy = Receiver(400), Receiver()
    dead_calls = 0

    def dead(request: httpx.Request) -> httpx.Response:
        nonlocal dead_calls
        dead_calls += 1
        raise httpx.ConnectError("refused", request=request)

    def route(request: httpx.Request) -> httpx.Response:
        return {"refusing": refusing, "healthy": healthy}.get(request.url.host, dead)(request)

    cfg = config(BUDGET, max_attempts=20)
    cfg = cfg.model_copy(
        update={"webhooks": [cfg.webhooks[0].model_copy(update={"url": f"http://{host}/hook"})
                             for host in ("dead", "refusing", "healthy")]}
    )  # fmt: skip
    client = httpx.AsyncClient(transport=httpx.MockTransport(route))
    s = Setup(cfg, client=client, backoff_initial_s=0.05, backoff_max_s=0.05)
    await s.alerter.start()
    try:
        s.alerter.fire_budget_alert("key", "k", spent_usd=2, limit_usd=1)
        await wait_for(lambda: healthy.delivered and refusing.requests)
        assert dead_calls < 20  # still retrying the dead one while the healthy one got it
    finally:
        await s.alerter.stop(grace_s=0.1)
        await client.aclose()
    assert len(refusing.requests) == 1  # a 400 is final
    assert len(healthy.delivered) == 1


async def test_without_webhooks_nothing_runs() -> None:
    s = Setup(AlertsConfig())
    assert not s.alerter.enabled
    await s.alerter.start()
    await s.alerter.stop()
    s.alerter.fire_budget_alert("key", "k", spent_usd=2, limit_usd=1)  # harmless


def test_the_alerts_config_is_checked() -> None:
    with pytest.raises(ValidationError, match="HOOK_TOKEN is not set"):
        AlertsConfig.model_validate(
            {"webhooks": [{"url": "https://hooks.example.com/x", "headers_env": {"Authorization": "HOOK_TOKEN"}}]},
            context={"environ": {}},
        )
    with pytest.raises(ValidationError, match="http:// or https://"):
        AlertsConfig.model_validate({"webhooks": [{"url": "file:///etc/passwd"}]})
    with pytest.raises(ValidationError, match="unique"):
        AlertsConfig.model_validate({"rules": [ERROR_RATE, ERROR_RATE]})
    with pytest.raises(ValidationError):
        AlertsConfig.model_validate({"rules": [{**ERROR_RATE, "kind": "cpu_high"}]})
    defaults = AlertsConfig()
    assert [r.kind for r in defaults.rules] == ["error_rate", "p95_latency", "breaker_open", "budget"]
    assert defaults.webhooks == []
