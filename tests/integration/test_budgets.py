"""Budgets: a hard budget stops a key at the right request, says which budget and when it resets; soft ones
alert once; two BudgetGuards on one Redis (two replicas) enforce one total; restarts keep what was spent."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from redis.asyncio import Redis

from strata.config import BudgetConfig, StrataConfig
from strata.cost.budgets import Budget, BudgetAlert, BudgetGuard, BudgetSubject, format_usd, period_bounds
from strata.cost.records import UsageEvent
from strata.security.principal import Principal
from strata.store.database import Database
from strata.store.usage import UsageStore
from tests.support.databases import sqlite_url

REDIS_URL = "redis://127.0.0.1:6379/0"
NOW = datetime(2026, 11, 15, 12, 0, tzinfo=UTC)
KEY = Principal(user="alice", role="user", via="key", key_id="key_abc")


class Clock:
    def __init__(self, now: datetime = NOW) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[UsageStore]:
    with sqlite_url(tmp_path) as url:
        db = Database(url)
        await db.upgrade()
        yield UsageStore(db)
        await db.dispose()


async def _redis_or_fail() -> Redis:
    admin = Redis.from_url(REDIS_URL)
    try:
        await admin.ping()
    except OSError as exc:  # redis-py's ConnectionError is an OSError
        await admin.aclose()
        raise RuntimeError(f"Redis is needed at {REDIS_URL} for this test (.ci/run starts it): {exc}") from exc
    return admin


async def _delete_namespace(admin: Redis, name: str) -> None:
    keys = [key async for key in admin.scan_iter(match=f"{name}:*")]
    if keys:
        await admin.delete(*keys)
    await admin.aclose()


@pytest.fixture
async def namespace() -> AsyncIterator[str]:
    """A key namespace of this test's own; its keys are deleted afterwards (never FLUSHALL)."""
    name = f"strata-test-budget-{uuid.uuid4().hex}"
    admin = await _redis_or_fail()
    yield name
    await _delete_namespace(admin, name)


GuardFactory = Callable[..., BudgetGuard]


@pytest.fixture(params=["memory", "redis"])
async def make_guard(request: pytest.FixtureRequest, store: UsageStore) -> AsyncIterator[GuardFactory]:
    """Builds guards on one backend; with Redis, all of them share one namespace, like replicas."""
    guards: list[BudgetGuard] = []
    namespace = f"strata-test-budget-{uuid.uuid4().hex}"
    admin = await _redis_or_fail() if request.param == "redis" else None

    def make(budgets: list[BudgetConfig | Budget] | None = None, **kwargs: object) -> BudgetGuard:
        kwargs.setdefault("clock", Clock())
        url = REDIS_URL if admin is not None else None
        guard = BudgetGuard(budgets or [], kwargs.pop("store", store), url, namespace=namespace, **kwargs)  # type: ignore[arg-type]
        guards.append(guard)
        return guard

    yield make
    for guard in guards:
        await guard.aclose()
    if admin is not None:
        await _delete_namespace(admin, namespace)


async def test_a_key_budget_stops_the_key_at_the_right_request(make_guard: GuardFactory) -> None:
    guard = make_guard()
    key = Principal(user="alice", role="user", via="key", key_id="key_abc", budget_usd=1.00)
    served = 0
    for _ in range(10):
        decision = await guard.check(key)
        if not decision.allowed:
            break
        served += 1
        await guard.spend(key, None, 0.34)
    # spent before each check: $0, $0.34, $0.68, $1.02: three requests served, the fourth refused
    assert served == 3
    assert decision.budget is not None and decision.budget.source == "key"
    assert decision.message == (
        "budget exceeded: key key_abc spent $1.02 of $1.00 this month; resets 2026-12-01T00:00:00Z"
    )
    assert decision.spent_usd == pytest.approx(1.02)
    assert decision.resets_at == datetime(2026, 12, 1, tzinfo=UTC)
    assert decision.retry_after_s == int((decision.resets_at - NOW).total_seconds())
    assert decision.headers == {"Retry-After": str(decision.retry_after_s)}


