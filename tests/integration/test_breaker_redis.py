"""Breakers on two "replicas" (two Redis clients) share one state through the real Redis at 127.0.0.1:6379.

Open periods live in Redis TTLs, so these tests use real time, with tiny waits, and assert on states only.
"""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.asyncio import Redis
from structlog.testing import capture_logs

from strata.config import BreakerConfig
from strata.resilience.breaker import (
    BreakerState,
    CircuitBreaker,
    ProbeClaim,
    ProbeVerdict,
    RedisBreakerStore,
    SharedState,
)

REDIS_URL = "redis://127.0.0.1:6379/0"
OPEN_S = 0.4


def config(**overrides: Any) -> BreakerConfig:
    values: dict[str, Any] = {
        "consecutive_failures": 3,
        "min_requests": 1000,
        "open_s": OPEN_S,
        "half_open_probes": 1,
    }
    return BreakerConfig(**(values | overrides))


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    key_prefix = f"strata:test:breaker:{uuid.uuid4().hex}:"
    admin = Redis.from_url(REDIS_URL)
    try:
        await admin.ping()
    except OSError as exc:  # redis-py's ConnectionError is an OSError
        await admin.aclose()
        raise RuntimeError(f"Redis is needed at {REDIS_URL} for this test (.ci/run starts it): {exc}") from exc
    yield key_prefix
    keys = [key async for key in admin.scan_iter(match=f"{key_prefix}*")]
    if keys:
        await admin.delete(*keys)
    await admin.aclose()


@pytest.fixture
async def replicas(prefix: str) -> AsyncIterator[tuple[RedisBreakerStore, RedisBreakerStore]]:
    clients = [Redis.from_url(REDIS_URL), Redis.from_url(REDIS_URL)]
    yield RedisBreakerStore(clients[0], prefix), RedisBreakerStore(clients[1], prefix)
    for client in clients:
        await client.aclose()


def pair(stores: tuple[RedisBreakerStore, RedisBreakerStore], **overrides: Any) -> list[CircuitBreaker]:
    # sync_interval_s=0: every allow() reads Redis, so the test never has to wait for a sync.
    return [CircuitBreaker("dep", config(**overrides), store, sync_interval_s=0.0) for store in stores]


async def fail(b: CircuitBreaker, times: int) -> None:
    for _ in range(times):
        assert await b.allow()
        await b.record_failure()


async def wait_half_open(*breakers: CircuitBreaker) -> None:
    await asyncio.sleep(OPEN_S + 0.05)
    for b in breakers:
        assert (await b.snapshot()).state is BreakerState.HALF_OPEN


async def test_one_replica_opens_it_and_the_other_refuses(replicas: tuple[RedisBreakerStore, ...]) -> None:
    a, b = pair(replicas, open_s=30.0)
    assert await b.allow()
    await fail(a, 3)
    assert a.state is BreakerState.OPEN
    snapshot = await b.snapshot()
    assert snapshot.state is BreakerState.OPEN
    assert 0 < snapshot.retry_in_s <= 30.0
    assert snapshot.store_ok
    assert not await b.allow()


async def test_the_other_replica_sees_it_open_after_its_sync_interval(prefix: str) -> None:
    clients = [Redis.from_url(REDIS_URL), Redis.from_url(REDIS_URL)]
    try:
        a = CircuitBreaker("dep", config(open_s=30.0), RedisBreakerStore(clients[0], prefix))
        b = CircuitBreaker("dep", config(open_s=30.0), RedisBreakerStore(clients[1], prefix), sync_interval_s=0.05)
        assert await b.allow()  # b read the shared state just now: closed
        await fail(a, 3)
        await asyncio.sleep(0.06)
        assert not await b.allow()
        assert b.state is BreakerState.OPEN
    finally:
        for client in clients:
            await client.aclose()


async def test_probe_slots_are_shared_and_a_probe_success_closes_it_for_both(
    replicas: tuple[RedisBreakerStore, ...],
) -> None:
    a, b = pair(replicas)
    await fail(a, 3)
    await wait_half_open(a, b)
    assert await b.allow()  # b holds the only probe slot
    assert not await a.allow()
    assert not await b.allow()
    await b.record_success()
    assert b.state is BreakerState.CLOSED
    assert await a.allow()
    assert a.state is BreakerState.CLOSED
    # Counters restart: two failures on a do not open it again.
    await fail(a, 2)
    assert (await b.snapshot()).state is BreakerState.CLOSED


async def test_a_probe_failure_reopens_it_for_both(replicas: tuple[RedisBreakerStore, ...]) -> None:
    a, b = pair(replicas)
    await fail(b, 3)
    await wait_half_open(a, b)
    assert await a.allow()
    await a.record_failure()
    assert not await b.allow()
    assert (await b.snapshot()).state is BreakerState.OPEN
    await wait_half_open(a, b)


async def test_a_released_probe_slot_goes_to_the_other_replica(replicas: tuple[RedisBreakerStore, ...]) -> None:
    a, b = pair(replicas)
    await fail(a, 3)
    await wait_half_open(a, b)
    assert await a.allow()
    assert not await b.allow()
    await a.release_probe()
    assert await b.allow()


