"""Admission control: at most N requests in flight, then a bounded FIFO queue, then refusal at once.

Overload becomes a fast refusal with a Retry-After (serving turns `Overloaded` into a 503) instead of a
queue that grows without bound until every request times out.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from types import TracebackType
from typing import Literal

from strata.config import AdmissionConfig

OverloadReason = Literal["queue_full", "queue_timeout"]

_MIN_RETRY_AFTER_S = 1.0
_MAX_RETRY_AFTER_S = 60.0  # one very long wait must not tell clients to stay away for minutes
_WAIT_WEIGHT = 0.2  # weight of the newest queue wait in the moving average behind Retry-After


class Overloaded(Exception):
    """Refused by admission control: `reason` says whether the queue was full or the wait ran out.

    `in_flight` and `queued` are the controller's counts at the moment of refusal, for logs and metrics.
    """

    def __init__(
        self, message: str, *, reason: OverloadReason, retry_after_s: float, in_flight: int, queued: int
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason
        self.retry_after_s = retry_after_s
        self.in_flight = in_flight
        self.queued = queued


class AdmissionController:
    """Admits up to `max_in_flight` at once; up to `max_queue` more wait, first come first served.

    A released slot is handed straight to the longest waiter, so a newcomer can never overtake the
    queue. A waiter gives up after `max_queue_wait_s` (timed on the event loop's clock); `clock` only
    measures queue waits, whose moving average becomes the suggested Retry-After. With `max_queue` or
    `max_queue_wait_s` at 0 nothing waits: a request that finds every slot taken is refused at once.
    """

    __slots__ = ("_avg_wait_s", "_clock", "_in_flight", "_max_in_flight", "_max_queue", "_max_wait_s", "_waiters")

    def __init__(
        self,
        max_in_flight: int,
        max_queue: int,
        max_queue_wait_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_in_flight < 1 or max_queue < 0 or max_queue_wait_s < 0:
            raise ValueError("need max_in_flight >= 1, max_queue >= 0, max_queue_wait_s >= 0")
        self._max_in_flight = max_in_flight
        self._max_queue = max_queue
        self._max_wait_s = max_queue_wait_s
        self._clock = clock
        self._in_flight = 0
        # Waiters in arrival order; a future's result says whether it got a slot (True) or timed out.
        # Never longer than max_queue (plus, briefly, cancelled waiters about to remove themselves).
        self._waiters: OrderedDict[asyncio.Future[bool], None] = OrderedDict()
        self._avg_wait_s = 0.0

    @classmethod
    def from_config(cls, config: AdmissionConfig, clock: Callable[[], float] = time.monotonic) -> AdmissionController:
        return cls(config.max_in_flight, config.max_queue, config.max_queue_wait_s, clock)

    @property
    def in_flight(self) -> int:
        """Slots taken, including one just handed to a waiter that has not resumed yet."""
        return self._in_flight

    @property
    def queued(self) -> int:
        return len(self._waiters)

    def admit(self) -> Admission:
        """`async with controller.admit():` holds one slot for the block; raises `Overloaded` if refused."""
        return Admission(self)

    async def acquire(self) -> None:
        """Take a slot, waiting in the queue if need be; pair with `release()` (for work that outlives a block)."""
        if self._in_flight < self._max_in_flight and not self._waiters:
            self._in_flight += 1
            return
        if len(self._waiters) >= self._max_queue or self._max_wait_s <= 0:
            raise self._refusal("queue_full")
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[bool] = loop.create_future()
        self._waiters[waiter] = None
        started = self._clock()
        timer = loop.call_later(self._max_wait_s, self._expire, waiter)
        try:
            admitted = await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.result():
                self._release()  # a slot arrived just as we were cancelled: pass it on
            else:
                self._waiters.pop(waiter, None)
            raise
        finally:
            timer.cancel()
        self._observe_wait(self._clock() - started)
        if not admitted:
            raise self._refusal("queue_timeout")

    def release(self) -> None:
        """Give back a slot taken by `acquire()`: it goes to the longest waiter, if any."""
        if self._in_flight <= 0:
            raise RuntimeError("release() without a matching acquire()")
        self._release()

    def _release(self) -> None:
        while self._waiters:
            waiter, _ = self._waiters.popitem(last=False)
            if not waiter.done():  # skip waiters cancelled but not yet resumed to remove themselves
                waiter.set_result(True)
                return
        self._in_flight -= 1

    def _expire(self, waiter: asyncio.Future[bool]) -> None:
        if not waiter.done():
            self._waiters.pop(waiter, None)
            waiter.set_result(False)

    def _observe_wait(self, wait_s: float) -> None:
        self._avg_wait_s += _WAIT_WEIGHT * (max(wait_s, 0.0) - self._avg_wait_s)

    def _refusal(self, reason: OverloadReason) -> Overloaded:
        retry_after = float(min(_MAX_RETRY_AFTER_S, max(_MIN_RETRY_AFTER_S, math.ceil(self._avg_wait_s))))
        what = "the admission queue is full" if reason == "queue_full" else "timed out waiting for admission"
        return Overloaded(
            f"overloaded: {what} ({self._in_flight} in flight, {len(self._waiters)} queued)",
            reason=reason,
            retry_after_s=retry_after,
            in_flight=self._in_flight,
            queued=len(self._waiters),
        )


class Admission:
    """One slot held for the duration of an `async with` block, released however the block ends."""

    __slots__ = ("_controller",)

    def __init__(self, controller: AdmissionController) -> None:
        self._controller = controller

    async def __aenter__(self) -> None:
        await self._controller.acquire()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._controller.release()
