"""A row the database refuses for its content (a NUL character on PostgreSQL, a lone surrogate anywhere) never
holds up the background writers, on SQLite and PostgreSQL: the rest of its batch and every batch after it are
written, the bad row is set aside (counted, and for usage logged once in full), and shutdown does not wait on it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import structlog.testing

from strata.config import TracingConfig
from strata.cost.metering import UsageMeter
from strata.cost.records import UsageEvent
from strata.observability.tracing import Tracing
from strata.store.database import Database
from strata.store.usage import UsageStore
from tests.support.databases import migrated

T0 = datetime(2026, 11, 10, 12, 0, tzinfo=UTC)
LONE_SURROGATE = "\udfff"  # no UTF-8 encoder takes it: refused on both databases
NUL = "\x00"  # PostgreSQL refuses it in text and JSON; SQLite stores it


@pytest.fixture(params=["sqlite", "postgresql"])
async def db(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Database]:
    async with migrated(request.param, tmp_path) as database:
        yield database


def refused(db: Database, *values: str) -> list[str]:
    """The values this database refuses."""
    return [v for v in values if v == LONE_SURROGATE or db.url.get_backend_name() == "postgresql"]


def usage(n: int, model: str = "m") -> UsageEvent:
    return UsageEvent(
        ts=T0 + timedelta(seconds=n), request_id=f"req-{n}", kind="chat", model=model,
        prompt_tokens=10, completion_tokens=5, latency_s=0.1, cost_usd=0.001,
    )  # fmt: skip


async def test_the_usage_meter_sets_a_refused_row_aside_and_writes_the_rest(db: Database) -> None:
    store = UsageStore(db)
    meter = UsageMeter(store, batch=50, flush_interval_s=0.01, retry_initial_s=0.01)
    await meter.start()
    bad = {3: f"m1{NUL}", 11: f"m2{LONE_SURROGATE}"}
    with structlog.testing.capture_logs() as logs:
        for n in range(20):
            meter.record(usage(n, bad.get(n, "m")))
        await asyncio.wait_for(meter.flush(), 20)
        expected = len(refused(db, NUL, LONE_SURROGATE))
        assert await store.count() == 20 - expected
        assert meter.rejected == expected
        meter.record(usage(99))  # the writer goes on
        await asyncio.wait_for(meter.flush(), 20)
        assert await store.count() == 21 - expected
        await asyncio.wait_for(meter.stop(), 10)  # nothing left that could hold shutdown up
    set_aside = [entry for entry in logs if "set aside" in entry["event"]]
    assert len(set_aside) == expected, "each refused row is logged once"
    assert all("req-3" in entry["item"] or "req-11" in entry["item"] for entry in set_aside)
    assert not [entry for entry in logs if "retrying" in entry["event"]], "a refused row is not an outage"


async def test_a_span_the_trace_store_refuses_is_dropped_alone(db: Database) -> None:
    tracing = Tracing.from_config(TracingConfig())
    await tracing.start(db)
    assert tracing.store is not None
    names = ["good one", f"bad{NUL}", "good two", f"worse{LONE_SURROGATE}", "good three"]
    with tracing.span("root") as root:
        for name in names:
            with tracing.span(name):
                pass
    await asyncio.wait_for(tracing.flush(), 20)
    trace_id = f"{root.get_span_context().trace_id:032x}"
    stored = sorted(span.name for span in await tracing.store.trace(trace_id))
    dropped = refused(db, NUL, LONE_SURROGATE)
    assert stored == sorted(["root", *(n for n in names if not any(v in n for v in dropped))])
    assert tracing.spans_rejected == len(dropped)
    await asyncio.wait_for(tracing.shutdown(), 10)
