"""The audit trail's background writer: request handlers record events without waiting for the database.

Policy, chosen so that no event is ever lost silently:

* `record()` only appends to an in-memory FIFO and returns; a background task writes it in batches (every
  `flush_interval_s`, or sooner once `batch` events wait), one transaction per batch.
* A failed write (database restarting, lock timeout) is retried with capped exponential backoff; the events
  stay queued, in order, until they are written.
* Backpressure: past `max_queue` waiting events the log keeps accepting (dropping an audit event is worse
  than using memory), logs one warning and reports `overloaded`, which admission control can use to refuse
  new work with 503. Past `max_backlog` it raises `AuditBacklogFull` instead: the caller fails loudly
  rather than the process growing without limit.
* A batch the database rejects for its content (not for being down) is split until the one bad event is
  found; that event is written to the error log in full, so it is kept, and the rest go on.
* `stop()` writes everything still queued; if the database stays down past its timeout, each unwritten
  event goes to the error log in full.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
from collections import deque

import structlog
from sqlalchemy.exc import DataError

from strata.security.audit import AuditRecord, canonical_json, normalized
from strata.store.audit import AuditStore

log = structlog.get_logger("strata.audit")

# Errors about the batch's content, which retrying cannot fix. Anything else (connection lost, lock timeout,
# a missing table, a conflicting id from an append that did not take the lock) is retried until it passes.
_CONTENT_ERRORS = (DataError, TypeError, ValueError)
_CONTENT_RETRIES = 3


class AuditBacklogFull(RuntimeError):
    """More audit events wait than `max_backlog`: the database has been unwritable for too long."""


class AuditLog:
    def __init__(
        self,
        store: AuditStore,
        max_queue: int = 10_000,
        batch: int = 200,
        flush_interval_s: float = 0.2,
        *,
        max_backlog: int | None = None,
        retry_initial_s: float = 0.05,
        retry_max_s: float = 5.0,
    ) -> None:
        self.store = store
        self.max_queue = max_queue
        self.max_backlog = max_backlog if max_backlog is not None else 10 * max_queue
        self.batch = batch
        self.flush_interval_s = flush_interval_s
        self.retry_initial_s = retry_initial_s
        self.retry_max_s = retry_max_s
        self._pending: deque[AuditRecord] = deque()
        self._recorded = 0  # events accepted, ever
        self._done = 0  # events written (or, if the database rejected them, logged), ever
        self._wake = asyncio.Event()
        self._progress = asyncio.Event()
        self._draining = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._closed = False
        self._deadline: float | None = None
        self._overloaded = False

    @property
    def pending(self) -> int:
        return len(self._pending)

    @property
    def overloaded(self) -> bool:
        """More than `max_queue` events wait: the database is not keeping up (or is down)."""
        return self._overloaded

    def record(self, record: AuditRecord) -> None:
        """Queue an event; never blocks. Call it from the event loop's thread."""
        if self._closed:  # nothing will write it any more: keep it in the error log
            log.error("audit event recorded after shutdown", record=canonical_json(normalized(record)).decode())
            return
        if len(self._pending) >= self.max_backlog:
            log.error("audit backlog full", pending=len(self._pending), action=record.action)
            raise AuditBacklogFull(f"{len(self._pending)} audit events are waiting for the database")
        self._pending.append(normalized(record))  # a copy: the caller may reuse its details dict
        self._recorded += 1
        if not self._overloaded and len(self._pending) > self.max_queue:
            self._overloaded = True
            log.warning("audit backpressure: events are queuing faster than they are written", pending=self.pending)
        if len(self._pending) >= self.batch:
            self._wake.set()

    async def start(self) -> None:
        if self._task is None:
            self._stopping, self._closed, self._deadline = False, False, None
            self._task = asyncio.create_task(self._run(), name="audit-writer")

    async def flush(self) -> None:
        """Wait until every event recorded before this call is written (retrying while the database is down)."""
        target = self._recorded
        if self._task is None or self._task.done():
            await self._drain()
        while self._done < target:
            self._progress.clear()
            self._wake.set()
            await self._progress.wait()

    async def stop(self, timeout_s: float = 30.0) -> None:
        """Write everything still queued, then end the writer. What cannot be written in time is logged."""
        self._stopping = True
        self._deadline = asyncio.get_running_loop().time() + timeout_s
        self._wake.set()
        if self._task is not None:
            done, _ = await asyncio.wait({self._task}, timeout=timeout_s + 1.0)
            if not done:  # stuck inside a database call past the deadline
                self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        else:
            await self._drain()
        for record in self._pending:
            log.error("audit event not written before shutdown", record=canonical_json(record).decode())
        self._done += len(self._pending)
        self._pending.clear()
        self._closed = True
        self._progress.set()

    async def _run(self) -> None:
        while True:
            if len(self._pending) < self.batch and not self._stopping:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.flush_interval_s)
            self._wake.clear()
            await self._drain()
            if self._stopping and (not self._pending or self._past_deadline()):
                return

    async def _drain(self) -> None:
        """Write the queue front to back; a batch leaves the queue only once it is written."""
        async with self._draining:  # one drain at a time, or two would write the same front batch
            await self._drain_locked()

    async def _drain_locked(self) -> None:
        size, delay, failures = self.batch, self.retry_initial_s, 0
        while self._pending:
            chunk = [self._pending[i] for i in range(min(size, len(self._pending)))]
            try:
                await self.store.append(chunk)
            except Exception as exc:
                failures += 1
                if isinstance(exc, _CONTENT_ERRORS) and failures >= _CONTENT_RETRIES:
                    if len(chunk) == 1:
                        self._discard(exc)
                    size, failures = max(1, len(chunk) // 2), 0
                    continue
                log.warning("audit write failed; retrying", error=repr(exc), pending=self.pending, retry_s=delay)
                if self._past_deadline():
                    return
                await asyncio.sleep(min(delay * random.uniform(0.5, 1.0), self._until_deadline()))
                delay = min(delay * 2, self.retry_max_s)
                continue
            self._advance(len(chunk))
            size, delay, failures = self.batch, self.retry_initial_s, 0

    def _advance(self, count: int) -> None:
        for _ in range(count):
            self._pending.popleft()
        self._done += count
        self._progress.set()
        if self._overloaded and len(self._pending) <= self.max_queue // 2:
            self._overloaded = False
            log.info("audit backpressure over", pending=self.pending)

    def _discard(self, exc: BaseException) -> None:
        record = canonical_json(self._pending[0]).decode()
        log.error("audit event rejected by the database", error=repr(exc), record=record)
        self._advance(1)

    def _until_deadline(self) -> float:
        return math.inf if self._deadline is None else max(0.0, self._deadline - asyncio.get_running_loop().time())

    def _past_deadline(self) -> bool:
        return self._until_deadline() == 0.0
