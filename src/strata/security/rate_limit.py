"""Per-key requests-per-minute and tokens-per-minute limits, on `limits` storage shared by every replica.

Strategy: a fixed one-minute window per key, aligned to the clock with a per-key phase, counted with
the storage's atomic `incr` (Redis: one INCRBY+EXPIRE Lua call). Why, against `limits`' strategies:

- Cost: the request check is one storage round trip that returns the new count, and the window's end
  follows from the clock, so `remaining` and `reset` for the x-ratelimit-* headers cost nothing more.
  `limits`' strategy objects answer `hit` with a bool only; the headers would need `get_window_stats`,
  one or two more round trips on every request.
- Moving window is exact but stores one entry per unit of cost: a 100k-token response would add
  100k entries. It cannot carry tokens per minute.
- The sliding-window counter smooths the boundary, but its acquire refuses (and does not count) a cost
  that does not fit, while tokens already spent must always be counted; and it too needs a second
  round trip for the headers.
- The price of a fixed window is a burst of up to 2x the limit across a window boundary. The per-key
  phase (a stable hash of the key id) spreads the boundaries, so not every key resets at :00 at once.

A counter keyed by (kind, key id, window index) is atomic on Redis, so N replicas enforce one limit.
Counting stays consistent across replicas as long as their clocks agree to well under a window (NTP).
When the storage fails, requests are let through (fail open) and a warning is logged: a Redis outage
must not take the API down with it. Calls skip the storage for `_DOWN_BACKOFF_S` after a failure.
"""

from __future__ import annotations

import math
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

import structlog
from limits.aio.storage import MemoryStorage, RedisStorage, Storage
from limits.errors import StorageError
from redis.asyncio import BlockingConnectionPool

from strata.coordination import redis_pool

log = structlog.get_logger("strata.ratelimit")

WINDOW_S = 60
_EXPIRY_GRACE_S = 2  # a window's counter outlives the window a little, for clock skew between replicas
_DOWN_BACKOFF_S = 5.0
_REDIS_TIMEOUT_S = 0.5

Kind = Literal["requests", "tokens"]


@dataclass(frozen=True, slots=True)
class LimitDecision:
    """One limit's verdict; `limit` None means the key has no such limit (and gets no headers for it)."""

    allowed: bool
    limit: int | None
    remaining: int | None
    reset_after_s: float  # seconds until the window resets
    kind: Kind

    @property
    def retry_after_s(self) -> int:
        """Whole seconds for Retry-After: at least 1 when refused, 0 when allowed."""
        return max(1, math.ceil(self.reset_after_s)) if not self.allowed else 0


_UNLIMITED_REQUESTS = LimitDecision(True, None, None, 0.0, "requests")
_UNLIMITED_TOKENS = LimitDecision(True, None, None, 0.0, "tokens")


def format_reset(seconds: float) -> str:
    """OpenAI's duration style: "250ms", "12s", "1m0s"."""
    if seconds < 1:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    minutes, secs = divmod(math.ceil(seconds), 60)
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


def ratelimit_headers(requests: LimitDecision | None, tokens: LimitDecision | None) -> dict[str, str]:
    """The x-ratelimit-* headers OpenAI clients read, for each decision that carries a limit."""
    headers: dict[str, str] = {}
    for decision in (requests, tokens):
        if decision is None or decision.limit is None:
            continue
        kind = decision.kind
        headers[f"x-ratelimit-limit-{kind}"] = str(decision.limit)
        headers[f"x-ratelimit-remaining-{kind}"] = str(decision.remaining)
        headers[f"x-ratelimit-reset-{kind}"] = format_reset(decision.reset_after_s)
    return headers


class CounterStorage(Protocol):
    """What the limiter uses of a `limits` storage; errors raise `StorageError`."""

    async def incr(self, key: str, expiry: int, amount: int = 1) -> int: ...

    async def get(self, key: str) -> int: ...


class _MemoryStorage(MemoryStorage):
    """limits' in-memory storage, sweeping expired counters at most once a second.

    Upstream starts a sweep over every counter after each `incr`: O(counters) CPU per request (about
    80 us at 1,000 live counters, 800 us at 10,000). Our counters are per-window keys that `get` and
    `incr` already drop when expired, so the sweep is only garbage collection; once a second is plenty.
    The hook is limits' private `__schedule_expiry`; tests/unit/test_rate_limit.py checks it still exists.
    """

    _next_sweep = 0.0

    async def _MemoryStorage__schedule_expiry(self) -> None:
        now = time.monotonic()
        if now >= self._next_sweep:
            self._next_sweep = now + 1.0
            await super()._MemoryStorage__schedule_expiry()


