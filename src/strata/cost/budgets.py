"""Budgets per key, user and agent, per UTC day or month: hard ones refuse work, soft ones raise an alert.

Which budgets apply to a request: every configured budget (`cost.budgets`) whose scope names the caller —
its key id, its user, the agent it runs (name `"*"`: each key, user or agent has its own such budget) — and
the key's own `budget_usd`, which is a hard budget per calendar month (UTC) of that key.

- `check()` runs before work starts: when a hard budget is already spent (spent >= limit), the decision
  refuses with which budget, how much was spent, the limit, and when it resets (the next UTC midnight, or the
  first of the next month). The request that crosses a limit is not cut short; the next one is refused. With
  several requests in flight at once, a budget can be overshot by what those cost.
- `spend()` runs after: it adds the cost to every budget's counter. The spend that crosses a soft (or hard)
  limit calls `on_soft_limit` (`on_hard_limit`) once per period per budget and subject.

Counters hold integer nano-dollars (floating-point sums would let $0.10 x 10 fall short of $1.00). With
Redis, they are shared by every replica: one key per (scope, subject, period), INCRBY'd atomically, expiring a
day after the period ends; exactly one replica's spend crosses a limit, so an alert fires once. Without
Redis they live in this process. Either way a counter that does not exist yet (a new period, a restart
without Redis, a Redis that lost its data) is seeded from the usage table, so a restart does not reset
spending; the table lags by at most the usage writer's flush interval.

When Redis fails, budgets fail open (requests go through, a warning is logged, Redis is skipped for a few
seconds), like the rate limits: a Redis outage must not take the API down.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Literal, Protocol, TypeVar

import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError

from strata.config import BudgetConfig, StrataConfig
from strata.coordination import redis_client
from strata.resilience.single_flight import SingleFlight
from strata.security.principal import Principal
from strata.store.usage import UsageStore

log = structlog.get_logger("strata.budgets")

Scope = Literal["key", "user", "agent"]
Period = Literal["day", "month"]
BudgetKind = Literal["hard", "soft"]
NANO = 1_000_000_000
_EXPIRY_GRACE = timedelta(days=1)
_DOWN_BACKOFF_S = 5.0
_REDIS_TIMEOUT_S = 0.5
_PRUNE_EVERY_S = 60.0
T = TypeVar("T")


class _Failed:
    """What a counter call answers while Redis is failing."""


FAILED = _Failed()


@dataclass(frozen=True, slots=True)
class Budget:
    scope: Scope
    name: str  # key id, user or agent; "*": each one separately
    period: Period
    limit_usd: float
    kind: BudgetKind = "hard"
    source: Literal["config", "key"] = "config"  # "key": the key's own budget_usd

    @classmethod
    def from_config(cls, config: BudgetConfig) -> Budget:
        return cls(config.scope, config.name, config.period, config.limit_usd, config.kind)

    @property
    def limit_nano(self) -> int:
        return round(self.limit_usd * NANO)


@dataclass(frozen=True, slots=True)
class BudgetSubject:
    """Who spends: the key, the user, and the agent when the work is an agent's."""

    key_id: str | None
    user: str | None
    agent: str | None = None
    key_budget_usd: float | None = None  # the key's own monthly budget

    @classmethod
    def of(cls, principal: Principal, agent: str | None = None) -> BudgetSubject:
        return cls(principal.key_id, principal.user, agent, principal.budget_usd)

    def name(self, scope: Scope) -> str | None:
        return self.key_id if scope == "key" else self.user if scope == "user" else self.agent


@dataclass(frozen=True, slots=True)
class BudgetDecision:
    allowed: bool
    budget: Budget | None = None
    subject: str | None = None  # the key id, user or agent whose budget refused
    spent_usd: float = 0.0
    resets_at: datetime | None = None
    retry_after_s: int = 0
    message: str = ""

    @property
    def limit_usd(self) -> float | None:
        return self.budget.limit_usd if self.budget else None

    @property
    def headers(self) -> dict[str, str]:
        return {} if self.allowed else {"Retry-After": str(self.retry_after_s)}


