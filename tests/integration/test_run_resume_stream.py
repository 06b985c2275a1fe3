"""Following a run's events (SSE, websocket): a client that reconnects with Last-Event-ID in the middle of a
model turn keeps receiving that turn's text as it streams."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from strata.agents.bus import EventBus, LiveEvent
from strata.agents.service import AgentService
from strata.store.run_journal import RunBatch
from strata.store.runs import RunStore
from tests.integration.test_run_journal import claimed, database


@pytest.fixture(params=["sqlite", "postgresql"])
async def runs(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[tuple[RunStore, EventBus]]:
    async with database(request.param, tmp_path) as db:
        bus = EventBus()
        store = RunStore(db, bus.publish_stored)
        yield store, bus
        await store.close()


async def test_a_client_reconnecting_mid_turn_gets_the_rest_of_its_text_live(
    runs: tuple[RunStore, EventBus],
) -> None:
    store, bus = runs
    service = AgentService(store, None, None, bus)  # type: ignore[arg-type]  # following needs neither
    run = await claimed(store)
    batch = RunBatch()
    batch.add_message(run.session_id, run.id, {"role": "user", "content": "hi"})
    batch.add_event("run.started", {"agent": "agent", "version": 1})
    batch.start_step(turn=0, kind="model", name="m")
    batch.add_event("step.started", {"turn": 0, "kind": "model", "model": "m"})
    await store.commit(run, "w1", 30, batch)
    last_seen = run.next_event_seq  # the client saw the turn start, then lost its connection

    subscription = service.subscribe(run.id)
    stream = service.follow(run.id, after_seq=last_seen, subscription=subscription)
    for text in ("Hel", "lo"):  # the model goes on streaming
        bus.publish(LiveEvent(run.id, "message.delta", {"content": text, "turn": 0}, None))
    async with store.unit(run_id=run.id, owner="w1", lease_s=30) as unit:
        await unit.add_event(run.id, "run.waiting", {"reason": "rate limited", "retry_in_s": 0.1})

    received = [await anext(stream)]
    assert received[0].type == "run.waiting"
    # The turn never completes its message (the user cancels it): text streamed so far is all the client gets.
    ended = RunBatch()
    ended.end("cancelled", "cancelled by request", None)
    await store.commit(run, "w1", 30, ended)
    received += [event async for event in stream]

    assert [e.type for e in received] == ["run.waiting", "message.delta", "message.delta", "run.cancelled"]
    assert "".join(e.data["content"] for e in received if e.type == "message.delta") == "Hello"
