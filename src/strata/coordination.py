"""Wake-ups across replicas: one named channel, Redis pub/sub when `redis_url` is set.

A `Signal` carries no state, only "look again": what changed is in the database, so a lost message
(Redis down, a replica starting) costs only the delay until the listener's next poll. In-process, the
replica that publishes wakes its own listener at once, Redis or not.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import structlog
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.client import PubSub

log = structlog.get_logger("strata.coordination")
# redis-py's default pool holds 100 connections and raises at the 101st concurrent command: under a burst,
# rate limits and budgets would then see "Redis down" and fail open for everyone. A blocking pool makes the
# burst queue for a connection instead, and fails only when none frees up within REDIS_POOL_WAIT_S.
REDIS_POOL_SIZE = 256
REDIS_POOL_WAIT_S = 5.0


def redis_pool(url: str, **options: object) -> BlockingConnectionPool:
    return BlockingConnectionPool.from_url(url, max_connections=REDIS_POOL_SIZE, timeout=REDIS_POOL_WAIT_S, **options)


def redis_client(url: str, **options: object) -> Redis:
    """A client that owns its (blocking) pool: closing the client closes the pool."""
    return Redis.from_pool(redis_pool(url, **options))


class Signal:
    def __init__(self, redis: Redis | None, channel: str) -> None:
        self._redis = redis
        self.channel = channel
        self._event = asyncio.Event()
        self._listener: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self._redis is None:
            return
        try:
            pubsub = self._redis.pubsub()
            await pubsub.subscribe(self.channel)
        except (OSError, ConnectionError) as exc:
            log.warning("cannot subscribe; polling only", channel=self.channel, error=str(exc))
            return
        self._listener = asyncio.create_task(self._listen(pubsub), name=f"signal:{self.channel}")

    async def stop(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener

    async def publish(self) -> None:
        self._event.set()
        if self._redis is not None:
            try:
                await self._redis.publish(self.channel, b"1")
            except (OSError, ConnectionError) as exc:
                log.warning("cannot publish; other replicas will notice by polling", channel=self.channel,
                            error=str(exc))  # fmt: skip

    async def wait(self, timeout_s: float) -> None:
        """Until a publish (here or on another replica) or `timeout_s`, whichever comes first."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._event.wait(), timeout_s)
        self._event.clear()

    async def _listen(self, pubsub: PubSub) -> None:
        def lost(exc: Exception) -> None:
            log.warning("signal channel lost; polling until it is back", channel=self.channel, error=str(exc))

        await follow(pubsub, self.channel, lambda _: self._event.set(), lost)


RESUBSCRIBE_S = 1.0


async def follow(
    pubsub: PubSub, channel: str, on_message: Callable[[bytes | str], None], on_lost: Callable[[Exception], None]
) -> None:
    """Hand every message of `channel` to `on_message` until cancelled; when Redis goes away, tell `on_lost` and
    subscribe again every second until it is back. Closes `pubsub` at the end."""
    try:
        while True:
            try:
                async for message in pubsub.listen():  # ends by itself only when nothing is subscribed
                    if message.get("type") == "message":
                        on_message(message["data"])
            except (OSError, ConnectionError) as exc:
                on_lost(exc)
            await asyncio.sleep(RESUBSCRIBE_S)
            with contextlib.suppress(OSError, ConnectionError):
                await pubsub.subscribe(channel)
    finally:
        with contextlib.suppress(Exception):
            await pubsub.aclose()
