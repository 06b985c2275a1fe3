"""Leases on the store's injected clock: expiry, sweep, takeover and fencing, without waiting for any of them."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from strata.store.database import Database
from strata.store.run_journal import RunBatch
from strata.store.runs import LeaseLost, RunStore
from strata.store.tables import Run


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2030, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[tuple[RunStore, Clock]]:
    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'strata.db'}")
    await db.upgrade()
    clock = Clock()
    runs = RunStore(db, clock=clock)
    yield runs, clock
    await runs.close()
    await db.dispose()


async def queued_run(store: RunStore) -> str:
    session = await store.create_session("agent", None)
    run, _ = await store.create_run(
        session_id=session.id, agent="agent", agent_version=1, owner=None,
        input_message={"role": "user", "content": "hi"}, idempotency_key=None, timeout_s=600,
    )  # fmt: skip
    return run.id


async def test_a_lease_heartbeated_in_time_holds_and_one_let_lapse_moves_to_the_next_worker(
    store: tuple[RunStore, Clock],
) -> None:
    runs, clock = store
    run_id = await queued_run(runs)
    first = await runs.claim("worker_a.1", lease_s=10)
    assert first is not None and first.id == run_id
    clock.advance(9)
    assert await runs.sweep_expired() == 0
    assert (await runs.heartbeat(run_id, "worker_a.1", 10)).alive  # now held until t+19
    clock.advance(9)
    assert await runs.sweep_expired() == 0, "the heartbeat extended the lease"
    clock.advance(2)  # t+20: a worker that stopped heartbeating at t+9 has lost it
    assert await runs.sweep_expired() == 1
    assert not (await runs.heartbeat(run_id, "worker_a.1", 10)).alive
    second = await runs.claim("worker_b.1", lease_s=10)
    assert second is not None and (second.id, second.attempts) == (run_id, 2)
    batch = RunBatch()
    batch.add_event("step.started", {"turn": 0})
    with pytest.raises(LeaseLost):  # the first worker, back from a pause, is fenced out
        await runs.commit(first, "worker_a.1", 10, batch)
    batch = RunBatch()
    batch.add_event("step.started", {"turn": 0})
    await runs.commit(second, "worker_b.1", 10, batch)  # the holder writes, and its write extends the lease
    clock.advance(9)
    assert await runs.sweep_expired() == 0
    fresh = await runs.get_run(run_id)
    assert fresh is not None and isinstance(fresh, Run) and fresh.lease_owner == "worker_b.1"


async def test_a_sweep_with_nothing_expired_does_not_wait_for_the_write_lock(
    store: tuple[RunStore, Clock], tmp_path: Path
) -> None:
    """The request path holding SQLite's one write lock (here: another connection's open write transaction) does
    not make a sweep that has nothing to do wait out busy_timeout and fail with `database is locked`."""
    runs, _ = store
    writer = sqlite3.connect(tmp_path / "strata.db", isolation_level=None)
    try:
        writer.execute("BEGIN IMMEDIATE")
        assert await runs.sweep_expired() == 0
    finally:
        writer.execute("ROLLBACK")
        writer.close()