async def test_refused_exactly_when_spend_reaches_the_limit(make_guard: GuardFactory) -> None:
    guard = make_guard([BudgetConfig(scope="key", name="key_abc", period="day", limit_usd=1.0)])
    for n in range(10):  # ten spends of $0.10: floating point would sum to 0.9999999999999999
        assert (await guard.check(KEY)).allowed, n
        await guard.spend(KEY, None, 0.10)
    refused = await guard.check(KEY)
    assert not refused.allowed
    assert refused.message == "budget exceeded: key key_abc spent $1.00 of $1.00 this day; resets 2026-11-16T00:00:00Z"


async def test_periods_reset_at_utc_midnight_and_month_start(make_guard: GuardFactory) -> None:
    clock = Clock(datetime(2026, 11, 30, 23, 59, 59, tzinfo=UTC))
    guard = make_guard(
        [
            BudgetConfig(scope="user", name="alice", period="day", limit_usd=1.0),
            BudgetConfig(scope="agent", name="demo", period="month", limit_usd=2.0),
        ],
        clock=clock,
    )
    await guard.spend(KEY, "demo", 1.5)
    refused = await guard.check(KEY, "demo")
    assert not refused.allowed and refused.subject == "alice"
    assert refused.resets_at == datetime(2026, 12, 1, tzinfo=UTC)
    assert refused.retry_after_s == 1
    clock.now = datetime(2026, 12, 1, tzinfo=UTC)  # a new day and a new month: both counters start over
    assert (await guard.check(KEY, "demo")).allowed
    await guard.spend(KEY, "demo", 1.0)
    await guard.spend(KEY, None, 0.5)  # not the agent's: the user's day counter only
    decision = await guard.check(KEY, "demo")
    assert not decision.allowed
    assert decision.message == (
        "budget exceeded: user alice spent $1.50 of $1.00 this day; resets 2026-12-02T00:00:00Z"
    )


async def test_the_budget_that_lasts_longest_is_named(make_guard: GuardFactory) -> None:
    guard = make_guard(
        [
            BudgetConfig(scope="key", name="*", period="day", limit_usd=1.0),
            BudgetConfig(scope="user", name="alice", period="month", limit_usd=1.0),
        ]
    )
    await guard.spend(KEY, None, 1.0)
    decision = await guard.check(KEY)
    assert decision.budget is not None and (decision.budget.scope, decision.budget.period) == ("user", "month")


async def test_star_budgets_apply_to_each_subject_separately(make_guard: GuardFactory) -> None:
    guard = make_guard([BudgetConfig(scope="user", name="*", period="month", limit_usd=1.0)])
    bob = Principal(user="bob", role="user", via="jwt")
    await guard.spend(KEY, None, 1.0)
    assert not (await guard.check(KEY)).allowed
    assert (await guard.check(bob)).allowed  # bob's own budget is untouched
    other_key_same_user = Principal(user="alice", role="user", via="key", key_id="key_other")
    assert not (await guard.check(other_key_same_user)).allowed  # the user budget covers all alice's keys


async def test_agent_budgets_only_for_that_agents_work(make_guard: GuardFactory) -> None:
    guard = make_guard([BudgetConfig(scope="agent", name="demo", period="day", limit_usd=0.5)])
    await guard.spend(KEY, "demo", 0.5)
    assert not (await guard.check(KEY, "demo")).allowed
    assert (await guard.check(KEY, "other")).allowed
    assert (await guard.check(KEY)).allowed  # a plain chat completion


