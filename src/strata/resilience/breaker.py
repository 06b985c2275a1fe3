"""Circuit breaker per deployment: stop calling a backend that keeps failing, probe it, then recover.

CLOSED -> OPEN on a failure rate of at least `failure_rate` over the last `window_s`, once `min_requests`
were seen there. A breaker never trips on a short run of bad luck at high traffic: `consecutive_failures`
failures in a row count only while the window holds fewer than `min_requests` (low traffic, where a rate
means nothing). OPEN refuses at once for `open_s`; then HALF_OPEN lets up to `half_open_probes` probe
requests through at a time and judges them like the window: `ceil(failure_rate * half_open_probes)` failed
probes re-open it, the rest succeeding closes it. So a recovered backend closes after a few quick probes,
and one unlucky probe of a backend that is mostly well does not keep it open for another period.

Sharing across replicas (the consistency model). Each replica counts its own outcomes in memory, so the
hot path (allow/record on a closed breaker) does no I/O. Only transitions go through a `BreakerStore`:
the trip (with how long it stays open), probe slots while half-open, and the close. Replicas read the
shared state at most every `sync_interval_s` (and on every `snapshot()`), so a breaker one replica opens
refuses on the others within that interval. Probe slots are claimed atomically in the store, so
`half_open_probes` bounds probes across all replicas, and probe verdicts are counted there, so every
replica's probes add up to one decision. Failure counts of the closed breaker are not shared: each replica trips on
what it sees, and the first trip opens the breaker for all. Open periods travel as remaining time (Redis
TTLs), never as timestamps, so replicas' clocks need not agree. If the store fails, the breaker keeps
working on local state and warns once; a trip made meanwhile is published when the store is back.
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import Enum, StrEnum
from typing import Any, Protocol, TypeVar

import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError

from strata.config import BreakerConfig

log = structlog.get_logger("strata.breaker")

T = TypeVar("T")
Clock = Callable[[], float]

# A tripped breaker nobody probes for this long is forgotten (closed): no state lingers for removed deployments.
FORGET_AFTER_S = 3600.0
_EPSILON = 1e-9  # so that 0.5 * 10 failures is 5, not 5.000000001, despite float rounding


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True, slots=True)
class BreakerSnapshot:
    """One breaker as this replica sees it, for `GET /admin/deployments` and metrics."""

    name: str
    state: BreakerState
    consecutive_failures: int
    window_failures: int
    window_requests: int
    probes_in_flight: int  # held by this replica
    opened_at: float | None  # on the breaker's clock; estimated for a trip made by another replica
    retry_in_s: float  # until the next probe is allowed; 0 when closed, or half-open with a free slot
    store_ok: bool  # False while the shared store is unreachable and the breaker runs on local state


@dataclass(frozen=True, slots=True)
class SharedState:
    """What the store knows of one breaker. `trip` identifies one open period; None means closed."""

    trip: str | None = None
    open_remaining_s: float = 0.0  # 0 with a trip: half-open


class ProbeClaim(Enum):
    GRANTED = "granted"
    FULL = "full"  # half-open, every probe slot taken
    OPEN = "open"
    CLOSED = "closed"


class BreakerStoreError(Exception):
    """The shared store cannot be used right now; the breaker falls back to local state."""


class BreakerStore(Protocol):
    """Cross-replica breaker state. Every method is one atomic step; none is called per closed request."""

    async def read(self, name: str) -> SharedState: ...

    async def trip(self, name: str, token: str, open_s: float) -> SharedState:
        """Open for `open_s` under `token`, unless already open: then return the open period as it is."""
        ...

    async def claim_probe(self, name: str, limit: int, lease_s: float) -> tuple[ProbeClaim, SharedState]:
        """Take a probe slot if half-open and fewer than `limit` are taken; a slot expires after `lease_s`."""
        ...

    async def release_probe(self, name: str, trip: str) -> None: ...

    async def probe_verdict(self, name: str, trip: str, verdict: ProbeVerdict) -> SharedState:
        """Count one probe's outcome for open period `trip` and free its slot; close or re-open on the count.

        A verdict for an older open period than the current one changes nothing."""
        ...


@dataclass(frozen=True, slots=True)
class ProbeVerdict:
    """One half-open probe's outcome, and what the counts must reach to decide."""

    ok: bool
    close_after: int  # successful probes that close it
    reopen_after: int  # failed probes that re-open it ...
    reopen_token: str  # ... as this new open period
    open_s: float


