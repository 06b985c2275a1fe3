"""The API-key cache under load: one database read per key at a time, refreshed before it lapses,
never caching a key a revoke dropped while it was being read."""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import UTC, datetime

import pytest

from strata.security.api_keys import generate_key, hash_key
from strata.security.authenticator import Authenticator, AuthError
from strata.store.keys import KeyRecord


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class SlowKeys:
    """An in-memory key table whose reads wait until the test lets them through."""

    def __init__(self) -> None:
        self.records: dict[str, KeyRecord] = {}
        self.reads = 0
        self.gate = asyncio.Event()
        self.gate.set()
        self.failing = False

    def add(self, secret: str, **changes: object) -> KeyRecord:
        record = KeyRecord(
            id=f"key-{len(self.records)}", name="svc", user="alice", role="user", prefix=secret[:12],
            models=None, agents=None, rpm=None, tpm=None, budget_usd=None, created_by=None, rotated_from=None,
            created_at=datetime.now(UTC), expires_at=None, revoked_at=None,
        )  # fmt: skip
        record = dataclasses.replace(record, **changes)  # type: ignore[arg-type]
        self.records[hash_key(secret)] = record
        return record

    async def by_hash(self, digest: str) -> KeyRecord | None:
        self.reads += 1
        record = self.records.get(digest)  # read now, answered when the gate opens: a slow query's snapshot
        await self.gate.wait()
        if self.failing:
            raise ConnectionError("database is down")
        return record


@pytest.fixture
def keys() -> SlowKeys:
    return SlowKeys()


@pytest.fixture
def clock() -> Clock:
    return Clock()


def authenticator(keys: SlowKeys, clock: Clock) -> Authenticator:
    return Authenticator(keys, ttl_s=30.0, clock=clock)  # type: ignore[arg-type]


async def test_a_thousand_waiting_requests_read_the_key_once(keys: SlowKeys, clock: Clock) -> None:
    secret = generate_key()
    keys.add(secret)
    auth = authenticator(keys, clock)
    keys.gate.clear()
    waiting = [asyncio.create_task(auth.authenticate(secret)) for _ in range(1000)]
    await asyncio.sleep(0.01)
    keys.gate.set()
    principals = await asyncio.gather(*waiting)
    assert {p.user for p in principals} == {"alice"}
    assert keys.reads == 1


async def test_unknown_key_waves_read_once_and_all_get_401(keys: SlowKeys, clock: Clock) -> None:
    auth = authenticator(keys, clock)
    keys.gate.clear()
    waiting = [asyncio.create_task(auth.authenticate(generate_key())) for _ in range(3)]
    same = generate_key()
    waiting += [asyncio.create_task(auth.authenticate(same)) for _ in range(50)]
    await asyncio.sleep(0.01)
    keys.gate.set()
    results = await asyncio.gather(*waiting, return_exceptions=True)
    assert all(isinstance(r, AuthError) for r in results)
    assert keys.reads == 4


async def test_a_key_in_use_is_refreshed_in_the_background_before_it_lapses(keys: SlowKeys, clock: Clock) -> None:
    secret = generate_key()
    keys.add(secret)
    auth = authenticator(keys, clock)
    await auth.authenticate(secret)
    assert keys.reads == 1
    clock.now += 10  # early in the TTL: served from the cache, no read
    await auth.authenticate(secret)
    assert keys.reads == 1
    clock.now += 15  # the last fifth of the 30 s TTL: answered at once, re-read behind it
    keys.gate.clear()
    answered = await asyncio.wait_for(auth.authenticate(secret), 1)
    assert answered.user == "alice"
    keys.gate.set()
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert keys.reads == 2
    clock.now += 20  # past the first entry's TTL, inside the refreshed one's: still no wait on the database
    keys.gate.clear()
    answered = await asyncio.wait_for(auth.authenticate(secret), 1)
    assert answered.user == "alice"
    keys.gate.set()


async def test_a_refresh_that_fails_keeps_serving_until_the_ttl(keys: SlowKeys, clock: Clock) -> None:
    secret = generate_key()
    keys.add(secret)
    auth = authenticator(keys, clock)
    await auth.authenticate(secret)
    keys.failing = True
    clock.now += 26
    assert (await auth.authenticate(secret)).user == "alice"
    await asyncio.sleep(0.01)  # the refresh fails in the background
    assert (await auth.authenticate(secret)).user == "alice"
    clock.now += 5  # past the TTL: the database must answer now, and it cannot
    with pytest.raises(ConnectionError):
        await auth.authenticate(secret)


async def test_a_revoke_during_the_read_is_not_undone_by_it(keys: SlowKeys, clock: Clock) -> None:
    secret = generate_key()
    record = keys.add(secret)
    auth = authenticator(keys, clock)
    keys.gate.clear()
    first = asyncio.create_task(auth.authenticate(secret))
    await asyncio.sleep(0.01)  # the read has begun and seen the key active
    keys.records[hash_key(secret)] = dataclasses.replace(record, revoked_at=datetime.now(UTC))
    auth.forget_locally(record.id)
    keys.gate.set()
    with pytest.raises(AuthError, match="revoked"):
        await first
    with pytest.raises(AuthError):
        await auth.authenticate(secret)


async def test_a_caller_that_leaves_does_not_cancel_the_read_for_the_others(keys: SlowKeys, clock: Clock) -> None:
    secret = generate_key()
    keys.add(secret)
    auth = authenticator(keys, clock)
    keys.gate.clear()
    leaver = asyncio.create_task(auth.authenticate(secret))
    stayer = asyncio.create_task(auth.authenticate(secret))
    await asyncio.sleep(0.01)
    leaver.cancel()
    keys.gate.set()
    assert (await stayer).user == "alice"
    assert keys.reads == 1