async def test_separate_deployments_do_not_share_a_breaker(replicas: tuple[RedisBreakerStore, ...]) -> None:
    a = CircuitBreaker("dep-a", config(open_s=30.0), replicas[0], sync_interval_s=0.0)
    b = CircuitBreaker("dep-b", config(open_s=30.0), replicas[1], sync_interval_s=0.0)
    await fail(a, 3)
    assert await b.allow()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def test_redis_down_the_breaker_works_locally_and_never_raises() -> None:
    client = Redis(host="127.0.0.1", port=closed_port(), socket_connect_timeout=0.2)
    clock = FakeClock()
    b = CircuitBreaker("dep", config(open_s=5.0), RedisBreakerStore(client, "strata:test:down:"), clock)
    try:
        with capture_logs() as logs:
            assert await b.allow()
            await fail(b, 3)
            assert not await b.allow()
            clock.now += 5.0
            assert await b.allow()
            assert not await b.allow()
            await b.record_success()
            assert await b.allow()
            snapshot = await b.snapshot()
    finally:
        await client.aclose()
    assert snapshot.state is BreakerState.CLOSED
    assert not snapshot.store_ok
    warnings = [entry for entry in logs if entry["event"] == "breaker store unavailable, using local state"]
    assert len(warnings) == 1


async def test_redis_store_transitions_are_atomic_and_tokened(replicas: tuple[RedisBreakerStore, ...]) -> None:
    one, two = replicas
    assert (await one.claim_probe("dep", 1, 10.0))[0] is ProbeClaim.CLOSED
    assert (await one.trip("dep", "t1", 30.0)).trip == "t1"
    again = await two.trip("dep", "t2", 30.0)
    assert again.trip == "t1", "an open breaker is not re-tripped by another replica"
    assert 0 < again.open_remaining_s <= 30.0
    assert (await two.claim_probe("dep", 1, 10.0))[0] is ProbeClaim.OPEN
    close = ProbeVerdict(True, close_after=1, reopen_after=1, reopen_token="never", open_s=30.0)
    assert (await two.probe_verdict("dep", "stale-trip", close)).trip == "t1", "an older trip's verdict is ignored"
    assert (await one.read("dep")).trip == "t1"
    assert await two.probe_verdict("dep", "t1", close) == SharedState()
    assert await one.read("dep") == SharedState()
    # Half-open right away (a 1 ms open period), then one probe slot in all.
    await one.trip("dep", "t3", 0.001)
    await asyncio.sleep(0.01)
    assert [(await store.claim_probe("dep", 1, 10.0))[0] for store in (one, two)] == [
        ProbeClaim.GRANTED,
        ProbeClaim.FULL,
    ]
    await one.release_probe("dep", "stale-trip")
    assert (await two.claim_probe("dep", 1, 10.0))[0] is ProbeClaim.FULL, "a release for an older trip is ignored"
    await one.release_probe("dep", "t3")
    assert (await two.claim_probe("dep", 1, 10.0))[0] is ProbeClaim.GRANTED


async def test_redis_store_counts_probe_verdicts_of_both_replicas(replicas: tuple[RedisBreakerStore, ...]) -> None:
    one, two = replicas

    def verdict(ok: bool) -> ProbeVerdict:
        return ProbeVerdict(ok, close_after=3, reopen_after=3, reopen_token="t2", open_s=30.0)

    await one.trip("dep", "t1", 0.001)
    await asyncio.sleep(0.01)
    for store in (one, two, one, two, one):
        assert (await store.claim_probe("dep", 5, 10.0))[0] is ProbeClaim.GRANTED
    assert (await two.claim_probe("dep", 5, 10.0))[0] is ProbeClaim.FULL
    for store, ok in ((one, False), (two, True), (two, False), (one, True)):
        assert (await store.probe_verdict("dep", "t1", verdict(ok))).trip == "t1"
    assert (await two.claim_probe("dep", 5, 10.0))[0] is ProbeClaim.GRANTED, "verdicts free their slots"
    reopened = await one.probe_verdict("dep", "t1", verdict(False))  # the third failure, of two replicas
    assert reopened.trip == "t2" and 0 < reopened.open_remaining_s <= 30.0
    assert (await two.claim_probe("dep", 5, 10.0))[0] is ProbeClaim.OPEN
    assert (await two.probe_verdict("dep", "t1", verdict(True))).trip == "t2", "a late verdict of t1 changes nothing"


async def test_several_probes_close_it_for_both_replicas(replicas: tuple[RedisBreakerStore, ...]) -> None:
    a, b = pair(replicas, half_open_probes=4, failure_rate=0.5)
    await fail(a, 3)
    await wait_half_open(a, b)
    assert [await a.allow() for _ in range(2)] == [True, True]
    assert [await b.allow() for _ in range(3)] == [True, True, False], "four probes in all"
    await a.record_failure()  # ceil(0.5 * 4) = 2 failures re-open it; so 3 successes close it
    await b.record_success()
    await a.record_success()
    assert (await b.snapshot()).state is BreakerState.HALF_OPEN
    await b.record_success()
    assert b.state is BreakerState.CLOSED
    assert await a.allow()
    assert a.state is BreakerState.CLOSED