@dataclass(slots=True)
class _Entry:
    trip: str
    open_until: float
    forget_at: float
    probes: int = 0
    probes_until: float = 0.0
    successes: int = 0
    failures: int = 0


class MemoryBreakerStore:
    """The in-process store: one replica, or several breakers of one process sharing a name."""

    def __init__(self, clock: Clock = time.monotonic) -> None:
        self._clock = clock
        self._entries: dict[str, _Entry] = {}

    def _entry(self, name: str, now: float) -> _Entry | None:
        entry = self._entries.get(name)
        if entry is not None and now >= entry.forget_at:
            del self._entries[name]
            return None
        if entry is not None and entry.probes and now >= entry.probes_until:
            entry.probes = 0
        return entry

    @staticmethod
    def _view(entry: _Entry | None, now: float) -> SharedState:
        return SharedState() if entry is None else SharedState(entry.trip, max(0.0, entry.open_until - now))

    async def read(self, name: str) -> SharedState:
        now = self._clock()
        return self._view(self._entry(name, now), now)

    async def trip(self, name: str, token: str, open_s: float) -> SharedState:
        now = self._clock()
        entry = self._entry(name, now)
        if entry is None or entry.open_until <= now:
            entry = self._entries[name] = _Entry(token, now + open_s, now + open_s + FORGET_AFTER_S)
        return self._view(entry, now)

    async def claim_probe(self, name: str, limit: int, lease_s: float) -> tuple[ProbeClaim, SharedState]:
        now = self._clock()
        entry = self._entry(name, now)
        if entry is None:
            return ProbeClaim.CLOSED, SharedState()
        if entry.open_until > now:
            return ProbeClaim.OPEN, self._view(entry, now)
        if entry.probes >= limit:
            return ProbeClaim.FULL, self._view(entry, now)
        entry.probes += 1
        entry.probes_until = now + lease_s
        return ProbeClaim.GRANTED, self._view(entry, now)

    async def release_probe(self, name: str, trip: str) -> None:
        entry = self._entry(name, self._clock())
        if entry is not None and entry.trip == trip and entry.probes > 0:
            entry.probes -= 1

    async def probe_verdict(self, name: str, trip: str, verdict: ProbeVerdict) -> SharedState:
        now = self._clock()
        entry = self._entry(name, now)
        if entry is None or entry.trip != trip:
            return self._view(entry, now)
        entry.probes = max(0, entry.probes - 1)
        if verdict.ok:
            entry.successes += 1
            if entry.successes >= verdict.close_after:
                del self._entries[name]
                return SharedState()
        else:
            entry.failures += 1
            if entry.failures >= verdict.reopen_after:
                until = now + verdict.open_s
                entry = self._entries[name] = _Entry(verdict.reopen_token, until, until + FORGET_AFTER_S)
        return self._view(entry, now)


