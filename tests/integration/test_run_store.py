"""The run store's guarantees, on SQLite and on PostgreSQL: claims never overlap, a session's runs
go one at a time, a worker that lost its lease cannot write, idempotency keys hold under races."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from strata.agents.worker import RunWorker
from strata.store.database import Database
from strata.store.runs import LeaseLost, RunStore
from strata.store.tables import Run
from tests.support.databases import fresh_postgres, sqlite_url


@pytest.fixture(params=["sqlite", "postgresql"])
async def db(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Database]:
    if request.param == "sqlite":
        with sqlite_url(tmp_path) as url:
            database = Database(url)
            await database.upgrade()
            yield database
            await database.dispose()
    else:
        async with fresh_postgres() as url:
            database = Database(url)
            await database.upgrade()
            yield database
            await database.dispose()


async def new_run(store: RunStore, session_id: str | None = None, key: str | None = None) -> str:
    if session_id is None:
        session_id = (await store.create_session("agent", None)).id
    run, _ = await store.create_run(
        session_id=session_id,
        agent="agent",
        agent_version=1,
        owner=None,
        input_message={"role": "user", "content": "hi"},
        idempotency_key=key,
        timeout_s=60,
    )
    return run.id


async def test_migrations_are_idempotent(db: Database) -> None:
    await db.upgrade()  # a second start (or a second replica) finds nothing to do
    await db.upgrade()


async def test_concurrent_workers_never_claim_the_same_run(db: Database) -> None:
    store = RunStore(db)
    created = {await new_run(store) for _ in range(30)}
    claimed: dict[str, list[str]] = {"a": [], "b": [], "c": []}

    async def worker(owner: str) -> None:
        while (run := await store.claim(owner, lease_s=30)) is not None:
            claimed[owner].append(run.id)

    await asyncio.gather(*(worker(owner) for owner in claimed))
    everything = [run_id for runs in claimed.values() for run_id in runs]
    assert sorted(everything) == sorted(created)  # each run claimed exactly once


async def test_a_worker_claims_only_runs_of_models_its_replica_serves(db: Database) -> None:
    store = RunStore(db)
    session = (await store.create_session("agent", None)).id
    run, _ = await store.create_run(session_id=session, agent="agent", agent_version=1, owner=None,
                                    input_message={"role": "user", "content": "hi"}, idempotency_key=None,
                                    timeout_s=60, model="new-model")  # fmt: skip
    assert await store.claim("w", lease_s=30, models=["other-model"]) is None
    assert await store.claim("w", lease_s=30, models=[]) is None
    claimed = await store.claim("w", lease_s=30, models=["other-model", "new-model"])
    assert claimed is not None and claimed.id == run.id
    unrecorded = await new_run(store)  # runs stored before runs had a model: any replica takes them
    claimed = await store.claim("w", lease_s=30, models=["other-model"])
    assert claimed is not None and claimed.id == unrecorded
    # A run no replica serves waits until its deadline; then any worker takes it (and fails it: timeout).
    session = (await store.create_session("agent", None)).id
    late, _ = await store.create_run(session_id=session, agent="agent", agent_version=1, owner=None,
                                     input_message={"role": "user", "content": "hi"}, idempotency_key=None,
                                     timeout_s=0.2, model="gone-model")  # fmt: skip
    assert await store.claim("w", lease_s=30, models=["other-model"]) is None
    await asyncio.sleep(0.3)
    claimed = await store.claim("w", lease_s=30, models=["other-model"])
    assert claimed is not None and claimed.id == late.id


async def test_a_sessions_runs_are_claimed_in_order_one_at_a_time(db: Database) -> None:
    store = RunStore(db)
    session = (await store.create_session("agent", None)).id
    first = await new_run(store, session)
    second = await new_run(store, session)
    claimed = await store.claim("w", lease_s=30)
    assert claimed is not None and claimed.id == first
    assert await store.claim("w", lease_s=30) is None  # the second waits for the first
    async with store.unit(run_id=first, owner="w", lease_s=30) as unit:
        run = await unit.tx.get(type(claimed), first)
        run.status = "completed"
    claimed = await store.claim("w", lease_s=30)
    assert claimed is not None and claimed.id == second


async def test_a_worker_that_lost_its_lease_cannot_write(db: Database) -> None:
    store = RunStore(db)
    run_id = await new_run(store)
    assert (await store.claim("old", lease_s=0.2)) is not None
    await asyncio.sleep(0.4)
    assert await store.sweep_expired() == 1
    taken = await store.claim("new", lease_s=30)
    assert taken is not None and taken.id == run_id and taken.attempts == 2
    with pytest.raises(LeaseLost):
        async with store.unit(run_id=run_id, owner="old", lease_s=30) as unit:
            await unit.add_event(run_id, "should.not.land", {})
    assert not (await store.heartbeat(run_id, "old", 30)).alive
    assert (await store.heartbeat(run_id, "new", 30)).alive
    assert [e.type for e in await store.events_after(run_id, 0)] == ["run.created"]


async def test_a_worker_claiming_a_run_again_fences_its_own_stale_execution(db: Database) -> None:
    """A run whose lease expired (its execution stalled) can be claimed again by the same worker process: the
    stale execution must not be able to write next to the new one (duplicate tool calls, interleaved messages)."""
    store = RunStore(db)
    run_id = await new_run(store)
    worker = RunWorker(store, None, concurrency=1, lease_s=0.2, poll_s=60)  # type: ignore[arg-type]
    stale = await store.claim(worker.claim_token(), lease_s=0.2)
    assert stale is not None and stale.lease_owner is not None
    await asyncio.sleep(0.4)
    assert await store.sweep_expired() == 1
    fresh = await store.claim(worker.claim_token(), lease_s=30)
    assert fresh is not None and fresh.id == run_id and fresh.lease_owner is not None
    assert stale.lease_owner.startswith(worker.owner) and fresh.lease_owner.startswith(worker.owner)
    with pytest.raises(LeaseLost):
        async with store.unit(run_id=run_id, owner=stale.lease_owner, lease_s=30) as unit:
            await unit.add_event(run_id, "should.not.land", {})
    assert not (await store.heartbeat(run_id, stale.lease_owner, 30)).alive
    assert (await store.heartbeat(run_id, fresh.lease_owner, 30)).alive


async def test_cancel_of_a_running_run_reaches_its_heartbeat(db: Database) -> None:
    store = RunStore(db)
    run_id = await new_run(store)
    await store.claim("w", lease_s=30)
    assert not (await store.heartbeat(run_id, "w", 30)).cancel_requested
    await store.request_cancel(run_id)
    assert (await store.heartbeat(run_id, "w", 30)).cancel_requested


async def test_a_queued_run_is_cancelled_at_once(db: Database) -> None:
    store = RunStore(db)
    run_id = await new_run(store)
    run = await store.request_cancel(run_id)
    assert run is not None and run.status == "cancelled"
    assert await store.claim("w", lease_s=30) is None
    assert [e.type for e in await store.events_after(run_id, 0)] == ["run.created", "run.cancelled"]


async def test_idempotency_key_holds_under_a_race(db: Database) -> None:
    store = RunStore(db)
    session = (await store.create_session("agent", None)).id
    ids = await asyncio.gather(*(new_run(store, session, key="same-key") for _ in range(8)))
    assert len(set(ids)) == 1


async def test_event_numbers_stay_gapless_under_concurrent_writers(db: Database) -> None:
    store = RunStore(db)
    run_id = await new_run(store)

    async def write(n: int) -> None:
        async with store.unit() as unit:
            await unit.add_event(run_id, "tick", {"n": n})

    await asyncio.gather(*(write(n) for n in range(20)))
    assert [e.seq for e in await store.events_after(run_id, 0)] == list(range(1, 22))


async def test_concurrent_approvals_of_two_calls_both_count(db: Database) -> None:
    store = RunStore(db)
    for _ in range(5):
        run_id = await new_run(store)
        async with store.unit() as unit:
            run = await unit.tx.get(Run, run_id)
            assert run is not None
            run.status = "awaiting_approval"
            run.pending_approval = [
                {"id": "a", "name": "t", "arguments": "{}"},
                {"id": "b", "name": "t", "arguments": "{}"},
            ]
        await asyncio.gather(
            store.set_approvals(run_id, {"a": {"decision": "approve"}}),
            store.set_approvals(run_id, {"b": {"decision": "deny"}}),
        )
        final = await store.get_run(run_id)
        assert final is not None
        assert set(final.approvals) == {"a", "b"}, "one approval overwrote the other"
        assert final.status == "queued"


async def test_a_run_created_claimed_is_leased_like_a_claimed_one(db: Database) -> None:
    """The hand-off: a run created already claimed by a worker is what `claim` would have made it, so a dead
    worker's lease expires, the run is swept back to the queue and another worker resumes it (attempt 2)."""
    store = RunStore(db)
    session = store.new_session("agent", None)
    run, created = await store.create_run(
        session_id=session.id,
        agent="agent",
        agent_version=1,
        owner=None,
        input_message={"role": "user", "content": "hi"},
        idempotency_key=None,
        timeout_s=60,
        new_session=session,
        claim_for=("w1", 0.05),
    )
    assert created
    stored = await store.get_run(run.id)
    assert stored is not None
    assert (stored.status, stored.lease_owner, stored.attempts) == ("running", "w1", 1)
    assert stored.started_at is not None and stored.lease_expires_at is not None
    assert await store.claim("w2", lease_s=30) is None, "a run created claimed is never claimed twice"
    assert (await store.heartbeat(run.id, "w1", 0.05)).alive
    await asyncio.sleep(0.1)  # w1 died: its lease expires
    assert await store.sweep_expired() == 1
    resumed = await store.claim("w2", lease_s=30)
    assert resumed is not None and (resumed.id, resumed.attempts, resumed.lease_owner) == (run.id, 2, "w2")
    assert not (await store.heartbeat(run.id, "w1", 30)).alive


async def test_only_a_run_opening_a_session_is_created_claimed(db: Database) -> None:
    store = RunStore(db)
    session = await store.create_session("agent", None)
    with pytest.raises(ValueError):
        await store.create_run(
            session_id=session.id,
            agent="agent",
            agent_version=1,
            owner=None,
            input_message={"role": "user", "content": "hi"},
            idempotency_key=None,
            timeout_s=60,
            claim_for=("w1", 30),
        )