class RateLimiter:
    """Counts requests and tokens per key per minute; in memory, or in Redis shared by every replica."""

    def __init__(
        self,
        redis_url: str | None = None,
        *,
        namespace: str = "strata",
        clock: Callable[[], float] = time.time,
        shared: CounterStorage | None = None,
    ) -> None:
        """`shared`: counters kept by the supervisor of this machine's worker processes (machine_state.py),
        when there is no Redis."""
        self._clock = clock
        self._pool: BlockingConnectionPool | None = None
        self._storage: Storage | CounterStorage
        if shared is not None:
            self._storage = shared
        elif redis_url is None:
            self._storage = _MemoryStorage(wrap_exceptions=True)
        else:
            # redis-py's asyncio client (already a dependency) through a pool we own, so aclose can close it.
            self._pool = redis_pool(redis_url, socket_timeout=_REDIS_TIMEOUT_S, socket_connect_timeout=_REDIS_TIMEOUT_S)
            self._storage = RedisStorage(
                "async+" + redis_url,
                wrap_exceptions=True,
                implementation="redispy",
                key_prefix=namespace,
                connection_pool=self._pool,
            )
        self._down_until = 0.0  # monotonic: skip the storage until then, after it failed

    async def aclose(self) -> None:
        if self._pool is not None:
            await self._pool.aclose()
        elif isinstance(self._storage, MemoryStorage) and self._storage.timer is not None:
            self._storage.timer.cancel()  # its expiry sweep task

    async def hit_request(self, key_id: str, rpm: int | None) -> LimitDecision:
        """Count one request; refused when it is past the key's requests per minute."""
        if rpm is None:
            return _UNLIMITED_REQUESTS
        key, reset_after, expiry = self._window("requests", key_id)
        count = await self._incr(key, expiry, 1)
        if count is None:
            return _UNLIMITED_REQUESTS
        return LimitDecision(count <= rpm, rpm, max(0, rpm - count), reset_after, "requests")

    async def check_tokens(self, key_id: str, tpm: int | None) -> LimitDecision:
        """Refuse when this minute's tokens already reach tpm (the new request's size is not known yet)."""
        if tpm is None:
            return _UNLIMITED_TOKENS
        key, reset_after, _ = self._window("tokens", key_id)
        used = await self._get(key)
        if used is None:
            return _UNLIMITED_TOKENS
        return LimitDecision(used < tpm, tpm, max(0, tpm - used), reset_after, "tokens")

    async def add_tokens(self, key_id: str, tpm: int | None, tokens: int) -> None:
        """Count a finished request's prompt + completion tokens against this minute."""
        if tpm is None or tokens <= 0:
            return
        key, _, expiry = self._window("tokens", key_id)
        await self._incr(key, expiry, tokens)

    def _window(self, kind: Kind, key_id: str) -> tuple[str, float, int]:
        """(storage key, seconds until the window resets, counter expiry) for key_id's current window."""
        phase = zlib.crc32(key_id.encode()) % (WINDOW_S * 1000) / 1000  # stable on every replica
        shifted = self._clock() + phase
        index = int(shifted // WINDOW_S)
        reset_after = (index + 1) * WINDOW_S - shifted
        return f"ratelimit:{kind}:{key_id}:{index}", reset_after, math.ceil(reset_after) + _EXPIRY_GRACE_S

    async def _incr(self, key: str, expiry: int, amount: int) -> int | None:
        if self._down_until and time.monotonic() < self._down_until:
            return None
        try:
            return await self._storage.incr(key, expiry, amount)
        except StorageError as exc:
            self._storage_failed(exc)
            return None

    async def _get(self, key: str) -> int | None:
        if self._down_until and time.monotonic() < self._down_until:
            return None
        try:
            return await self._storage.get(key)
        except StorageError as exc:
            self._storage_failed(exc)
            return None

    def _storage_failed(self, exc: StorageError) -> None:
        self._down_until = time.monotonic() + _DOWN_BACKOFF_S
        log.warning(
            "rate limit storage failed: letting requests through",
            error=repr(exc.storage_error),
            retry_in_s=_DOWN_BACKOFF_S,
        )