async def test_soft_budget_alerts_once_per_period(make_guard: GuardFactory) -> None:
    alerts: list[BudgetAlert] = []
    clock = Clock()
    guard = make_guard(
        [BudgetConfig(scope="key", name="key_abc", period="day", limit_usd=0.5, kind="soft")],
        on_soft_limit=alerts.append,
        clock=clock,
    )
    for _ in range(6):
        assert (await guard.check(KEY)).allowed  # soft: never refuses
        await guard.spend(KEY, None, 0.2)
    assert len(alerts) == 1
    alert = alerts[0]
    assert (alert.kind, alert.subject, alert.spent_usd) == ("soft", "key_abc", pytest.approx(0.6))
    assert (
        alert.message == "budget reached: soft key key_abc spent $0.60 of $0.50 this day; resets 2026-11-16T00:00:00Z"
    )
    clock.now += timedelta(days=1)
    for _ in range(3):
        await guard.spend(KEY, None, 0.2)
    assert len(alerts) == 2  # once more in the next period


async def test_async_alert_callbacks_and_hard_alerts(make_guard: GuardFactory) -> None:
    seen: list[str] = []

    async def on_hard(alert: BudgetAlert) -> None:
        await asyncio.sleep(0)
        seen.append(alert.message)

    guard = make_guard([BudgetConfig(scope="key", name="*", period="month", limit_usd=1.0)], on_hard_limit=on_hard)
    guard.spend_soon(KEY, None, 0.6)
    guard.spend_soon(KEY, None, 0.6)
    await guard.aclose()  # waits for spends in flight (and the callbacks they started)
    await asyncio.sleep(0.01)
    assert seen == ["budget reached: key key_abc spent $1.20 of $1.00 this month; resets 2026-12-01T00:00:00Z"]


async def test_a_restart_does_not_reset_spending(make_guard: GuardFactory, store: UsageStore) -> None:
    await store.append(
        [
            UsageEvent(ts=NOW - timedelta(days=3), request_id="r1", kind="chat", model="m", prompt_tokens=1,
                       completion_tokens=1, latency_s=0.1, cost_usd=0.7, key_id="key_abc", user="alice"),
            UsageEvent(ts=NOW - timedelta(days=40), request_id="r0", kind="chat", model="m", prompt_tokens=1,
                       completion_tokens=1, latency_s=0.1, cost_usd=5.0, key_id="key_abc", user="alice"),
        ]
    )  # fmt: skip
    guard = make_guard([BudgetConfig(scope="key", name="key_abc", period="month", limit_usd=1.0)])
    assert (await guard.check(KEY)).allowed  # last month's $5 does not count
    await guard.spend(KEY, None, 0.3)
    decision = await guard.check(KEY)
    assert not decision.allowed and decision.spent_usd == pytest.approx(1.0)


async def test_no_budget_no_work(make_guard: GuardFactory) -> None:
    class NoStore(UsageStore):
        async def spent(self, *args: object, **kwargs: object) -> float:
            raise AssertionError("no budget applies: nothing to read")

    guard = make_guard(store=NoStore(None))  # type: ignore[arg-type]
    assert (await guard.check(KEY)).allowed
    await guard.spend(KEY, "demo", 10.0)
    assert (await guard.check(KEY, "demo")).allowed


async def test_two_replicas_enforce_one_total(namespace: str, store: UsageStore) -> None:
    budgets = [
        BudgetConfig(scope="key", name="key_abc", period="month", limit_usd=1.0),
        BudgetConfig(scope="key", name="key_abc", period="month", limit_usd=0.5, kind="soft"),
    ]
    alerts: list[BudgetAlert] = []
    a, b = (
        BudgetGuard(budgets, store, REDIS_URL, namespace=namespace, clock=Clock(), on_soft_limit=alerts.append)
        for _ in range(2)
    )
    try:
        # 20 spends of $0.05 split over both replicas, concurrently: one counter sees all of them
        await asyncio.gather(*(replica.spend(KEY, None, 0.05) for _ in range(10) for replica in (a, b)))
        for replica in (a, b):
            decision = await replica.check(KEY)
            assert not decision.allowed
            assert decision.spent_usd == pytest.approx(1.0)
        assert len(alerts) == 1  # exactly one spend crossed $0.50, on one replica
    finally:
        await a.aclose()
        await b.aclose()


