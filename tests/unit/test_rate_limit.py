"""RateLimiter on its in-memory storage, with a clock the test moves."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from limits.aio.storage import MemoryStorage

from strata.security.rate_limit import LimitDecision, RateLimiter, format_reset, ratelimit_headers


@pytest.fixture
def clock() -> list[float]:
    return [1_700_000_000.0]


@pytest.fixture
async def limiter(clock: list[float]) -> AsyncIterator[RateLimiter]:
    rl = RateLimiter(clock=lambda: clock[0])
    yield rl
    await rl.aclose()


async def test_rpm_plus_one_is_refused(limiter: RateLimiter) -> None:
    decisions = [await limiter.hit_request("k1", 5) for _ in range(6)]
    assert [d.allowed for d in decisions] == [True] * 5 + [False]
    assert [d.remaining for d in decisions] == [4, 3, 2, 1, 0, 0]
    refused = decisions[-1]
    assert refused.kind == "requests" and refused.limit == 5
    assert 0 < refused.reset_after_s <= 60
    assert refused.retry_after_s >= 1
    assert (await limiter.hit_request("k2", 5)).allowed  # another key has its own counter


async def test_window_resets(limiter: RateLimiter, clock: list[float]) -> None:
    for _ in range(3):
        await limiter.hit_request("k", 3)
    refused = await limiter.hit_request("k", 3)
    assert not refused.allowed
    clock[0] += refused.reset_after_s + 0.001
    fresh = await limiter.hit_request("k", 3)
    assert fresh.allowed and fresh.remaining == 2
    assert fresh.reset_after_s == pytest.approx(60, abs=0.01)


async def test_tokens(limiter: RateLimiter) -> None:
    first = await limiter.check_tokens("k", 1000)
    assert (first.allowed, first.limit, first.remaining, first.kind) == (True, 1000, 1000, "tokens")
    await limiter.add_tokens("k", 1000, 600)
    assert (await limiter.check_tokens("k", 1000)).remaining == 400
    await limiter.add_tokens("k", 1000, 400)
    refused = await limiter.check_tokens("k", 1000)
    assert not refused.allowed and refused.remaining == 0 and refused.retry_after_s >= 1
    await limiter.add_tokens("k", 1000, 5000)  # spent tokens always count, past the limit too
    assert not (await limiter.check_tokens("k", 1000)).allowed


async def test_no_limits_never_refuse(limiter: RateLimiter) -> None:
    for _ in range(1000):
        assert (await limiter.hit_request("k", None)).allowed
    await limiter.add_tokens("k", None, 10**9)
    unlimited = await limiter.check_tokens("k", None)
    assert unlimited.allowed and unlimited.limit is None and unlimited.retry_after_s == 0
    assert ratelimit_headers(await limiter.hit_request("k", None), unlimited) == {}


def test_headers() -> None:
    requests = LimitDecision(True, 60, 59, 1.2, "requests")
    tokens = LimitDecision(False, 1000, 0, 60.0, "tokens")
    assert ratelimit_headers(requests, tokens) == {
        "x-ratelimit-limit-requests": "60",
        "x-ratelimit-remaining-requests": "59",
        "x-ratelimit-reset-requests": "2s",
        "x-ratelimit-limit-tokens": "1000",
        "x-ratelimit-remaining-tokens": "0",
        "x-ratelimit-reset-tokens": "1m0s",
    }
    assert ratelimit_headers(None, None) == {}
    assert format_reset(0.25) == "250ms"
    assert format_reset(12.0) == "12s"
    assert format_reset(59.1) == "1m0s"
    assert format_reset(75) == "1m15s"


def test_retry_after() -> None:
    assert LimitDecision(False, 1, 0, 0.01, "requests").retry_after_s == 1
    assert LimitDecision(False, 1, 0, 12.3, "requests").retry_after_s == 13
    assert LimitDecision(True, 1, 0, 12.3, "requests").retry_after_s == 0


async def test_storage_down_lets_requests_through() -> None:
    limiter = RateLimiter("redis://127.0.0.1:9/0")  # nothing listens on the discard port
    try:
        decision = await limiter.hit_request("k", 1)
        assert decision.allowed and decision.limit is None
        assert (await limiter.check_tokens("k", 1)).allowed
        await limiter.add_tokens("k", 1, 10)
    finally:
        await limiter.aclose()


def test_memory_sweep_hook_still_exists() -> None:
    """_MemoryStorage throttles limits' private sweep; a limits upgrade that renames it must fail here."""
    from limits.aio.storage import MemoryStorage

    assert callable(getattr(MemoryStorage, "_MemoryStorage__schedule_expiry", None))


async def test_expired_counters_are_swept(limiter: RateLimiter, clock: list[float]) -> None:
    storage = limiter._storage
    assert isinstance(storage, MemoryStorage)
    await limiter.hit_request("k", 5)
    storage.expirations = {key: 0.0 for key in storage.expirations}  # as if their windows ended long ago
    storage._next_sweep = 0.0
    await limiter.hit_request("other", 5)
    await asyncio.sleep(0.01)
    assert list(storage.storage) == [key for key in storage.storage if ":other:" in key]
