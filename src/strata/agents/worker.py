"""Claims queued runs and executes them under a heartbeated lease.

Every `strata serve` runs one worker; on PostgreSQL they share the queue (claims use
`FOR UPDATE SKIP LOCKED`). A worker that dies stops heartbeating; its runs' leases expire and any
worker's sweeper puts them back in the queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import uuid
from collections.abc import Callable, Collection

import structlog

from strata.agents.engine import RunEngine
from strata.resilience.retry import backoff
from strata.store.runs import LeaseLost, RunStore
from strata.store.tables import Run

log = structlog.get_logger("strata.worker")
SWEEP_RETRY_S = 0.1  # the first retry of a failed lease sweep; doubling up to half a lease
SWEEP_WARN_AFTER = 5  # failed sweeps in a row before a warning


class _Why(enum.Enum):
    CANCEL = "cancel"
    LEASE_LOST = "lease_lost"
    SHUTDOWN = "shutdown"


class RunWorker:
    def __init__(
        self,
        store: RunStore,
        engine: RunEngine,
        *,
        concurrency: int,
        lease_s: float,
        poll_s: float,
        serves: Callable[[], Collection[str]] | None = None,
    ) -> None:
        """`serves`: the models this replica serves now; runs of other models are left to replicas that do."""
        self.store = store
        self.engine = engine
        self._serves = serves
        self.owner = f"worker_{uuid.uuid4().hex[:12]}"
        self._claims = itertools.count(1)
        self.concurrency = concurrency
        self.lease_s = lease_s
        self.poll_s = poll_s
        self._active: dict[str, asyncio.Task[None]] = {}
        self._why: dict[str, _Why] = {}
        self._reserved = 0  # slots held for runs being created already claimed by this worker (`reserve`)
        self._stopped = False
        self._ended: dict[str, asyncio.Future[Run | None]] = {}  # see `ended`
        self._wakeup = asyncio.Event()
        self._loops: list[asyncio.Task[None]] = []

    def wake(self) -> None:
        self._wakeup.set()

    def serves(self, model: str | None) -> bool:
        return self._serves is None or model is None or model in self._serves()

    def claim_token(self) -> str:
        """The lease owner of one claim: this worker's id and the claim's number. Writes are fenced on it, so when
        a run's lease expired and this same worker claimed it again, the stale execution is fenced out too."""
        return f"{self.owner}.{next(self._claims)}"

    def start(self) -> None:
        if self.concurrency > 0:
            self._loops = [
                asyncio.create_task(self._claim_loop(), name="runs:claim"),
                asyncio.create_task(self._sweep_loop(), name="runs:sweep"),
            ]

    async def stop(self) -> None:
        """Stop claiming; hand running runs back to the queue so another replica resumes them at once."""
        self._stopped = True
        for loop in self._loops:
            loop.cancel()
        for run_id, task in list(self._active.items()):
            self._why[run_id] = _Why.SHUTDOWN
            task.cancel()
        if self._active:
            await asyncio.gather(*self._active.values(), return_exceptions=True)
        for loop in self._loops:
            with contextlib.suppress(asyncio.CancelledError):
                await loop

    def reserve(self) -> bool:
        """Hold a free slot for a run about to be created already claimed by this worker (the hand-off: no claim
        round trip). False when none is free: the run is queued, and claimed later by any replica. Every True
        must be followed by `adopt` (the run was created claimed) or `unreserve` (it was not)."""
        if self._stopped or not self._loops or len(self._active) + self._reserved >= self.concurrency:
            return False
        self._reserved += 1
        return True

    def unreserve(self) -> None:
        self._reserved -= 1

    def adopt(self, run: Run) -> bool:
        """Start a run created claimed by this worker (after `reserve`), at once. False if the worker has stopped
        meanwhile: the caller must then `store.release` the run (or its lease expires and it is swept)."""
        self._reserved -= 1
        if self._stopped:
            return False
        self._active[run.id] = asyncio.create_task(self._execute(run), name=f"run:{run.id}")
        return True

    def ended(self, run_id: str) -> asyncio.Future[Run | None] | None:
        """None if this worker is not executing the run now; else a future of the run as its execution here left it
        (completed, failed or cancelled by the engine, with its counters and end as written), or None when it
        stopped otherwise (paused for approval, lease lost, cancelled, shut down): then read the run."""
        if run_id not in self._active:
            return None
        future = self._ended.get(run_id)
        if future is None:
            future = self._ended[run_id] = asyncio.get_running_loop().create_future()
        return future

    def cancel_local(self, run_id: str) -> bool:
        """Cancel a run this worker is executing now (cancels on other replicas go by heartbeat)."""
        task = self._active.get(run_id)
        if task is None:
            return False
        self._why[run_id] = _Why.CANCEL
        task.cancel()
        return True

    async def _claim_loop(self) -> None:
        while True:
            try:
                while len(self._active) + self._reserved < self.concurrency:
                    served = self._serves() if self._serves is not None else None
                    run = await self.store.claim(self.claim_token(), self.lease_s, served)
                    if run is None:
                        break
                    self._active[run.id] = asyncio.create_task(self._execute(run), name=f"run:{run.id}")
            except Exception:
                log.exception("claiming runs failed; retrying")
            self._wakeup.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), self.poll_s)

    async def _sweep_loop(self) -> None:
        """Every half lease. A sweep that fails (SQLite's `database is locked` when the request path holds the
        write lock past busy_timeout) is tried again sooner, backed off, and said once it keeps failing: it is
        maintenance, and a lease sweep that comes a moment late only delays a crashed worker's runs."""
        failures = 0
        while True:
            interval = self.lease_s / 2
            await asyncio.sleep(backoff(failures, SWEEP_RETRY_S, interval) if failures else interval)
            try:
                swept = await self.store.sweep_expired()
            except Exception as exc:
                failures += 1
                if failures == SWEEP_WARN_AFTER:
                    log.warning("sweeping expired leases keeps failing; retrying", error=str(exc), attempts=failures)
                else:
                    log.debug("sweeping expired leases failed; retrying", error=str(exc), attempts=failures)
                continue
            failures = 0
            if swept:
                log.warning("runs with expired leases returned to the queue", count=swept)
                self.wake()

    async def _execute(self, run: Run) -> None:
        # This task's own context: every line logged while the run executes names it (and its trace, from
        # the run's invoke_agent span).
        structlog.contextvars.bind_contextvars(run_id=run.id, agent=run.agent)
        execution = asyncio.current_task()
        assert execution is not None
        owner = run.lease_owner  # this claim's token (`claim_token`)
        assert owner is not None, "only a claimed run executes"
        heartbeat = asyncio.create_task(self._heartbeat(run.id, owner, execution))
        final: Run | None = None
        try:
            final = await self.engine.execute(run, owner)
        except asyncio.CancelledError:
            why = self._why.get(run.id)
            if why is None:
                raise
            try:
                if why is _Why.CANCEL:
                    await self.engine.end(run, owner, "cancelled", "cancelled by request")
                elif why is _Why.SHUTDOWN:
                    await self.store.release(run.id, owner)
            except LeaseLost:
                log.warning("run taken over by another worker before it could be stopped", run_id=run.id)
        except Exception:
            log.exception("run execution crashed; it will be retried after its lease expires", run_id=run.id)
        finally:
            heartbeat.cancel()
            self._active.pop(run.id, None)
            self._why.pop(run.id, None)
            ended = self._ended.pop(run.id, None)
            if ended is not None and not ended.done():
                ended.set_result(final)
            self.wake()

    async def _heartbeat(self, run_id: str, owner: str, execution: asyncio.Task[None]) -> None:
        while True:
            await asyncio.sleep(self.lease_s / 3)
            try:
                beat = await self.store.heartbeat(run_id, owner, self.lease_s)
            except Exception:
                log.exception("heartbeat failed", run_id=run_id)
                continue
            if not beat.alive:
                self._why[run_id] = _Why.LEASE_LOST
                execution.cancel()
                return
            if beat.cancel_requested:
                self._why[run_id] = _Why.CANCEL
                execution.cancel()
                return
