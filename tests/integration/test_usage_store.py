"""Usage rows on SQLite and PostgreSQL: reports equal the sums of the rows written, percentiles follow the
nearest-rank method, days are UTC dates, and the batched meter loses nothing on shutdown."""

from __future__ import annotations

import math
import random
from collections import defaultdict
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
import structlog.testing

from strata.cost.metering import UsageMeter
from strata.cost.records import UsageEvent
from strata.store.database import Database
from strata.store.usage import GROUP_BYS, UsageStore
from tests.support.databases import fresh_postgres, sqlite_url

T0 = datetime(2026, 11, 10, 12, 0, tzinfo=UTC)
WINDOW = (T0 - timedelta(days=30), T0 + timedelta(days=30))


@pytest.fixture(params=["sqlite", "postgresql"])
async def db(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Database]:
    async def opened(url: str) -> Database:
        database = Database(url)
        await database.upgrade()
        return database

    if request.param == "sqlite":
        with sqlite_url(tmp_path) as url:
            database = await opened(url)
            yield database
            await database.dispose()
    else:
        async with fresh_postgres() as url:
            database = await opened(url)
            yield database
            await database.dispose()


def event(n: int, **overrides: object) -> UsageEvent:
    fields: dict[str, object] = dict(
        ts=T0 + timedelta(minutes=n),
        request_id=f"req-{n}",
        kind="chat",
        model="m",
        prompt_tokens=10,
        completion_tokens=5,
        latency_s=0.1,
        cost_usd=0.001,
    )
    fields.update(overrides)
    return UsageEvent(**fields)  # type: ignore[arg-type]


def varied(count: int, seed: int = 7) -> list[UsageEvent]:
    rng = random.Random(seed)
    events = []
    for n in range(count):
        agent = rng.choice([None, "demo", "triage"])
        events.append(
            UsageEvent(
                ts=T0 + timedelta(hours=rng.randrange(-72, 72), seconds=rng.randrange(3600)),
                request_id=f"req-{n}",
                kind="run_step" if agent else "chat",
                model=rng.choice(["smollm2-135m", "gpt", "llama-3.1-8b"]),
                key_id=rng.choice([None, "key_a", "key_b", "key_c"]),
                user=rng.choice(["alice", "bob", "carol"]),
                agent=agent,
                run_id=f"run_{n}" if agent else None,
                prompt_tokens=rng.randrange(0, 5000),
                completion_tokens=rng.randrange(0, 800),
                cached_tokens=rng.randrange(0, 100),
                latency_s=round(rng.uniform(0.01, 20.0), 4),
                ttft_s=rng.choice([None, 0.05]),
                status=rng.choice([200] * 9 + [500, 429]),
                cost_usd=round(rng.uniform(0, 0.05), 9),
            )
        )
    return events


def group_of(event: UsageEvent, group_by: str) -> str | None:
    if group_by == "day":
        return event.ts.astimezone(UTC).strftime("%Y-%m-%d")
    return {"key": event.key_id, "user": event.user, "agent": event.agent, "model": event.model}[group_by]


def nearest_rank(values: Sequence[float], p: int) -> float:
    ordered = sorted(values)
    return ordered[math.ceil(p / 100 * len(ordered)) - 1]


async def test_reports_equal_the_sums_of_the_rows(db: Database) -> None:
    store = UsageStore(db)
    events = varied(1500)
    for start in range(0, len(events), 400):
        await store.append(events[start : start + 400])
    assert await store.count() == len(events)
    for group_by in GROUP_BYS:
        expected: dict[str | None, list[UsageEvent]] = defaultdict(list)
        for e in events:
            expected[group_of(e, group_by)].append(e)
        rows = await store.aggregate(group_by, *WINDOW)
        assert {row.group for row in rows} == set(expected), group_by
        for row in rows:
            mine = expected[row.group]
            assert row.requests == len(mine)
            assert row.errors == sum(e.status >= 400 for e in mine)
            assert row.prompt_tokens == sum(e.prompt_tokens for e in mine)
            assert row.completion_tokens == sum(e.completion_tokens for e in mine)
            assert row.cached_tokens == sum(e.cached_tokens for e in mine)
            assert row.cost_usd == pytest.approx(sum(e.cost_usd for e in mine), rel=1e-9)
            assert row.latency_p50_s == nearest_rank([e.latency_s for e in mine], 50)
            assert row.latency_p95_s == nearest_rank([e.latency_s for e in mine], 95)
        # every grouping adds up to the same whole
        assert sum(row.requests for row in rows) == len(events)
        assert sum(row.cost_usd for row in rows) == pytest.approx(sum(e.cost_usd for e in events), rel=1e-9)
    (total,) = await store.aggregate(None, *WINDOW)
    assert total.group is None
    assert total.requests == len(events)
    assert total.total_tokens == sum(e.total_tokens for e in events)
    assert total.latency_p95_s == nearest_rank([e.latency_s for e in events], 95)


async def test_days_come_in_order_other_groups_most_expensive_first(db: Database) -> None:
    store = UsageStore(db)
    await store.append(varied(300))
    days = [row.group for row in await store.aggregate("day", *WINDOW)]
    assert days == sorted(days)
    costs = [row.cost_usd for row in await store.aggregate("model", *WINDOW)]
    assert costs == sorted(costs, reverse=True)
    assert len(await store.aggregate("day", *WINDOW, limit=2)) == 2


