"""The supervisor's state for `server.workers` without Redis: two clients (two workers) see one count, one
breaker and one budget; an unreachable supervisor reads as the failure each caller already handles."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from limits.errors import StorageError

from strata.machine_state import (
    MachineStateClient,
    MachineStateServer,
    SharedBreakerStore,
    SharedBudgetCounters,
    SharedCounters,
)
from strata.resilience.breaker import BreakerStoreError, ProbeClaim, ProbeVerdict
from strata.security.rate_limit import RateLimiter


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[MachineStateServer]:
    state = MachineStateServer(tmp_path / "state.sock")
    await state.start()
    yield state
    await state.stop()


@pytest.fixture
async def clients(server: MachineStateServer) -> AsyncIterator[tuple[MachineStateClient, MachineStateClient]]:
    one, two = MachineStateClient(server.path), MachineStateClient(server.path)
    yield one, two
    await one.aclose()
    await two.aclose()


async def test_a_rate_limit_is_one_count_across_workers(clients: tuple[MachineStateClient, ...]) -> None:
    limiters = [RateLimiter(shared=SharedCounters(client)) for client in clients]
    decisions = [await limiters[i % 2].hit_request("key-1", rpm=3) for i in range(5)]
    assert [d.allowed for d in decisions] == [True, True, True, False, False]
    assert decisions[2].remaining == 0


async def test_a_breaker_tripped_by_one_worker_is_open_for_the_other(clients: tuple[MachineStateClient, ...]) -> None:
    one, two = (SharedBreakerStore(client) for client in clients)
    await one.trip("model/a", "trip-1", open_s=0.0)  # open for no time: half-open at once
    claim, shared = await two.claim_probe("model/a", limit=1, lease_s=5)
    assert claim is ProbeClaim.GRANTED and shared.trip == "trip-1"
    assert (await one.claim_probe("model/a", limit=1, lease_s=5))[0] is ProbeClaim.FULL
    verdict = ProbeVerdict(ok=True, close_after=1, reopen_after=1, reopen_token="trip-2", open_s=30)
    assert (await two.probe_verdict("model/a", "trip-1", verdict)).trip is None
    assert (await one.read("model/a")).trip is None


async def test_budget_counters_are_shared(clients: tuple[MachineStateClient, ...]) -> None:
    one, two = (SharedBudgetCounters(client) for client in clients)
    assert await one.add(["key:k"], 5) == [None]  # not seeded yet: the guard reads the usage table first
    await one.seed("key:k", 10, datetime.now(UTC) + timedelta(days=1), 86_400)
    assert await two.add(["key:k"], 5) == [15]
    assert await one.get(["key:k", "key:other"]) == [15, None]


async def test_an_unreachable_supervisor_fails_open(tmp_path: Path) -> None:
    client = MachineStateClient(tmp_path / "nobody.sock")
    limiter = RateLimiter(shared=SharedCounters(client))
    assert (await limiter.hit_request("key-1", rpm=1)).allowed
    with pytest.raises(StorageError):
        await SharedCounters(client).incr("k", 60)
    with pytest.raises(BreakerStoreError):
        await SharedBreakerStore(client).read("model/a")
