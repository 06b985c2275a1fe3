"""Each request's share of its deployment's busy time: the basis of GPU-hour pricing.

A self-hosted deployment costs `gpu_usd_per_hour` whether it serves one request or sixty-four at once
(vLLM batches them together). Strata charges that cost by processor sharing: at every instant, the
deployment's time is split equally among the requests in flight on it. A request alone on the deployment
for 2 s is charged 2 s; four requests together for 2 s are charged 0.5 s each. Formally, with n(t) the
requests in flight, a request running from t0 to t1 is charged

    busy_s = integral over [t0, t1] of dt / n(t)

computed exactly, in O(1), from one running "share clock" S(t) = integral of dt / n(t) over the times the
deployment was busy: a request's share is S(t1) - S(t0). The shares of all requests add up to exactly the
time the deployment was busy (at least one request in flight); idle time is charged to nobody.

Why this and not alternatives: it needs nothing but the start and end of each request (no GPU counters,
no per-token model of the batch); it is exact rather than sampled; requests that stay longer (long prompts,
long answers) pay more, as they occupy batch slots longer; and the sum of charges equals the busy cost, so
reports reconcile with the GPU bill up to idle time. Its simplification: requests in flight together pay
alike per second even if one has a far longer prompt (a per-token weighting would need the batch's internal
state, which servers do not expose).

The clocks are per process: with N Strata replicas in front of one vLLM server, each replica sees only its
own requests, so a request is charged as if its replica's requests were alone on the deployment (more than
its true share). Give each replica its own deployment or account for it in the hourly price.

Everything runs on the event loop's thread: no locks.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class BusyClock:
    """The share clock of one deployment."""

    __slots__ = ("_clock", "_last", "_share", "busy_s_total", "in_flight")

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._last = clock()
        self._share = 0.0  # S(t): the integral of dt / n(t) while n(t) > 0
        self.in_flight = 0
        self.busy_s_total = 0.0  # time with at least one request in flight

    def _advance(self) -> float:
        now = self._clock()
        elapsed = max(0.0, now - self._last)
        if self.in_flight:
            self._share += elapsed / self.in_flight
            self.busy_s_total += elapsed
        self._last = now
        return self._share

    def start(self) -> BusySpan:
        """A request begins on the deployment (after admission: time queued is not GPU time)."""
        mark = self._advance()
        self.in_flight += 1
        return BusySpan(self, mark)

    def _finish(self, mark: float) -> float:
        share = self._advance() - mark
        self.in_flight -= 1
        return share


class BusySpan:
    """One request on one deployment; `finish()` (idempotent) returns its share of busy time in seconds."""

    __slots__ = ("_clock", "_mark", "busy_s")

    def __init__(self, clock: BusyClock, mark: float) -> None:
        self._clock: BusyClock | None = clock
        self._mark = mark
        self.busy_s = 0.0

    def finish(self) -> float:
        if self._clock is not None:
            self.busy_s = self._clock._finish(self._mark)
            self._clock = None
        return self.busy_s

    def __enter__(self) -> BusySpan:
        return self

    def __exit__(self, *_: object) -> None:
        self.finish()


class GpuTimeShares:
    """One `BusyClock` per deployment name, made on first use.

    Call `start(deployment)` once the request holds its admission slot and `finish()` on the span when the
    response (or stream) has ended, in a `finally`: a span never finished counts as in flight forever and
    lowers everyone else's share."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._clocks: dict[str, BusyClock] = {}

    def clock(self, deployment: str) -> BusyClock:
        found = self._clocks.get(deployment)
        if found is None:
            found = self._clocks[deployment] = BusyClock(self._clock)
        return found

    def start(self, deployment: str) -> BusySpan:
        return self.clock(deployment).start()

    def forget(self, deployment: str) -> None:
        """Drop a removed deployment's clock (hot swap); spans still open keep theirs."""
        self._clocks.pop(deployment, None)