ALLOWED = BudgetDecision(True)


@dataclass(frozen=True, slots=True)
class BudgetAlert:
    """A budget was reached: sent once per period per budget and subject, by the replica whose spend crossed."""

    budget: Budget
    subject: str
    spent_usd: float
    period_start: datetime
    resets_at: datetime
    message: str

    @property
    def kind(self) -> BudgetKind:
        return self.budget.kind


AlertCallback = Callable[[BudgetAlert], Awaitable[None] | None]


@dataclass(frozen=True, slots=True)
class _Applied:
    """A budget applied to a subject in the current period, with its counter's key."""

    budget: Budget
    subject: str
    counter: str
    period_start: datetime
    resets_at: datetime


def period_bounds(period: Period, now: datetime) -> tuple[datetime, datetime]:
    """[start, end) of the UTC day or month holding `now`."""
    now = now.astimezone(UTC)
    if period == "day":
        start = now.replace(hour=0, minute=0, second=0, microsecond=0)
        return start, start + timedelta(days=1)
    start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    end = start.replace(year=start.year + 1, month=1) if start.month == 12 else start.replace(month=start.month + 1)
    return start, end


def format_usd(value: float) -> str:
    if value == 0 or abs(value) >= 0.01:
        return f"${value:,.2f}"
    return "$" + f"{value:.6f}".rstrip("0").rstrip(".")


