"""The run engine's batched writes (`RunStore.commit`), on SQLite and on PostgreSQL: one transaction that is
fenced on the lease, numbers events and messages without gaps next to other writers, restarts a step left
`started`, and ends a run."""

from __future__ import annotations

import asyncio
import secrets
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from strata.security.encryption import Keyring
from strata.store.database import Database
from strata.store.run_journal import Committed, JournalClosed, RunBatch
from strata.store.runs import LeaseLost, RunStore, StoredEvent
from strata.store.tables import Run
from tests.integration.test_encryption_at_rest import stored_values
from tests.support.databases import fresh_postgres, sqlite_url


@asynccontextmanager
async def database(kind: str, directory: Path, keyring: Keyring | None = None) -> AsyncIterator[Database]:
    if kind == "sqlite":
        with sqlite_url(directory) as url:
            db = Database(url, keyring=keyring)
            await db.upgrade()
            yield db
            await db.dispose()
    else:
        async with fresh_postgres() as url:
            db = Database(url, keyring=keyring)
            await db.upgrade()
            yield db
            await db.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[RunStore]:
    async with database(request.param, tmp_path) as db:
        runs = RunStore(db)
        yield runs
        await runs.close()


async def claimed(store: RunStore, owner: str = "w1") -> Run:
    session = await store.create_session("agent", None)
    await store.create_run(
        session_id=session.id,
        agent="agent",
        agent_version=1,
        owner=None,
        input_message={"role": "user", "content": "hi"},
        idempotency_key=None,
        timeout_s=60,
    )
    run = await store.claim(owner, lease_s=30)
    assert run is not None
    return run


async def test_a_batch_writes_messages_events_steps_and_counters_at_once(store: RunStore) -> None:
    published: list[StoredEvent] = []
    store._publish = published.append
    run = await claimed(store)
    first = RunBatch()
    first.add_message(run.session_id, run.id, {"role": "user", "content": "hi"})
    first.start_step(turn=0, kind="model", name="m", input_={"messages": 1})
    first.add_event("step.started", {"turn": 0})
    await store.commit(run, "w1", 30, first)

    async with store.unit() as unit:  # another writer between two batches: numbers stay gapless
        await unit.add_event(run.id, "run.waiting", {})

    second = RunBatch()
    second.count(steps_taken=1, prompt_tokens=5, completion_tokens=2, cost_usd=0.5)
    second.complete_step(turn=0, kind="model", output={"role": "assistant", "content": "yo"}, prompt_tokens=5)
    answer = second.add_message(run.session_id, run.id, {"role": "assistant", "content": "yo"})
    second.add_event("message.completed", {"turn": 0})
    second.add_event("tool.called", {"call_id": "c1"})
    await store.commit(run, "w1", 30, second)

    assert answer.seq == 2
    events = await store.events_after(run.id, 0)
    assert [(e.seq, e.type) for e in events] == [
        (1, "run.created"), (2, "step.started"), (3, "run.waiting"), (4, "message.completed"), (5, "tool.called"),
    ]  # fmt: skip
    assert [e.seq for e in published] == [1, 2, 3, 4, 5]  # each published once committed, in order
    assert [(m.seq, m.role) for m in await store.messages(run.session_id)] == [(1, "user"), (2, "assistant")]
    [step] = await store.steps(run.id)
    assert (step.status, step.output, step.prompt_tokens, step.finished_at is not None) == (
        "completed", {"role": "assistant", "content": "yo"}, 5, True,
    )  # fmt: skip
    stored = await store.get_run(run.id)
    assert stored is not None
    assert (stored.steps_taken, stored.prompt_tokens, stored.completion_tokens, stored.cost_usd) == (1, 5, 2, 0.5)
    assert stored.next_event_seq == run.next_event_seq == 5


async def test_a_worker_that_lost_its_lease_cannot_commit(store: RunStore) -> None:
    run = await claimed(store)
    await store.release(run.id, "w1")  # the run went back to the queue; another worker may take it
    batch = RunBatch()
    batch.add_message(run.session_id, run.id, {"role": "user", "content": "hi"})
    batch.add_event("run.started", {})
    with pytest.raises(LeaseLost):
        await store.commit(run, "w1", 30, batch)
    assert await store.messages(run.session_id) == []
    assert [e.type for e in await store.events_after(run.id, 0)] == ["run.created"]


async def test_a_step_started_again_counts_an_attempt(store: RunStore) -> None:
    run = await claimed(store)
    for _ in range(2):  # the second time: a resumed run starts the call its crashed worker had started
        batch = RunBatch()
        batch.start_step(turn=0, kind="tool", name="record", call_id="c1", idempotency_key=f"{run.id}:0:c1")
        await store.commit(run, "w1", 30, batch)
    [step] = await store.steps(run.id)
    assert (step.status, step.attempts, step.idempotency_key) == ("started", 2, f"{run.id}:0:c1")


