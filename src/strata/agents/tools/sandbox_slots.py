"""How many python calls run at once: a bound per agent run and one for the whole process.

One model turn may ask for any number of tool calls, which the engine runs together; without a
bound, one turn (or many runs) could start sandboxes until the host runs out of memory or pids.
Calls over a bound wait in order for a slot, up to a timeout, then fail with the reason.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Literal


class NoSlot(Exception):
    """No slot freed up in time; `bound` says which bound was full."""

    def __init__(self, bound: Literal["run", "total"]) -> None:
        super().__init__(bound)
        self.bound = bound


class CallSlots:
    def __init__(self, per_run: int, total: int) -> None:
        self.per_run = per_run
        self.total = total
        self._all = asyncio.Semaphore(total)
        self._runs: dict[str, tuple[asyncio.Semaphore, int]] = {}  # a run's slots and the calls using them

    @asynccontextmanager
    async def hold(self, run_id: str, timeout_s: float) -> AsyncIterator[float]:
        """Hold a slot of `run_id` and one of the process; yields the seconds spent waiting for them."""
        started = time.monotonic()
        run_slots = self._join(run_id)
        try:
            await _acquire(run_slots, timeout_s, "run")
            try:
                await _acquire(self._all, timeout_s - (time.monotonic() - started), "total")
                try:
                    yield time.monotonic() - started
                finally:
                    self._all.release()
            finally:
                run_slots.release()
        finally:
            self._leave(run_id)

    def _join(self, run_id: str) -> asyncio.Semaphore:
        slots, users = self._runs.get(run_id) or (asyncio.Semaphore(self.per_run), 0)
        self._runs[run_id] = (slots, users + 1)
        return slots

    def _leave(self, run_id: str) -> None:
        slots, users = self._runs[run_id]
        if users == 1:
            del self._runs[run_id]  # no entry outlives the run's last call
        else:
            self._runs[run_id] = (slots, users - 1)


async def _acquire(slots: asyncio.Semaphore, timeout_s: float, bound: Literal["run", "total"]) -> None:
    try:
        async with asyncio.timeout(max(timeout_s, 0)):  # a free slot is taken at once, even at 0
            await slots.acquire()
    except TimeoutError:
        raise NoSlot(bound) from None
