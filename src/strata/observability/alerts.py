"""The built-in alerter: a few rules evaluated from Strata's own metrics, posted to webhooks.

For setups without Prometheus (the shipped `deploy/prometheus/alerts.yml` is the richer option).
Every `alerts.interval_s` the alerter reads the app's metric registry (the same numbers `/metrics`
shows) and evaluates its rules:

- `error_rate`: the share of failed requests among those of the last `window_s`: 5xx answers, and chat
  streams cut short after their 200 went out (`strata_stream_errors_total`);
- `p95_latency`: the 95th percentile of request durations over `window_s`, interpolated within
  the buckets of `strata_request_duration_seconds` as PromQL's `histogram_quantile` does;
- `breaker_open`: one alert per deployment whose circuit breaker is open;
- `budget`: soft budgets the cost code reported through `fire_budget_alert` (spent / limit).

Windows are differences between snapshots of the cumulative counters, kept in memory for the
longest window only (like Prometheus' `increase`): the request path pays nothing for alerting.
A rule's condition must hold `for_s` before the alert fires (pending, then firing, like Prometheus);
a window with fewer than `min_requests` requests counts as "not holding".

Notifications: one POST per alert and state change, the JSON of an Alertmanager webhook (version 4,
one alert in `alerts`), so any Alertmanager receiver understands it, plus flat fields for people
and simple receivers: `status` (firing | resolved), `alert`, `labels`, `value`, `threshold`,
`started_at`, `ended_at` (ISO 8601, UTC), `summary`. De-duplication: a firing alert is sent once and
re-sent only every `repeat_s` while it keeps firing; its resolution is sent once. Delivery runs in
one background task per webhook with a bounded queue and retries with exponential backoff and
jitter (connection errors, timeouts, 429 and 5xx), so a slow or dead receiver never holds up
requests, the evaluation, or the other webhooks.

Each replica evaluates its own traffic; with several replicas, prefer Prometheus.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import httpx
import structlog
from prometheus_client import CollectorRegistry

from strata.config import AlertRuleConfig, AlertsConfig, AlertWebhookConfig
from strata.resilience.retry import backoff

log = structlog.get_logger("strata.alerts")

# Routes left out of error_rate and p95_latency unless a rule names them: scrapes, probes, and the
# run-events stream (an SSE connection that lasts as long as its run).
EXCLUDED_ROUTES = frozenset({"/metrics", "/healthz", "/readyz", "/v1/runs/{run_id}/events"})
STREAM_ROUTE = "/v1/chat/completions"  # the route whose failed streams strata_stream_errors_total counts
QUEUE_SIZE = 256  # notifications waiting per webhook; the oldest is dropped beyond
MAX_BUDGETS = 10_000
_ZERO_TIME = "0001-01-01T00:00:00Z"  # Alertmanager's endsAt of an alert still firing

Status = Literal["firing", "resolved"]


@dataclass(frozen=True)
class Notification:
    """One alert state change (or repeat) to post."""

    status: Status
    alert: str
    labels: dict[str, str]
    value: float
    threshold: float
    started_at: float  # wall clock: when the condition began to hold
    ended_at: float | None
    summary: str

    @property
    def fingerprint(self) -> str:
        text = "\x00".join(f"{k}={v}" for k, v in sorted(self.labels.items()))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def payload(self) -> dict[str, Any]:
        annotations = {"summary": self.summary, "value": _number(self.value), "threshold": _number(self.threshold)}
        return {
            # Alertmanager webhook, version 4
            "version": "4",
            "receiver": "strata",
            "status": self.status,
            "groupKey": f"strata:{self.alert}:{self.fingerprint}",
            "truncatedAlerts": 0,
            "groupLabels": {"alertname": self.alert},
            "commonLabels": self.labels,
            "commonAnnotations": annotations,
            "externalURL": "",
            "alerts": [
                {
                    "status": self.status,
                    "labels": self.labels,
                    "annotations": annotations,
                    "startsAt": _iso(self.started_at),
                    "endsAt": _iso(self.ended_at) if self.ended_at is not None else _ZERO_TIME,
                    "generatorURL": "",
                    "fingerprint": self.fingerprint,
                }
            ],
            # Strata's flat view
            "alert": self.alert,
            "labels": self.labels,
            "value": self.value,
            "threshold": self.threshold,
            "started_at": _iso(self.started_at),
            "ended_at": _iso(self.ended_at) if self.ended_at is not None else None,
            "summary": self.summary,
        }


@dataclass
class _State:
    rule: AlertRuleConfig
    labels: dict[str, str]
    active_since: float  # monotonic
    started_at: float  # wall clock
    value: float
    firing: bool = False
    last_sent: float = 0.0


@dataclass
class _Budget:
    spent_usd: float
    limit_usd: float
    labels: dict[str, str]
    until: float | None  # wall clock: the end of the budget's period


@dataclass
class _Observation:
    labels: dict[str, str]
    value: float | None  # None: no data (counts as not holding)
    summary: str = ""


@dataclass
class _Window:
    """Snapshots of one rule's cumulative numbers, for differences over its window."""

    snapshots: deque[tuple[float, tuple[float, ...]]] = field(default_factory=lambda: deque(maxlen=10_000))

    def delta(self, now: float, window_s: float, current: tuple[float, ...]) -> tuple[float, ...] | None:
        self.snapshots.append((now, current))
        # Keep one snapshot at or before the window's start (the baseline), and everything after it.
        while len(self.snapshots) >= 2 and self.snapshots[1][0] <= now - window_s:
            self.snapshots.popleft()
        baseline_time, baseline = self.snapshots[0]
        if baseline_time >= now:
            return None  # the first look: nothing to compare with yet
        if len(baseline) != len(current) or any(c < b for c, b in zip(current, baseline, strict=True)):
            return current  # the counters were reset (or the buckets changed): count from zero
        return tuple(c - b for c, b in zip(current, baseline, strict=True))


