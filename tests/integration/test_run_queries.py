"""The list queries' keyset pages on SQLite and PostgreSQL: rows that share a creation time (common under
load, and on coarse clocks) are each listed once, in a fixed order, across page boundaries."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from strata.store.database import Database
from strata.store.pages import Page, Position
from strata.store.run_queries import RunFilter, RunQueries
from strata.store.spans import SpanRecord, SpanStore
from strata.store.tables import Run
from tests.support.databases import migrated

T0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


@pytest.fixture(params=["sqlite", "postgresql"])
async def db(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Database]:
    async with migrated(request.param, tmp_path) as database:
        yield database


def run_row(run_id: str, created_at: datetime, owner: str = "ada", status: str = "completed") -> Run:
    return Run(
        id=run_id, session_id="sess_1", agent="helper", agent_version=1, owner=owner, status=status,
        input={"role": "user", "content": "hi"}, approvals={}, created_at=created_at,
        deadline_at=created_at + timedelta(minutes=1),
    )  # fmt: skip


async def every_page(read: Any, limit: int) -> list[Any]:
    items: list[Any] = []
    after: Position | None = None
    while True:
        page: Page[Any] = await read(limit, after)
        items += page.items
        if page.next is None:
            return items
        after = page.next


async def test_runs_with_the_same_creation_time_are_each_listed_once(db: Database) -> None:
    # Five runs in the same microsecond (ids out of order), then two later ones, and one of another user.
    ids = ["run_c", "run_a", "run_e", "run_b", "run_d"]
    async with db.transaction() as tx:
        tx.add_all([run_row(i, T0) for i in ids])
        tx.add_all([run_row("run_x", T0 + timedelta(microseconds=1)), run_row("run_y", T0 + timedelta(seconds=1))])
        tx.add(run_row("run_bob", T0, owner="bob"))
    queries = RunQueries(db)
    listed = await every_page(lambda n, after: queries.runs(RunFilter(owner="ada"), n, after), 2)
    assert [r.id for r in listed] == ["run_y", "run_x", "run_e", "run_d", "run_c", "run_b", "run_a"]
    failed = await queries.runs(RunFilter(statuses=["failed", "queued"]), 10)
    assert failed.items == [] and failed.next is None
    window = await queries.runs(RunFilter(since=T0 + timedelta(microseconds=1), until=T0 + timedelta(seconds=1)), 10)
    assert [r.id for r in window.items] == ["run_x"]


async def test_traces_that_start_together_are_each_listed_once(db: Database) -> None:
    store = SpanStore(db)
    start = 1_764_590_400_000_000_000
    spans = [
        SpanRecord(f"{t:032x}", f"{t:016x}", None, f"POST /t{t}", "server", start, start + 1000, owner="ada")
        for t in range(1, 6)
    ]
    child = SpanRecord(f"{3:032x}", "c" * 16, f"{3:016x}", "chat m", "client", start + 10, start + 20, "error",
                       run_id="run_3", owner="ada")  # fmt: skip
    await store.append(
        [*spans, child, SpanRecord("f" * 32, "f" * 16, None, "bob's", "server", start, start + 5, owner="bob")]
    )
    listed = await every_page(lambda n, after: store.recent(n, after, owner="ada"), 2)
    assert [t.trace_id for t in listed] == [f"{t:032x}" for t in range(5, 0, -1)]
    third = listed[2]
    assert (third.root.name, third.spans, third.errors, third.run_ids) == ("POST /t3", 2, 1, ["run_3"])
    everyone = await store.recent(10)
    assert len(everyone.items) == 6