async def test_ending_a_run_releases_it_for_good(store: RunStore) -> None:
    run = await claimed(store)
    batch = RunBatch()
    batch.end("completed", None, "the answer")
    await store.commit(run, "w1", 30, batch)
    stored = await store.get_run(run.id)
    assert stored is not None
    assert (stored.status, stored.output, stored.lease_owner, stored.finished_at is not None) == (
        "completed", "the answer", None, True,
    )  # fmt: skip
    assert run.status == "completed"
    events = await store.events_after(run.id, 0)
    assert (events[-1].type, events[-1].data) == ("run.completed", {"status": "completed", "reason": None,
                                                                    "output": "the answer"})  # fmt: skip
    with pytest.raises(LeaseLost):  # ended: nothing more may be written by its worker
        await store.commit(run, "w1", 30, _one_event())


async def test_a_run_stopped_while_its_step_is_written_keeps_the_step_and_bills_it(store: RunStore) -> None:
    """Shutdown (or a cancel, or the run's timeout) cancels the run's task while a batch is being written: the
    write still lands, and only then does the worker see the cancellation, so the run is released after it (the
    tool's result is kept: the call does not run again on resume), the events reach followers and the model
    step's usage is settled, matching what the run's counters say."""
    published: list[StoredEvent] = []
    store._publish = published.append
    run = await claimed(store)
    started = RunBatch()
    started.start_step(turn=0, kind="tool", name="charge", call_id="c1", idempotency_key=f"{run.id}:0:c1")
    await store.commit(run, "w1", 30, started)

    writing, proceed = asyncio.Event(), asyncio.Event()
    write = store._journal.write

    async def slow_write(*args: object) -> Committed:  # a write held up (a busy database) until the test says
        writing.set()
        await proceed.wait()
        return await write(*args)  # type: ignore[arg-type]

    store._journal.write = slow_write  # type: ignore[method-assign]
    settled: list[float] = []

    async def settle() -> None:
        settled.append(0.5)

    batch = RunBatch()
    batch.count(steps_taken=1, prompt_tokens=5, completion_tokens=2, cost_usd=0.5)
    batch.complete_step(turn=0, kind="tool", call_id="c1", output={"content": "charged"})
    batch.add_message(run.session_id, run.id, {"role": "tool", "tool_call_id": "c1", "content": "charged"})
    batch.add_event("tool.result", {"call_id": "c1", "content": "charged"})
    batch.after.append(settle)
    commit = asyncio.create_task(store.commit(run, "w1", 30, batch))
    await writing.wait()
    commit.cancel()  # the worker stops the run
    proceed.set()
    with pytest.raises(asyncio.CancelledError):
        await commit
    await store.release(run.id, "w1")  # what the worker does next at shutdown

    [message] = await store.messages(run.session_id)
    assert message.data["content"] == "charged"
    [step] = await store.steps(run.id)
    assert step.status == "completed"
    assert [e.type for e in published][-1] == "tool.result"
    stored = await store.get_run(run.id)
    assert stored is not None
    assert (stored.status, stored.cost_usd, settled) == ("queued", 0.5, [0.5])


async def test_nothing_is_written_after_the_store_is_closed(store: RunStore) -> None:
    """A tool call still running when its run's task ended (a sibling failed) finishes after shutdown: its
    commit is refused with a clear error instead of quietly opening the database again."""
    run = await claimed(store)
    await store.close()
    batch = RunBatch()
    batch.add_message(run.session_id, run.id, {"role": "tool", "tool_call_id": "c1", "content": "late"})
    batch.add_event("tool.result", {"call_id": "c1"})
    with pytest.raises(JournalClosed, match="closed"):
        await store.commit(run, "w1", 30, batch)
    assert await store.messages(run.session_id) == []
    assert [e.type for e in await store.events_after(run.id, 0)] == ["run.created"]


def _one_event() -> RunBatch:
    batch = RunBatch()
    batch.add_event("late", {})
    return batch


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
async def test_what_a_batch_writes_is_encrypted_at_rest(tmp_path: Path, kind: str) -> None:
    canary = f"CANARY-{uuid.uuid4().hex}"
    async with database(kind, tmp_path, keyring=Keyring.from_keys(secrets.token_bytes(32))) as db:
        runs = RunStore(db)
        run = await claimed(runs)
        batch = RunBatch()
        batch.add_message(run.session_id, run.id, {"role": "tool", "tool_call_id": "c1", "content": canary})
        batch.start_step(turn=0, kind="tool", name="t", call_id="c1", input_={"arguments": canary})
        batch.complete_step(turn=0, kind="tool", call_id="c1", output={"content": canary}, error=canary)
        batch.end("completed", None, canary)
        await runs.commit(run, "w1", 30, batch)
        values = await stored_values(db)
        assert values and not any(canary in value for value in values)
        [message] = await runs.messages(run.session_id)
        [step] = await runs.steps(run.id)
        assert (message.data["content"], step.input, step.error) == (canary, {"arguments": canary}, canary)
        await runs.close()