class Alerter:
    """Evaluates `config.rules` on `registry` and posts changes to `config.webhooks`.

    `start()` runs the loop (only when a webhook is configured); `evaluate()` runs one evaluation and
    is what tests drive with a fake `clock` (monotonic seconds) and `wall` (Unix time).
    """

    def __init__(
        self,
        config: AlertsConfig,
        registry: CollectorRegistry,
        *,
        environ: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        client: httpx.AsyncClient | None = None,
        backoff_initial_s: float = 1.0,
        backoff_max_s: float = 30.0,
    ) -> None:
        self.config = config
        self._registry = registry
        self._environ = os.environ if environ is None else environ
        self._clock = clock
        self._wall = wall
        self._client = client
        self._own_client = client is None
        self._backoff = (backoff_initial_s, backoff_max_s)
        self._states: dict[tuple[str, tuple[tuple[str, str], ...]], _State] = {}
        self._windows: dict[str, _Window] = {}
        self._budgets: dict[tuple[str, str, str], _Budget] = {}
        self._queues = [asyncio.Queue[Notification](QUEUE_SIZE) for _ in config.webhooks]
        self._senders: list[asyncio.Task[None]] = []
        self._loop_task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self.sent = 0  # notifications delivered
        self.failed = 0  # notifications given up on

    @property
    def enabled(self) -> bool:
        return bool(self.config.webhooks)

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        if not self.enabled or self._loop_task is not None:
            return
        if self._client is None:
            self._client = httpx.AsyncClient(follow_redirects=False)
        for webhook, queue in zip(self.config.webhooks, self._queues, strict=True):
            self._senders.append(asyncio.create_task(self._deliver(webhook, queue), name="alert-webhook"))
        self._loop_task = asyncio.create_task(self._run(), name="alerter")
        log.info("alerter started", webhooks=len(self.config.webhooks), rules=[r.name for r in self.config.rules])

    async def stop(self, grace_s: float = 2.0) -> None:
        """Stops evaluating, gives queued notifications `grace_s` to go out, then stops the senders."""
        task, self._loop_task = self._loop_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._senders:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*(q.join() for q in self._queues)), grace_s)
        for sender in self._senders:
            sender.cancel()
        for sender in self._senders:
            with contextlib.suppress(asyncio.CancelledError):
                await sender
        self._senders.clear()
        if self._own_client and self._client is not None:
            await self._client.aclose()
            self._client = None

    async def _run(self) -> None:
        while True:
            try:
                await self.evaluate()
            except Exception:  # one bad evaluation must not end alerting
                log.exception("alerts.evaluation_failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.config.interval_s)
            self._wake.clear()

    # -- budgets (called by the cost code) ------------------------------------------------------

    def fire_budget_alert(
        self,
        scope: str,
        name: str,
        *,
        spent_usd: float,
        limit_usd: float,
        period: str | None = None,
        until: float | None = None,
        kind: str | None = None,
    ) -> None:
        """A budget's spend, reported by the cost code (cheap, never blocks: evaluation follows).

        `scope` (key | user | agent) and `name` (the key id, user or agent) identify the budget;
        `period` (day | month) and `kind` (soft | hard) become labels when given. `budget` rules fire
        while spent / limit >= their threshold. The alert resolves when `until` (Unix time: the end of
        the budget's period) passes, when `resolve_budget_alert` is called, or when a later report
        shows less spend.
        """
        key = (scope, name, kind or "")
        if key not in self._budgets and len(self._budgets) >= MAX_BUDGETS:
            log.warning("alerts.too_many_budgets", scope=scope, name=name)
            return
        labels = {"scope": scope, "name": name}
        if period:
            labels["period"] = period
        if kind:
            labels["budget_kind"] = kind
        self._budgets[key] = _Budget(spent_usd, limit_usd, labels, until)
        self._wake.set()

    def resolve_budget_alert(self, scope: str, name: str, kind: str | None = None) -> None:
        if self._budgets.pop((scope, name, kind or ""), None) is not None:
            self._wake.set()

    # -- evaluation -----------------------------------------------------------------------------

    def active(self) -> list[Notification]:
        """The alerts firing now."""
        return [self._notification(s, "firing", None) for s in self._states.values() if s.firing]

    async def evaluate(self) -> list[Notification]:
        """One evaluation of every rule; queues and returns the notifications it produced."""
        now, wall = self._clock(), self._wall()
        families = _Families(self._registry) if self._needs_registry() else None
        out: list[Notification] = []
        for rule in self.config.rules:
            observations = self._observe(rule, families, now, wall)
            out.extend(self._advance(rule, observations, now, wall))
        for notification in out:
            self._enqueue(notification)
        return out

    def _needs_registry(self) -> bool:
        return any(r.kind != "budget" for r in self.config.rules)

    def _observe(
        self, rule: AlertRuleConfig, families: _Families | None, now: float, wall: float
    ) -> list[_Observation]:
        if rule.kind == "budget":
            return self._observe_budgets(rule, wall)
        assert families is not None
        if rule.kind == "breaker_open":
            return [
                _Observation({"model": model, "deployment": deployment}, 1.0, f"deployment {deployment} ({model})")
                for model, deployment in families.open_breakers()
            ]
        routes = frozenset(rule.routes)

        def wanted(route: str) -> bool:
            return route in routes if routes else route not in EXCLUDED_ROUTES

        window = self._windows.setdefault(rule.name, _Window())
        if rule.kind == "error_rate":
            delta = window.delta(now, rule.window_s, families.request_totals(wanted))
            if delta is None or delta[0] < rule.min_requests:
                return [_Observation({}, None)]
            total, errors = delta
            return [_Observation({}, errors / total, f"{errors:.0f} of {total:.0f} requests failed")]
        bounds, cumulative = families.duration_buckets(wanted)
        delta = window.delta(now, rule.window_s, cumulative)
        if delta is None or not delta or delta[-1] < rule.min_requests:
            return [_Observation({}, None)]
        p95 = _quantile(0.95, bounds, delta)
        return [_Observation({}, p95, f"p95 of {delta[-1]:.0f} requests")]

    def _observe_budgets(self, rule: AlertRuleConfig, wall: float) -> list[_Observation]:
        for key in [k for k, b in self._budgets.items() if b.until is not None and b.until <= wall]:
            del self._budgets[key]  # the period is over
        return [
            _Observation(b.labels, b.spent_usd / b.limit_usd, f"${b.spent_usd:.2f} of ${b.limit_usd:.2f} spent")
            for b in self._budgets.values()
            if b.limit_usd > 0
        ]

    def _advance(
        self, rule: AlertRuleConfig, observations: Iterable[_Observation], now: float, wall: float
    ) -> list[Notification]:
        out: list[Notification] = []
        seen: set[tuple[str, tuple[tuple[str, str], ...]]] = set()
        for observation in observations:
            labels = {
                **self.config.labels,
                **observation.labels,
                "alertname": rule.name,
                "severity": rule.severity,
                "kind": rule.kind,
            }
            key = (rule.name, tuple(sorted(labels.items())))
            holds = observation.value is not None and observation.value >= rule.threshold
            if not holds:
                continue
            seen.add(key)
            state = self._states.get(key)
            if state is None:
                state = self._states[key] = _State(rule, labels, now, wall, observation.value or 0.0)
            state.value = observation.value or 0.0
            summary = observation.summary
            if not state.firing and now - state.active_since >= rule.for_s:
                state.firing = True
                state.last_sent = now
                out.append(self._notification(state, "firing", None, summary))
            elif state.firing and now - state.last_sent >= self.config.repeat_s:
                state.last_sent = now
                out.append(self._notification(state, "firing", None, summary))
        for key in [k for k, s in self._states.items() if s.rule.name == rule.name and k not in seen]:
            state = self._states.pop(key)
            if state.firing:
                out.append(self._notification(state, "resolved", wall))
        return out

    def _notification(self, state: _State, status: Status, ended_at: float | None, detail: str = "") -> Notification:
        rule = state.rule
        condition = _describe(rule, state.value)
        summary = f"{rule.name}: {condition}" + (f" ({detail})" if detail else "")
        if status == "resolved":
            summary = f"{rule.name} resolved"
        return Notification(status, rule.name, dict(state.labels), state.value, rule.threshold, state.started_at,
                            ended_at, summary)  # fmt: skip

    # -- delivery -------------------------------------------------------------------------------

    def _enqueue(self, notification: Notification) -> None:
        log.info("alert", status=notification.status, alert=notification.alert, labels=notification.labels,
                 value=notification.value)  # fmt: skip
        for queue in self._queues:
            if queue.full():  # a receiver that has been down a long time: drop the oldest
                with contextlib.suppress(asyncio.QueueEmpty):
                    queue.get_nowait()
                    queue.task_done()
                    self.failed += 1
                log.warning("alerts.queue_full", alert=notification.alert)
            queue.put_nowait(notification)

    async def _deliver(self, webhook: AlertWebhookConfig, queue: asyncio.Queue[Notification]) -> None:
        headers = {"Content-Type": "application/json", "User-Agent": "strata-alerter"}
        for header, env in webhook.headers_env.items():
            value = self._environ.get(env)
            if value:
                headers[header] = value
            else:
                log.warning("alerts.header_env_missing", header=header, env=env)
        while True:
            notification = await queue.get()
            try:
                await self._post(webhook, headers, notification)
            finally:
                queue.task_done()

    async def _post(self, webhook: AlertWebhookConfig, headers: dict[str, str], notification: Notification) -> None:
        assert self._client is not None
        body = notification.payload()
        initial, ceiling = self._backoff
        for attempt in range(1, self.config.max_attempts + 1):
            try:
                response = await self._client.post(webhook.url, json=body, headers=headers, timeout=webhook.timeout_s)
            except httpx.HTTPError as exc:
                problem = f"{type(exc).__name__}: {exc}"
            else:
                if response.is_success:
                    self.sent += 1
                    return
                problem = f"HTTP {response.status_code}"
                if response.status_code != 429 and response.status_code < 500:
                    break  # the receiver refuses this payload: retrying will not help
            if attempt < self.config.max_attempts:
                delay = backoff(attempt, initial, ceiling, jitter=0.5)
                log.warning("alerts.webhook_retry", url=webhook.url, attempt=attempt, problem=problem, in_s=delay)
                await asyncio.sleep(delay)
        self.failed += 1
        log.error("alerts.webhook_failed", url=webhook.url, alert=notification.alert, problem=problem)


class _Families:
    """The registry's samples this evaluation needs, read once."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests: list[tuple[dict[str, str], float]] = []
        self.buckets: list[tuple[dict[str, str], float]] = []
        self.breakers: list[tuple[dict[str, str], float]] = []
        self.stream_errors = 0.0
        for family in registry.collect():
            if family.name == "strata_requests":
                self.requests = [(s.labels, s.value) for s in family.samples if s.name == "strata_requests_total"]
            elif family.name == "strata_stream_errors":
                self.stream_errors = sum(s.value for s in family.samples if s.name == "strata_stream_errors_total")
            elif family.name == "strata_request_duration_seconds":
                self.buckets = [(s.labels, s.value) for s in family.samples if s.name.endswith("_bucket")]
            elif family.name == "strata_deployment_breaker_state":
                self.breakers = [(s.labels, s.value) for s in family.samples]

    def request_totals(self, wanted: Callable[[str], bool]) -> tuple[float, float]:
        """Requests and failed ones: 5xx answers, and streams that broke off after their 200 (counted as 200s)."""
        total = errors = 0.0
        for labels, value in self.requests:
            if wanted(labels.get("route", "")):
                total += value
                if labels.get("status", "").startswith("5"):
                    errors += value
        if wanted(STREAM_ROUTE):
            errors += self.stream_errors
        return total, errors

    def duration_buckets(self, wanted: Callable[[str], bool]) -> tuple[list[float], tuple[float, ...]]:
        by_bound: dict[float, float] = {}
        for labels, value in self.buckets:
            if wanted(labels.get("route", "")):
                bound = float(labels["le"])
                by_bound[bound] = by_bound.get(bound, 0.0) + value
        bounds = sorted(by_bound)
        return bounds, tuple(by_bound[b] for b in bounds)

    def open_breakers(self) -> list[tuple[str, str]]:
        return [
            (labels.get("model", ""), labels.get("deployment", ""))
            for labels, value in self.breakers
            if labels.get("state") == "open" and value >= 1
        ]


def _quantile(q: float, bounds: list[float], cumulative: tuple[float, ...]) -> float:
    """PromQL's histogram_quantile on cumulative bucket counts (the last bound is +Inf)."""
    total = cumulative[-1]
    if total <= 0:
        return math.nan
    rank = q * total
    lower, below = 0.0, 0.0
    for bound, count in zip(bounds, cumulative, strict=True):
        if count >= rank:
            if math.isinf(bound):
                return lower  # in the +Inf bucket: the highest finite bound, as Prometheus answers
            inside = count - below
            return lower + (bound - lower) * ((rank - below) / inside if inside > 0 else 1.0)
        lower, below = bound, count
    return lower


def _describe(rule: AlertRuleConfig, value: float) -> str:
    if rule.kind == "error_rate":
        return f"{value:.1%} of requests failed in the last {rule.window_s:g}s (threshold {rule.threshold:.1%})"
    if rule.kind == "p95_latency":
        return f"p95 latency {value:.3g}s over the last {rule.window_s:g}s (threshold {rule.threshold:g}s)"
    if rule.kind == "breaker_open":
        return "circuit breaker open"
    return f"budget {value:.0%} spent (threshold {rule.threshold:.0%})"


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _number(value: float) -> str:
    return f"{value:g}"