def _iso(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class _Counters(Protocol):
    async def get(self, keys: Sequence[str]) -> list[int | None]: ...

    async def add(self, keys: Sequence[str], amount: int) -> list[int | None]: ...

    async def seed(self, key: str, value: int, expires_at: datetime, ttl_s: int) -> None: ...

    async def aclose(self) -> None: ...


class _MemoryCounters:
    """This process's counters; those of past periods are dropped once they expire."""

    def __init__(self, clock: Callable[[], datetime]) -> None:
        self._clock = clock
        self._values: dict[str, int] = {}
        self._expiry: dict[str, datetime] = {}
        self._next_prune = 0.0

    async def get(self, keys: Sequence[str]) -> list[int | None]:
        return [self._values.get(key) for key in keys]

    async def add(self, keys: Sequence[str], amount: int) -> list[int | None]:
        out: list[int | None] = []
        for key in keys:
            if key in self._values:
                self._values[key] += amount
                out.append(self._values[key])
            else:
                out.append(None)
        return out

    async def seed(self, key: str, value: int, expires_at: datetime, ttl_s: int) -> None:
        self._prune()
        if key not in self._values:  # another task may have seeded it meanwhile
            self._values[key] = value
            self._expiry[key] = expires_at

    def _prune(self) -> None:
        now = time.monotonic()
        if now < self._next_prune:
            return
        self._next_prune = now + _PRUNE_EVERY_S
        wall = self._clock()
        for key in [k for k, expiry in self._expiry.items() if expiry <= wall]:
            del self._values[key], self._expiry[key]

    async def aclose(self) -> None:
        return None


# INCRBY each key that exists; -1 for a missing one (it must be seeded from the usage table first).
_ADD_SCRIPT = """
local out = {}
for i, key in ipairs(KEYS) do
  if redis.call('EXISTS', key) == 1 then
    out[i] = redis.call('INCRBY', key, ARGV[1])
  else
    out[i] = -1
  end
end
return out
"""


class _RedisCounters:
    """Counters every replica shares."""

    def __init__(self, redis: Redis, namespace: str, *, owned: bool) -> None:
        self._redis = redis
        self._prefix = f"{namespace}:budget:"
        self._owned = owned
        self._add = redis.register_script(_ADD_SCRIPT)

    async def get(self, keys: Sequence[str]) -> list[int | None]:
        values = await self._redis.mget([self._prefix + key for key in keys])
        return [None if v is None else int(v) for v in values]

    async def add(self, keys: Sequence[str], amount: int) -> list[int | None]:
        values = await self._add(keys=[self._prefix + key for key in keys], args=[amount])
        return [None if int(v) < 0 else int(v) for v in values]

    async def seed(self, key: str, value: int, expires_at: datetime, ttl_s: int) -> None:
        # A relative expiry: Redis's clock need not agree with ours.
        await self._redis.set(self._prefix + key, value, nx=True, ex=max(1, ttl_s))

    async def aclose(self) -> None:
        if self._owned:
            await self._redis.aclose()


class BudgetGuard:
    def __init__(
        self,
        budgets: Iterable[BudgetConfig | Budget],
        store: UsageStore | None,
        redis_url: str | None = None,
        *,
        redis: Redis | None = None,
        namespace: str = "strata",
        on_soft_limit: AlertCallback | None = None,
        on_hard_limit: AlertCallback | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        counters: _Counters | None = None,
    ) -> None:
        """`store` seeds counters (None: they start at 0). Pass `redis` to share the app's client, or
        `redis_url` for a client of its own, or `counters` (the supervisor's, shared by the worker processes
        of one machine: machine_state.py); none: counters in memory."""
        self.budgets = [b if isinstance(b, Budget) else Budget.from_config(b) for b in budgets]
        self._by_scope: dict[Scope, list[Budget]] = {"key": [], "user": [], "agent": []}
        for budget in self.budgets:
            self._by_scope[budget.scope].append(budget)
        self.store = store
        self.on_soft_limit = on_soft_limit
        self.on_hard_limit = on_hard_limit
        self._clock = clock
        self._counters: _Counters
        if counters is not None:
            self._counters = counters
        elif redis is not None:
            self._counters = _RedisCounters(redis, namespace, owned=False)
        elif redis_url is not None:
            client = redis_client(redis_url, socket_timeout=_REDIS_TIMEOUT_S, socket_connect_timeout=_REDIS_TIMEOUT_S)
            self._counters = _RedisCounters(client, namespace, owned=True)
        else:
            self._counters = _MemoryCounters(clock)
        self._down_until = 0.0  # monotonic: skip Redis until then, after it failed
        self._tasks: set[asyncio.Task[None]] = set()
        self._seeding: SingleFlight[str, bool] = SingleFlight()

    @classmethod
    def from_config(
        cls,
        config: StrataConfig,
        store: UsageStore | None,
        *,
        redis: Redis | None = None,
        on_soft_limit: AlertCallback | None = None,
        on_hard_limit: AlertCallback | None = None,
        counters: _Counters | None = None,
    ) -> BudgetGuard:
        return cls(
            config.cost.budgets,
            store,
            None if redis is not None else config.redis_url,
            redis=redis,
            on_soft_limit=on_soft_limit,
            on_hard_limit=on_hard_limit,
            counters=counters,
        )

    # -- before work ---------------------------------------------------------------------------------------

    async def check(self, principal: Principal, agent: str | None = None) -> BudgetDecision:
        """Refused when a hard budget that applies is already spent. No I/O when none applies."""
        return await self.check_subject(BudgetSubject.of(principal, agent))

    async def check_subject(self, subject: BudgetSubject) -> BudgetDecision:
        now = self._clock()
        hard = [a for a in self._applicable(subject, now) if a.budget.kind == "hard"]
        if not hard:
            return ALLOWED
        values = await self._values(hard)
        if values is None:
            return ALLOWED
        exceeded = [a for a in hard if values.get(a.counter, 0) >= a.budget.limit_nano]
        if not exceeded:
            return ALLOWED
        worst = max(exceeded, key=lambda a: (a.resets_at, a.budget.limit_usd))  # the one that lasts longest
        spent = values[worst.counter] / NANO
        return BudgetDecision(
            allowed=False,
            budget=worst.budget,
            subject=worst.subject,
            spent_usd=spent,
            resets_at=worst.resets_at,
            retry_after_s=max(1, math.ceil((worst.resets_at - now).total_seconds())),
            message=f"budget exceeded: {_describe(worst, spent)}; resets {_iso(worst.resets_at)}",
        )

    async def standing(self, subject: BudgetSubject) -> list[dict[str, object]]:
        """Every budget that applies to `subject` now, soft and hard, with what is spent and left (the console's
        usage page); spent is None when the counters cannot be read now."""
        applied = self._applicable(subject, self._clock())
        values = await self._values(applied) if applied else {}
        rows: list[dict[str, object]] = []
        for a in applied:
            spent = None if values is None else values.get(a.counter, 0) / NANO
            left = None if spent is None else max(0.0, a.budget.limit_usd - spent)
            rows.append({"scope": a.budget.scope, "name": a.subject, "period": a.budget.period,
                         "kind": a.budget.kind, "limit_usd": a.budget.limit_usd, "spent_usd": spent,
                         "left_usd": left, "resets_at": _iso(a.resets_at)})  # fmt: skip
        return rows

    # -- after work ----------------------------------------------------------------------------------------

    async def spend(self, principal: Principal, agent: str | None, usd: float) -> None:
        """Add a request's cost to every budget that applies. Never raises (failures are logged)."""
        await self.spend_subject(BudgetSubject.of(principal, agent), usd)

    def spend_soon(self, principal: Principal | BudgetSubject, agent: str | None, usd: float) -> None:
        """`spend`, off the response path: a task this guard keeps until done (and `aclose` waits for)."""
        if usd <= 0:
            return
        subject = principal if isinstance(principal, BudgetSubject) else BudgetSubject.of(principal, agent)
        if not self._applicable(subject, self._clock()):
            return
        self._keep(self.spend_subject(subject, usd))

    async def spend_subject(self, subject: BudgetSubject, usd: float) -> None:
        amount = round(usd * NANO) if usd > 0 else 0
        if amount <= 0:
            return
        try:
            applied = self._applicable(subject, self._clock())
            if applied:
                await self._spend(applied, amount)
        except Exception as exc:  # a budget must never fail the request that already succeeded
            log.warning("cannot count spending against budgets", error=repr(exc))

    async def aclose(self, timeout_s: float = 5.0) -> None:
        """Wait for spends in flight (bounded), then close Redis if this guard opened it."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout_s)
        await self._counters.aclose()

    # -- internals -----------------------------------------------------------------------------------------

    def _applicable(self, subject: BudgetSubject, now: datetime) -> list[_Applied]:
        found: list[_Applied] = []
        bounds: dict[Period, tuple[datetime, datetime]] = {}
        for scope, budgets in self._by_scope.items():
            name = subject.name(scope)
            if name is None:
                continue
            own = (
                [Budget("key", name, "month", subject.key_budget_usd, "hard", "key")]
                if scope == "key" and subject.key_budget_usd is not None
                else []
            )
            for budget in (*budgets, *own):
                if budget.name not in ("*", name):
                    continue
                if budget.period not in bounds:
                    bounds[budget.period] = period_bounds(budget.period, now)
                start, end = bounds[budget.period]
                label = f"{start:%Y-%m-%d}" if budget.period == "day" else f"{start:%Y-%m}"
                found.append(_Applied(budget, name, f"{scope}:{name}:{label}", start, end))
        return found

    async def _values(self, applied: Sequence[_Applied]) -> dict[str, int] | None:
        """Each counter's value, seeding missing ones; None when the counters cannot be read now."""
        by_counter = {a.counter: a for a in applied}
        keys = list(by_counter)
        values = await self._try(self._counters.get(keys))
        if isinstance(values, _Failed):
            return None
        missing = [by_counter[k] for k, v in zip(keys, values, strict=True) if v is None]
        found = {k: v for k, v in zip(keys, values, strict=True) if v is not None}
        if missing:
            if not await self._seed(missing):
                return None
            again = await self._try(self._counters.get([a.counter for a in missing]))
            if isinstance(again, _Failed):
                return None
            found.update({a.counter: v or 0 for a, v in zip(missing, again, strict=True)})
        return found

    async def _spend(self, applied: Sequence[_Applied], amount: int) -> None:
        by_counter = {a.counter: a for a in applied}
        keys = list(by_counter)
        values = await self._try(self._counters.add(keys, amount))
        if isinstance(values, _Failed):
            return
        after = {k: v for k, v in zip(keys, values, strict=True) if v is not None}
        missing = [by_counter[k] for k, v in zip(keys, values, strict=True) if v is None]
        # A counter not seeded yet: seed it from the usage table, then add. (If seeding fails, the spend is
        # still in the usage table, and a later seed will count it.)
        if missing and await self._seed(missing):
            again = await self._try(self._counters.add([a.counter for a in missing], amount))
            if not isinstance(again, _Failed):
                after.update({a.counter: v for a, v in zip(missing, again, strict=True) if v is not None})
        for item in applied:
            total = after.get(item.counter)
            if total is not None and total - amount < item.budget.limit_nano <= total:
                self._alert(item, total / NANO)

    async def _seed(self, applied: Sequence[_Applied]) -> bool:
        """Start missing counters from the usage table: one read per counter however many requests miss it
        together (a period's first requests, or every request after the counters were lost)."""
        seeded = await asyncio.gather(*(self._seeding.do(a.counter, partial(self._seed_one, a)) for a in applied))
        return all(seeded)

    async def _seed_one(self, item: _Applied) -> bool:
        present = await self._try(self._counters.get([item.counter]))
        if not isinstance(present, _Failed) and present[0] is not None:
            return True  # seeded by a flight that ended after this caller's read found it missing
        try:
            value = await self._spent(item)
        except Exception as exc:
            log.warning("cannot read past spending from the usage table; budgets not enforced now", error=repr(exc))
            return False
        expires_at = item.resets_at + _EXPIRY_GRACE
        ttl_s = math.ceil((expires_at - self._clock()).total_seconds())
        return not isinstance(await self._try(self._counters.seed(item.counter, value, expires_at, ttl_s)), _Failed)

    async def _spent(self, item: _Applied) -> int:
        if self.store is None:
            return 0
        return round(await self.store.spent(item.budget.scope, item.subject, item.period_start) * NANO)

    async def _try(self, call: Coroutine[object, object, T]) -> T | _Failed:
        """The counters' answer, or FAILED when Redis is failing (then budgets fail open)."""
        if self._down_until and time.monotonic() < self._down_until:
            call.close()
            return FAILED
        try:
            return await call
        except (RedisError, OSError) as exc:
            self._down_until = time.monotonic() + _DOWN_BACKOFF_S
            log.warning("budget counters unavailable: letting requests through", error=repr(exc))
            return FAILED

    def _alert(self, item: _Applied, spent: float) -> None:
        budget = item.budget
        message = f"budget reached: {_describe(item, spent)}; resets {_iso(item.resets_at)}"
        log.warning(message, kind=budget.kind, scope=budget.scope, subject=item.subject)
        callback = self.on_soft_limit if budget.kind == "soft" else self.on_hard_limit
        if callback is None:
            return
        alert = BudgetAlert(budget, item.subject, spent, item.period_start, item.resets_at, message)
        try:
            result = callback(alert)
        except Exception as exc:
            log.warning("budget alert callback failed", error=repr(exc))
            return
        if inspect.isawaitable(result):
            self._keep(result)

    def _keep(self, work: Awaitable[None]) -> None:
        async def run() -> None:
            try:
                await work
            except Exception as exc:
                log.warning("budget task failed", error=repr(exc))

        task = asyncio.create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _describe(item: _Applied, spent: float) -> str:
    budget = item.budget
    kind = "" if budget.kind == "hard" else "soft "
    return (
        f"{kind}{budget.scope} {item.subject} spent {format_usd(spent)} of {format_usd(budget.limit_usd)} "
        f"this {budget.period}"
    )
