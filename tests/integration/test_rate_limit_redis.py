"""Two RateLimiters on one Redis at 127.0.0.1:6379 act as two replicas: together they enforce one limit."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from strata.security.rate_limit import RateLimiter

REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture
async def namespace() -> AsyncIterator[str]:
    """A key namespace of this test's own; its keys are deleted afterwards (never FLUSHALL)."""
    name = f"strata-test-rl-{uuid.uuid4().hex}"
    admin = Redis.from_url(REDIS_URL)
    try:
        await admin.ping()
    except OSError as exc:  # redis-py's ConnectionError is an OSError
        await admin.aclose()
        raise RuntimeError(f"Redis is needed at {REDIS_URL} for this test (.ci/run starts it): {exc}") from exc
    yield name
    keys = [key async for key in admin.scan_iter(match=f"{name}:*")]
    if keys:
        await admin.delete(*keys)
    await admin.aclose()


@pytest.fixture
async def replicas(namespace: str) -> AsyncIterator[tuple[RateLimiter, RateLimiter]]:
    # One frozen clock for both, mid-window for any key, so no window boundary falls inside the test.
    now = time.time()
    pair = (
        RateLimiter(REDIS_URL, namespace=namespace, clock=lambda: now),
        RateLimiter(REDIS_URL, namespace=namespace, clock=lambda: now),
    )
    yield pair
    for limiter in pair:
        await limiter.aclose()


async def test_two_replicas_share_one_request_limit(replicas: tuple[RateLimiter, RateLimiter]) -> None:
    a, b = replicas
    decisions = await asyncio.gather(*(replica.hit_request("key-1", 10) for _ in range(15) for replica in (a, b)))
    assert sum(d.allowed for d in decisions) == 10
    refused = [d for d in decisions if not d.allowed]
    assert all(d.retry_after_s >= 1 and d.remaining == 0 for d in refused)
    assert (await b.hit_request("key-2", 10)).allowed  # another key: its own counter


async def test_two_replicas_share_tokens(replicas: tuple[RateLimiter, RateLimiter]) -> None:
    a, b = replicas
    await a.add_tokens("key-1", 1000, 700)
    seen = await b.check_tokens("key-1", 1000)
    assert seen.allowed and seen.remaining == 300
    await b.add_tokens("key-1", 1000, 300)
    assert not (await a.check_tokens("key-1", 1000)).allowed


async def test_keys_live_in_the_namespace_and_expire(namespace: str, replicas: tuple[RateLimiter, RateLimiter]) -> None:
    await replicas[0].hit_request("key-1", 10)
    admin = Redis.from_url(REDIS_URL)
    try:
        keys = [key async for key in admin.scan_iter(match=f"{namespace}:*")]
        assert len(keys) == 1 and b":ratelimit:requests:key-1:" in keys[0]
        assert 0 < await admin.ttl(keys[0]) <= 62
    finally:
        await admin.aclose()
