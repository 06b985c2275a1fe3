"""Retries with full-jitter backoff, bounded by a sliding-window retry budget.

Backoff alone does not protect a failing backend: with every request failing, each one still brings
`max_attempts - 1` retries. The budget caps retries at a fraction of recent original requests (plus a
small reserve), so retries can never multiply the load on a backend that is already down
(the retry budgets of Envoy and Finagle). Which failures are retryable is the caller's decision.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from datetime import UTC
from email.utils import parsedate_to_datetime

from strata.config import RetryConfig

_EPSILON = 1e-9  # so that e.g. 0.29 * 100 still allows the 29th retry despite float rounding
_MAX_EXPONENT = 64  # 2**64 times any initial backoff is far past any cap; avoids float overflow


def backoff(
    attempt: int, initial_s: float, max_s: float, *, jitter: float = 1.0, rng: Callable[[], float] = random.random
) -> float:
    """The wait after failed attempt number `attempt` (1 = the first): `initial_s * 2**(attempt-1)` capped at
    `max_s`, scaled by a random factor in `[1 - jitter, 1]`. Full jitter (1.0) spreads the retries of many
    clients that failed together; 0.5 keeps at least half the wait; 0 is the plain exponential. The one backoff
    every retry loop in Strata uses."""
    ceiling = min(max_s, initial_s * 2.0 ** min(max(attempt, 1) - 1, _MAX_EXPONENT))
    return ceiling * (1.0 - jitter + jitter * rng())


class RetryBudget:
    """Retries allowed in a sliding window: at most `ratio * requests + min_per_s * window_s`.

    The window is a ring of `buckets` counters that slides in steps of `window_s / buckets`, so each
    call is O(buckets) at worst (O(1) in practice) and memory is fixed whatever the load.
    """

    __slots__ = (
        "_clock",
        "_current",
        "_ratio",
        "_requests",
        "_reserve",
        "_retries",
        "_total_requests",
        "_total_retries",
        "_width",
        "refused",
    )

    def __init__(
        self,
        ratio: float,
        window_s: float,
        min_per_s: float,
        clock: Callable[[], float] = time.monotonic,
        *,
        buckets: int = 10,
    ) -> None:
        if ratio < 0 or window_s <= 0 or min_per_s < 0 or buckets < 1:
            raise ValueError("need ratio >= 0, window_s > 0, min_per_s >= 0, buckets >= 1")
        self._ratio = ratio
        self._reserve = min_per_s * window_s
        self._width = window_s / buckets
        self._clock = clock
        self._requests = [0] * buckets
        self._retries = [0] * buckets
        self._total_requests = 0
        self._total_retries = 0
        self._current = int(clock() // self._width)
        #: Retries refused since creation: a metric worth alerting on (the backend is failing a lot).
        self.refused = 0

    @classmethod
    def from_config(cls, config: RetryConfig, clock: Callable[[], float] = time.monotonic) -> RetryBudget:
        return cls(config.budget_ratio, config.budget_window_s, config.budget_min_per_s, clock)

    def record_request(self) -> None:
        """Count one original request (never a retry): it earns `ratio` of a retry."""
        slot = self._advance()
        self._requests[slot] += 1
        self._total_requests += 1

    def try_spend(self) -> bool:
        """Take one retry from the budget; False (and nothing taken) when the window has none left."""
        slot = self._advance()
        if self._total_retries + 1 > self._ratio * self._total_requests + self._reserve + _EPSILON:
            self.refused += 1
            return False
        self._retries[slot] += 1
        self._total_retries += 1
        return True

    @property
    def requests_in_window(self) -> int:
        self._advance()
        return self._total_requests

    @property
    def retries_in_window(self) -> int:
        self._advance()
        return self._total_retries

    def _advance(self) -> int:
        """Expire the buckets that slid out of the window; return the current bucket's slot."""
        size = len(self._requests)
        index = int(self._clock() // self._width)
        current = self._current
        if index > current:  # a clock that steps back just keeps counting in the current bucket
            for i in range(current + 1, min(index, current + size) + 1):
                slot = i % size
                self._total_requests -= self._requests[slot]
                self._total_retries -= self._retries[slot]
                self._requests[slot] = 0
                self._retries[slot] = 0
            self._current = current = index
        return current % size


class RetryPolicy:
    """When to retry and how long to wait first.

    An upstream `Retry-After` is honoured exactly, never shortened: one longer than `backoff_max_s`
    makes `should_retry` refuse, because a client should not be held that long inside one request;
    the caller then passes the upstream's answer (and its Retry-After) on to the client instead.
    """

    __slots__ = ("_budget", "_initial", "_max", "_max_attempts", "_rng")

    def __init__(self, config: RetryConfig, budget: RetryBudget, rng: Callable[[], float] = random.random) -> None:
        self._max_attempts = config.max_attempts
        self._initial = config.backoff_initial_s
        self._max = config.backoff_max_s
        self._budget = budget
        self._rng = rng

    @property
    def retry_after_cap_s(self) -> float:
        """The longest upstream Retry-After this policy waits out before retrying."""
        return self._max

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait after failed attempt number `attempt` (1 = the original) before the next.

        Full jitter, uniform(0, min(max, initial * 2**(attempt-1))), spreads retries of many clients
        that failed together; a `retry_after` from upstream replaces it (capped at `backoff_max_s`).
        """
        if attempt < 1:
            raise ValueError("attempt counts from 1")
        if retry_after is not None and not math.isnan(retry_after):
            return min(max(retry_after, 0.0), self._max)
        return backoff(attempt, self._initial, self._max, rng=self._rng)

    def should_retry(self, attempt: int, retry_after: float | None = None) -> bool:
        """May attempt number `attempt + 1` go ahead? Spends one retry from the budget when it says yes.

        No when `attempt` attempts are already the most allowed, when the upstream asked for a pause
        longer than `retry_after_cap_s`, or when the budget is spent (checked last, so a refusal for
        another reason takes nothing from it).
        """
        if attempt >= self._max_attempts:
            return False
        if retry_after is not None and retry_after > self._max:
            return False
        return self._budget.try_spend()


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds from a `Retry-After` value: delay-seconds or an HTTP date; None when absent or invalid.

    `now` is the wall-clock time (epoch seconds) a date is measured from; a date in the past gives 0.
    """
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        return seconds if math.isfinite(seconds) and seconds >= 0 else None
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # "-0000" or no zone: HTTP dates are always GMT
        when = when.replace(tzinfo=UTC)
    reference = time.time() if now is None else now
    return max(0.0, when.timestamp() - reference)