async def test_replicas_refuse_at_the_right_request(namespace: str, store: UsageStore) -> None:
    budgets = [BudgetConfig(scope="key", name="*", period="day", limit_usd=1.0)]
    a, b = (BudgetGuard(budgets, store, REDIS_URL, namespace=namespace, clock=Clock()) for _ in range(2))
    try:
        served = 0
        for n in range(20):
            replica = (a, b)[n % 2]  # a load balancer alternating between replicas
            if not (await replica.check(KEY)).allowed:
                break
            served += 1
            await replica.spend(KEY, None, 0.25)
        assert served == 4
    finally:
        await a.aclose()
        await b.aclose()


async def test_redis_counters_are_seeded_from_the_usage_table(namespace: str, store: UsageStore) -> None:
    await store.append(
        [UsageEvent(ts=NOW - timedelta(hours=1), request_id="r", kind="chat", model="m", prompt_tokens=1,
                    completion_tokens=1, latency_s=0.1, cost_usd=2.0, key_id="key_abc")]
    )  # fmt: skip
    guard = BudgetGuard(
        [BudgetConfig(scope="key", name="key_abc", limit_usd=1.0)], store, REDIS_URL, namespace=namespace, clock=Clock()
    )
    try:
        decision = await guard.check(KEY)
        assert not decision.allowed and decision.spent_usd == pytest.approx(2.0)
        admin = Redis.from_url(REDIS_URL)
        ttl = await admin.ttl(f"{namespace}:budget:key:key_abc:2026-11")
        await admin.aclose()
        assert ttl > 0  # counters expire (a day after their period ends)
    finally:
        await guard.aclose()


async def test_a_wave_of_requests_seeds_a_counter_with_one_read(make_guard: GuardFactory, store: UsageStore) -> None:
    """The period's first requests arrive together: one usage-table read starts the counter, not one each."""
    reads = 0
    gate = asyncio.Event()

    class SlowStore(UsageStore):
        async def spent(self, *args: object, **kwargs: object) -> float:
            nonlocal reads
            reads += 1
            await gate.wait()
            return 0.25

    guard = make_guard([BudgetConfig(scope="key", name="key_abc", period="month", limit_usd=1.0)],
                       store=SlowStore(store.db))  # fmt: skip
    waiting = [asyncio.create_task(guard.check(KEY)) for _ in range(50)]
    await asyncio.sleep(0.05)
    gate.set()
    decisions = await asyncio.gather(*waiting)
    assert all(d.allowed for d in decisions)
    assert reads == 1


async def test_budgets_fail_open_when_redis_is_down(store: UsageStore) -> None:
    guard = BudgetGuard(
        [BudgetConfig(scope="key", name="*", limit_usd=0.01)], store, "redis://127.0.0.1:9/0", clock=Clock()
    )
    try:
        assert (await guard.check(KEY)).allowed
        await guard.spend(KEY, None, 5.0)  # logged, never raised
        assert (await guard.check(KEY)).allowed
    finally:
        await guard.aclose()


def test_guard_from_config_and_helpers() -> None:
    config = StrataConfig.model_validate({"cost": {"budgets": [{"scope": "agent", "name": "demo", "limit_usd": 3}]}})
    guard = BudgetGuard.from_config(config, None)
    assert guard.budgets == [Budget("agent", "demo", "month", 3.0, "hard")]
    assert BudgetSubject.of(KEY, "demo") == BudgetSubject("key_abc", "alice", "demo", None)
    assert period_bounds("month", datetime(2026, 12, 31, 23, tzinfo=UTC)) == (
        datetime(2026, 12, 1, tzinfo=UTC),
        datetime(2027, 1, 1, tzinfo=UTC),
    )
    assert [format_usd(v) for v in (0, 1.015, 1234.5, 0.000123)] == ["$0.00", "$1.01", "$1,234.50", "$0.000123"]