# Keys per breaker (one hash tag, so Redis Cluster keeps them in one slot):
#   open   -> trip token, PX = the open period; its PTTL is the time left open
#   trip   -> trip token, PX = open period + FORGET_AFTER_S; present while open or half-open
#   probes -> probe slots taken while half-open, PX = the probe lease
#   ok, failed -> probe verdicts counted in this open period
_READ = """
local trip = redis.call('GET', KEYS[2])
if not trip then return {'', 0} end
local ttl = redis.call('PTTL', KEYS[1])
if ttl < 0 then ttl = 0 end
return {trip, ttl}
"""
_TRIP = """
local ttl = redis.call('PTTL', KEYS[1])
local trip = redis.call('GET', KEYS[2])
if ttl > 0 and trip then return {trip, ttl} end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[3])
redis.call('DEL', KEYS[3], KEYS[4], KEYS[5])
return {ARGV[1], tonumber(ARGV[2])}
"""
_CLAIM = """
local trip = redis.call('GET', KEYS[2])
if not trip then return {0, '', 0} end
local ttl = redis.call('PTTL', KEYS[1])
if ttl > 0 then return {1, trip, ttl} end
if tonumber(redis.call('GET', KEYS[3]) or '0') >= tonumber(ARGV[1]) then return {2, trip, 0} end
redis.call('INCR', KEYS[3])
redis.call('PEXPIRE', KEYS[3], ARGV[2])
return {3, trip, 0}
"""
_RELEASE = """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
if tonumber(redis.call('GET', KEYS[3]) or '0') > 0 then redis.call('DECR', KEYS[3]) end
return 1
"""
# ARGV: trip, ok (1/0), close_after, reopen_after, reopen token, open ms, forget ms
_VERDICT = """
local trip = redis.call('GET', KEYS[2])
if not trip then return {'', 0} end
if trip ~= ARGV[1] then
  local ttl = redis.call('PTTL', KEYS[1])
  if ttl < 0 then ttl = 0 end
  return {trip, ttl}
end
if tonumber(redis.call('GET', KEYS[3]) or '0') > 0 then redis.call('DECR', KEYS[3]) end
if ARGV[2] == '1' then
  local ok = redis.call('INCR', KEYS[4])
  redis.call('PEXPIRE', KEYS[4], ARGV[7])
  if ok >= tonumber(ARGV[3]) then
    redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5])
    return {'', 0}
  end
else
  local failed = redis.call('INCR', KEYS[5])
  redis.call('PEXPIRE', KEYS[5], ARGV[7])
  if failed >= tonumber(ARGV[4]) then
    redis.call('SET', KEYS[1], ARGV[5], 'PX', ARGV[6])
    redis.call('SET', KEYS[2], ARGV[5], 'PX', ARGV[7])
    redis.call('DEL', KEYS[3], KEYS[4], KEYS[5])
    return {ARGV[5], tonumber(ARGV[6])}
  end
end
return {trip, 0}
"""
_CLAIMS = {0: ProbeClaim.CLOSED, 1: ProbeClaim.OPEN, 2: ProbeClaim.FULL, 3: ProbeClaim.GRANTED}


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _shared(trip: Any, ttl_ms: Any) -> SharedState:
    token = _text(trip)
    return SharedState(token, max(0, int(ttl_ms)) / 1000) if token else SharedState()


class RedisBreakerStore:
    """Breaker state shared by every replica through Redis: keys with TTLs, each transition one Lua script.

    Each call is bounded by `op_timeout_s`; after a failure the store refuses at once (no network) for
    `retry_after_s`, so an outage costs the request path one timeout per period, not one per request.
    """

    def __init__(
        self,
        redis: Redis,
        key_prefix: str = "strata:breaker:",
        *,
        op_timeout_s: float = 0.5,
        retry_after_s: float = 2.0,
    ) -> None:
        self._prefix = key_prefix
        self._op_timeout_s = op_timeout_s
        self._retry_after_s = retry_after_s
        self._down_until = 0.0
        self._read, self._trip, self._claim, self._release, self._verdict = (
            redis.register_script(script) for script in (_READ, _TRIP, _CLAIM, _RELEASE, _VERDICT)
        )

    def _keys(self, name: str) -> list[str]:
        base = f"{self._prefix}{{{name}}}"
        return [f"{base}:open", f"{base}:trip", f"{base}:probes", f"{base}:ok", f"{base}:failed"]

    async def _run(self, script: Any, name: str, *args: object) -> Any:
        if time.monotonic() < self._down_until:
            raise BreakerStoreError("redis unreachable; retrying shortly")
        try:
            async with asyncio.timeout(self._op_timeout_s):
                return await script(keys=self._keys(name), args=list(args))
        except (RedisError, OSError, TimeoutError) as exc:
            self._down_until = time.monotonic() + self._retry_after_s
            raise BreakerStoreError(f"redis: {exc!r}") from exc

    async def read(self, name: str) -> SharedState:
        trip, ttl = await self._run(self._read, name)
        return _shared(trip, ttl)

    async def trip(self, name: str, token: str, open_s: float) -> SharedState:
        trip, ttl = await self._run(self._trip, name, token, _ms(open_s), _ms(open_s + FORGET_AFTER_S))
        return _shared(trip, ttl)

    async def claim_probe(self, name: str, limit: int, lease_s: float) -> tuple[ProbeClaim, SharedState]:
        code, trip, ttl = await self._run(self._claim, name, limit, _ms(lease_s))
        return _CLAIMS[int(code)], _shared(trip, ttl)

    async def release_probe(self, name: str, trip: str) -> None:
        await self._run(self._release, name, trip)

    async def probe_verdict(self, name: str, trip: str, verdict: ProbeVerdict) -> SharedState:
        open_ms = _ms(verdict.open_s)
        token, ttl = await self._run(
            self._verdict,
            name,
            trip,
            1 if verdict.ok else 0,
            verdict.close_after,
            verdict.reopen_after,
            verdict.reopen_token,
            open_ms,
            open_ms + _ms(FORGET_AFTER_S),
        )
        return _shared(token, ttl)


