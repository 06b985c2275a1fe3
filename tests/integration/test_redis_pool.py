"""A burst of Redis commands larger than the connection pool waits for connections instead of failing:
with redis-py's default pool the 101st concurrent command raised, and rate limits and budgets then treated
Redis as down for everyone."""

from __future__ import annotations

import asyncio

from strata.coordination import REDIS_POOL_SIZE, redis_client

REDIS_URL = "redis://127.0.0.1:6379/0"


async def test_a_burst_beyond_the_pool_size_is_served() -> None:
    client = redis_client(REDIS_URL)
    try:
        answers = await asyncio.gather(*(client.ping() for _ in range(REDIS_POOL_SIZE * 2)))
        assert all(answers)
    finally:
        await client.aclose()