async def test_percentiles_on_a_known_set(db: Database) -> None:
    store = UsageStore(db)
    await store.append([event(n, latency_s=float(n), model="hundred") for n in range(100, 0, -1)])
    await store.append([event(n, latency_s=n / 10, model="three") for n in (3, 1, 2)])
    await store.append([event(1, latency_s=4.2, model="one")])
    rows = {row.group: row for row in await store.aggregate("model", *WINDOW)}
    assert (rows["hundred"].latency_p50_s, rows["hundred"].latency_p95_s) == (50.0, 95.0)
    assert (rows["three"].latency_p50_s, rows["three"].latency_p95_s) == (0.2, 0.3)
    assert (rows["one"].latency_p50_s, rows["one"].latency_p95_s) == (4.2, 4.2)


async def test_window_filters_and_utc_days(db: Database) -> None:
    store = UsageStore(db)
    midnight = datetime(2026, 11, 11, tzinfo=UTC)
    paris = timezone(timedelta(hours=1))
    await store.append(
        [
            event(0, ts=midnight - timedelta(microseconds=1), user="alice"),  # 2026-11-10, last instant
            event(1, ts=midnight, user="alice"),  # 2026-11-11, first instant
            event(2, ts=datetime(2026, 11, 11, 0, 30, tzinfo=paris), user="bob"),  # 23:30 UTC on the 10th
            event(3, ts=midnight + timedelta(hours=5), user="bob", kind="run_step", agent="demo"),
        ]
    )
    days = {row.group: row.requests for row in await store.aggregate("day", *WINDOW)}
    assert days == {"2026-11-10": 2, "2026-11-11": 2}
    # since is included, until excluded
    (only,) = await store.aggregate(None, midnight, midnight + timedelta(hours=5))
    assert only.requests == 1
    assert await store.aggregate(None, midnight + timedelta(days=1), midnight + timedelta(days=2)) == []
    # a user's own usage, and one kind
    (alice,) = await store.aggregate("user", *WINDOW, user="alice")
    assert (alice.group, alice.requests) == ("alice", 2)
    (steps,) = await store.aggregate("agent", *WINDOW, kind="run_step")
    assert (steps.group, steps.requests) == ("demo", 1)


async def test_spent_per_key_user_and_agent(db: Database) -> None:
    store = UsageStore(db)
    await store.append(
        [
            event(0, key_id="key_a", user="alice", cost_usd=0.25, ts=T0 - timedelta(days=1)),
            event(1, key_id="key_a", user="alice", cost_usd=0.5, agent="demo"),
            event(2, key_id="key_b", user="alice", cost_usd=1.0, agent="demo"),
        ]
    )
    assert await store.spent("key", "key_a", T0 - timedelta(days=2)) == pytest.approx(0.75)
    assert await store.spent("key", "key_a", T0) == pytest.approx(0.5)
    assert await store.spent("user", "alice", T0) == pytest.approx(1.5)
    assert await store.spent("agent", "demo", T0, until=T0 + timedelta(minutes=2)) == pytest.approx(0.5)
    assert await store.spent("key", "nobody", T0) == 0.0


async def test_meter_writes_everything_on_stop(db: Database) -> None:
    store = UsageStore(db)
    meter = UsageMeter(store, batch=500, flush_interval_s=30.0)  # a long interval: stop() must do the work
    await meter.start()
    events = varied(5000, seed=11)
    for e in events:
        meter.record(e)  # never awaits
    await meter.stop()
    assert meter.pending == 0
    assert await store.count() == 5000
    (total,) = await store.aggregate(None, *WINDOW)
    assert total.requests == 5000
    assert total.cost_usd == pytest.approx(sum(e.cost_usd for e in events), rel=1e-9)
    assert total.prompt_tokens == sum(e.prompt_tokens for e in events)


async def test_meter_flush_and_batches(db: Database) -> None:
    store = UsageStore(db)
    batches: list[int] = []

    async def counting(events: Sequence[UsageEvent]) -> None:
        batches.append(len(events))
        await store.append(events)

    meter = UsageMeter(store, batch=100, flush_interval_s=30.0)
    meter._write = counting  # type: ignore[method-assign]
    await meter.start()
    for n in range(250):
        meter.record(event(n))
    await meter.flush()
    assert await store.count() == 250
    assert max(batches) <= 100 and len(batches) >= 3  # batched, never one round trip per row
    await meter.stop()


class FlakyStore(UsageStore):
    """Fails the first `failures` writes, as a database restarting would."""

    def __init__(self, db: Database, failures: int) -> None:
        super().__init__(db)
        self.failures = failures

    async def append(self, events: Sequence[UsageEvent]) -> None:
        if self.failures:
            self.failures -= 1
            raise ConnectionError("database restarting")
        await super().append(events)


async def test_meter_retries_until_written_in_order(db: Database) -> None:
    store = FlakyStore(db, failures=3)
    meter = UsageMeter(store, batch=50, flush_interval_s=0.01, retry_initial_s=0.01)
    await meter.start()
    for n in range(120):
        meter.record(event(n))
    await meter.stop()
    assert store.failures == 0
    assert await store.count() == 120


async def test_meter_keeps_rows_it_cannot_hold_in_the_log() -> None:
    class Down(UsageStore):
        async def append(self, events: Sequence[UsageEvent]) -> None:
            raise ConnectionError("database down")

    meter = UsageMeter(Down(None), max_queue=2, max_backlog=5, flush_interval_s=0.01, retry_initial_s=0.01)  # type: ignore[arg-type]
    await meter.start()
    with structlog.testing.capture_logs() as logs:
        for n in range(8):
            meter.record(event(n))  # never raises: a request is not refused for metering's sake
        assert meter.overloaded
        await meter.stop(timeout_s=0.2)
    kept = [entry for entry in logs if entry["log_level"] == "error"]
    assert len(kept) == 8  # 3 past the backlog at once, 5 at shutdown: each in full
    assert all('"request_id":"req-' in entry["item"] for entry in kept)
    assert meter.logged_instead == 8