class _SlidingWindow:
    """Outcomes over the last `window_s` in fixed slices: O(1) per event, the oldest slice drops whole."""

    __slots__ = ("_failures", "_head", "_requests", "_width", "failures", "requests")

    def __init__(self, window_s: float, slices: int = 10) -> None:
        self._width = window_s / slices
        self._requests = [0] * slices
        self._failures = [0] * slices
        self._head = 0  # absolute index of the newest slice
        self.requests = 0
        self.failures = 0

    def _advance(self, now: float) -> None:
        index = int(now // self._width)
        gap = index - self._head
        if gap <= 0:
            return
        if gap >= len(self._requests):
            self.clear()
        else:
            for absolute in range(self._head + 1, index + 1):
                slot = absolute % len(self._requests)
                self.requests -= self._requests[slot]
                self.failures -= self._failures[slot]
                self._requests[slot] = self._failures[slot] = 0
        self._head = index

    def add(self, now: float, failed: bool) -> None:
        self._advance(now)
        slot = self._head % len(self._requests)
        self._requests[slot] += 1
        self.requests += 1
        if failed:
            self._failures[slot] += 1
            self.failures += 1

    def totals(self, now: float) -> tuple[int, int]:
        """(failures, requests) in the window."""
        self._advance(now)
        return self.failures, self.requests

    def clear(self) -> None:
        self._requests = [0] * len(self._requests)
        self._failures = [0] * len(self._requests)
        self.requests = self.failures = 0


class CircuitBreaker:
    """One deployment's breaker. Call `allow()` before a request, then exactly one of `record_success()`,
    `record_failure()` or `release_probe()` (ended without a verdict, e.g. the client went away).

    Verdicts are not tied to a request: while this replica holds probe slots, the next verdict is taken as a
    probe's; verdicts that arrive while open (requests let in before the trip) are ignored.
    """

    def __init__(
        self,
        name: str,
        config: BreakerConfig,
        store: BreakerStore | None = None,
        clock: Clock = time.monotonic,
        *,
        sync_interval_s: float = 0.25,
        probe_lease_s: float = 60.0,
    ) -> None:
        self.name = name
        self._config = config
        self._store: BreakerStore = store if store is not None else MemoryBreakerStore(clock)
        self._clock = clock
        self._sync_interval_s = sync_interval_s
        self._probe_lease_s = probe_lease_s  # a probe slot held by a replica that died frees itself after this
        self._window = _SlidingWindow(config.window_s)
        self._consecutive = 0
        self._trip: str | None = None  # the open period this replica knows of; None: closed
        self._published = True  # False: tripped while the store was down, not yet shared
        self._opened_at: float | None = None
        self._open_until = 0.0
        self._probes = 0  # probe slots this replica holds
        self._refuse_until = 0.0  # half-open with every slot taken elsewhere: ask the store again after this
        self._next_sync = float("-inf")
        self._store_ok = True
        # Half-open verdicts: this many failed probes re-open it, this many successful ones close it (the
        # window's rule applied to half_open_probes requests: the first count to be reached decides).
        self._reopen_after = max(1, math.ceil(config.failure_rate * config.half_open_probes - _EPSILON))
        self._close_after = config.half_open_probes - self._reopen_after + 1
        self._probe_ok = 0  # this replica's verdicts in this open period: they decide while the store is down
        self._probe_failed = 0

    @property
    def state(self) -> BreakerState:
        """The locally known state: no I/O, may lag other replicas by up to `sync_interval_s`."""
        if self._trip is None:
            return BreakerState.CLOSED
        return BreakerState.OPEN if self._clock() < self._open_until else BreakerState.HALF_OPEN

    @property
    def retry_in_s(self) -> float:
        """Until the next probe may go, as far as this replica knows (no I/O): what a refusal's Retry-After
        says. 0 when closed or half-open with a free slot; while every slot is taken, a short while."""
        if self._trip is None:
            return 0.0
        now = self._clock()
        if now < self._open_until:
            return self._open_until - now
        if now < self._refuse_until or self._probes >= self._config.half_open_probes:
            return max(self._refuse_until - now, self._sync_interval_s)
        return 0.0

    async def allow(self) -> bool:
        """May a request go upstream now? When half-open, True means a probe slot was claimed."""
        now = self._clock()
        if now >= self._next_sync:
            await self._sync(now)
            now = self._clock()
        if self._trip is None:
            return True
        if now < self._open_until or now < self._refuse_until or self._probes >= self._config.half_open_probes:
            return False
        return await self._claim_probe()

    async def record_success(self) -> None:
        if self._trip is None:
            self._consecutive = 0
            self._window.add(self._clock(), failed=False)
        elif self._probes > 0:
            await self._judge(ok=True)

    async def record_failure(self) -> None:
        now = self._clock()
        if self._trip is None:
            self._consecutive += 1
            self._window.add(now, failed=True)
            if self._should_trip():
                await self._open(now)
        elif self._probes > 0:
            await self._judge(ok=False)

    async def release_probe(self) -> None:
        """Give back a probe slot whose request ended without telling whether the backend works."""
        if self._trip is None or self._probes == 0:
            return
        self._probes -= 1
        await self._call(self._store.release_probe(self.name, self._trip))

    async def snapshot(self) -> BreakerSnapshot:
        """The current state, read fresh from the store."""
        await self._sync(self._clock())
        now = self._clock()
        failures, requests = self._window.totals(now)
        return BreakerSnapshot(
            name=self.name,
            state=self.state,
            consecutive_failures=self._consecutive,
            window_failures=failures,
            window_requests=requests,
            probes_in_flight=self._probes,
            opened_at=self._opened_at,
            retry_in_s=self.retry_in_s,
            store_ok=self._store_ok,
        )

    def _should_trip(self) -> bool:
        """The rate once the window holds `min_requests`; below that (low traffic) a run of failures."""
        failures, requests = self._window.failures, self._window.requests  # current: a failure was just added
        if requests < self._config.min_requests:
            return self._consecutive >= self._config.consecutive_failures
        return failures / requests >= self._config.failure_rate - _EPSILON

    async def _judge(self, *, ok: bool) -> None:
        """One probe's outcome, counted where every replica's probes are counted; follow the decision."""
        trip = self._trip
        assert trip is not None
        self._probes -= 1
        if ok:
            self._probe_ok += 1
        else:
            self._probe_failed += 1
        verdict = ProbeVerdict(ok, self._close_after, self._reopen_after, uuid.uuid4().hex, self._config.open_s)
        shared = await self._call(self._store.probe_verdict(self.name, trip, verdict)) if self._published else None
        if self._trip != trip:  # closed or re-opened meanwhile, by another verdict or a sync
            return
        if shared is not None:
            self._adopt(shared)
            return
        # The store is unreachable, or does not know this open period yet: this replica's probes decide.
        if self._probe_ok >= self._close_after:
            self._close_local()
        elif self._probe_failed >= self._reopen_after:
            self._open_local(verdict.reopen_token, self._config.open_s, self._clock(), published=False)

    async def _open(self, now: float) -> None:
        token = uuid.uuid4().hex
        self._open_local(token, self._config.open_s, now, published=False)  # refuse at once, share after
        shared = await self._call(self._store.trip(self.name, token, self._config.open_s))
        if shared is not None:
            self._published = True
            self._adopt(shared)

    async def _claim_probe(self) -> bool:
        before = self._trip
        claimed = await self._call(
            self._store.claim_probe(self.name, self._config.half_open_probes, self._probe_lease_s)
        )
        if claimed is None:
            return self._claim_local()
        outcome, shared = claimed
        if outcome is ProbeClaim.GRANTED:
            if shared.trip != self._trip:
                if self._trip != before:  # we re-opened or closed meanwhile, and that freed the slot
                    return self._trip is None
                self._adopt(shared)  # a newer open period, started by another replica
            self._probes += 1
            return True
        if outcome is ProbeClaim.CLOSED and not self._published:
            return self._claim_local()
        self._adopt(shared)
        if outcome is ProbeClaim.FULL:
            self._refuse_until = self._clock() + self._sync_interval_s
        return self._trip is None

    def _claim_local(self) -> bool:
        if self._probes >= self._config.half_open_probes:
            return False
        self._probes += 1
        return True

    async def _sync(self, now: float) -> None:
        self._next_sync = now + self._sync_interval_s
        if self._trip is not None and not self._published:
            remaining = max(self._open_until - now, 0.001)
            shared = await self._call(self._store.trip(self.name, self._trip, remaining))
            if shared is not None:
                self._published = True
        else:
            shared = await self._call(self._store.read(self.name))
        if shared is not None:
            self._adopt(shared)

    def _adopt(self, shared: SharedState) -> None:
        """Take the store's view as the truth, except for a local trip not yet published."""
        now = self._clock()
        if shared.trip is None:
            if self._trip is not None and self._published:
                self._close_local()
        elif shared.trip != self._trip:
            self._open_local(shared.trip, shared.open_remaining_s, now, published=True)
        else:
            self._open_until = now + shared.open_remaining_s

    def _open_local(self, trip: str, open_s: float, now: float, *, published: bool) -> None:
        if self._trip is None:
            log.warning("circuit breaker opened", deployment=self.name, open_s=round(open_s, 3), by_us=not published)
        elif self._trip != trip:
            log.info("circuit breaker re-opened: probes failed", deployment=self.name, open_s=round(open_s, 3))
        self._trip = trip
        self._published = published
        self._opened_at = now - max(0.0, self._config.open_s - open_s)
        self._open_until = now + open_s
        self._probes = self._probe_ok = self._probe_failed = 0
        self._refuse_until = 0.0
        self._consecutive = 0
        self._window.clear()

    def _close_local(self) -> None:
        log.info("circuit breaker closed", deployment=self.name)
        self._trip = None
        self._published = True
        self._opened_at = None
        self._open_until = 0.0
        self._probes = self._probe_ok = self._probe_failed = 0
        self._refuse_until = 0.0
        self._consecutive = 0
        self._window.clear()

    async def _call(self, operation: Awaitable[T]) -> T | None:
        """Run a store operation; on any error warn once and return None, so the caller goes on locally."""
        try:
            result = await operation
        except Exception as exc:  # the store must never break a request
            if self._store_ok:
                log.warning("breaker store unavailable, using local state", deployment=self.name, error=str(exc))
                self._store_ok = False
            return None
        if not self._store_ok:
            log.info("breaker store reachable again", deployment=self.name)
            self._store_ok = True
        return result
