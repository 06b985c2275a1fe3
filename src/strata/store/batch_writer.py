"""A generic background writer: callers queue items without waiting; a task writes them in batches.

The policy of the audit trail's writer (`strata.security.audit_log`), for any kind of row:

* `record()` only appends to an in-memory FIFO and returns; a background task writes it in batches (every
  `flush_interval_s`, or sooner once `batch` items wait), one `write` call (one transaction) per batch.
* A failed write (database restarting, lock timeout) is retried with capped exponential backoff, with
  jitter; the items stay queued, in order, until they are written.
* Backpressure: past `max_queue` waiting items the writer keeps accepting, logs one warning and reports
  `overloaded` (admission control may refuse new work with 503). Past `max_backlog`, `overflow="raise"`
  raises `BacklogFull` (the caller fails loudly), `overflow="log"` writes the item to the error log in full
  instead of memory: memory stays bounded, and the item is kept, in the log.
* A batch the database rejects for its content (a value it cannot store, such as a NUL character on
  PostgreSQL: see `strata.store.errors`) is not retried as it is: it is written in halves until the bad item
  is found, which is set aside (counted in `rejected`, logged once in full) while the rest are written. One bad
  row never holds up the rows behind it, nor shutdown.
* `stop()` writes everything still queued; if the database stays down past its timeout, each unwritten
  item goes to the error log in full. Nothing is dropped silently.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, Literal, TypeVar

import structlog

from strata.resilience.retry import backoff
from strata.store.errors import is_data_error

T = TypeVar("T")


def is_content_error(exc: BaseException) -> bool:
    """An error about the batch's content, which retrying cannot fix: a value the database refuses, or one that
    cannot even be encoded (TypeError, ValueError). Anything else (connection lost, lock timeout, a missing
    table) is retried until it passes."""
    return isinstance(exc, TypeError | ValueError) or is_data_error(exc)


class BacklogFull(RuntimeError):
    """More items wait than `max_backlog`: the database has been unwritable for too long."""


class BatchWriter(Generic[T]):
    backlog_error: type[BacklogFull] = BacklogFull  # what `record` raises past max_backlog (overflow="raise")

    def __init__(
        self,
        write: Callable[[Sequence[T]], Awaitable[None]],
        *,
        name: str,
        describe: Callable[[T], str],
        max_queue: int = 10_000,
        batch: int = 200,
        flush_interval_s: float = 0.2,
        max_backlog: int | None = None,
        overflow: Literal["raise", "log"] = "raise",
        retry_initial_s: float = 0.05,
        retry_max_s: float = 5.0,
        is_content: Callable[[BaseException], bool] = is_content_error,
    ) -> None:
        """`write` stores one batch (all of it or none of it); `describe` renders an item for the error log."""
        self._write = write
        self.name = name
        self._describe = describe
        self._log = structlog.get_logger(f"strata.{name}")
        self.max_queue = max_queue
        self.max_backlog = max_backlog if max_backlog is not None else 10 * max_queue
        self.overflow = overflow
        self.batch = batch
        self.flush_interval_s = flush_interval_s
        self.retry_initial_s = retry_initial_s
        self.retry_max_s = retry_max_s
        self._is_content = is_content
        self._pending: deque[T] = deque()
        self._recorded = 0  # items accepted, ever
        self._done = 0  # items written (or logged instead), ever
        self._wake = asyncio.Event()
        self._progress = asyncio.Event()
        self._draining = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._closed = False
        self._deadline: float | None = None
        self._overloaded = False
        self.logged_instead = 0  # items that went to the error log, not the database
        self.rejected = 0  # of those, items the database refused for their content

    @property
    def pending(self) -> int:
        return len(self._pending)

    @property
    def overloaded(self) -> bool:
        """More than `max_queue` items wait: the database is not keeping up (or is down)."""
        return self._overloaded

    def record(self, item: T) -> None:
        """Queue an item; never blocks. Call it from the event loop's thread."""
        if self._closed:  # nothing will write it any more: keep it in the error log
            self._keep_in_log(f"{self.name}: item recorded after shutdown", item)
            return
        if len(self._pending) >= self.max_backlog:
            if self.overflow == "log":
                self._keep_in_log(f"{self.name}: backlog full, item kept in the log only", item)
                return
            self._log.error(f"{self.name} backlog full", pending=len(self._pending))
            raise self.backlog_error(f"{len(self._pending)} {self.name} items are waiting for the database")
        self._pending.append(item)
        self._recorded += 1
        if not self._overloaded and len(self._pending) > self.max_queue:
            self._overloaded = True
            self._log.warning(
                f"{self.name} backpressure: items are queuing faster than they are written", pending=self.pending
            )
        if len(self._pending) >= self.batch:
            self._wake.set()

    async def start(self) -> None:
        if self._task is None:
            self._stopping, self._closed, self._deadline = False, False, None
            self._task = asyncio.create_task(self._run(), name=f"{self.name}-writer")

    async def flush(self) -> None:
        """Wait until every item recorded before this call is written (retrying while the database is down)."""
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
        for item in self._pending:
            self._keep_in_log(f"{self.name}: item not written before shutdown", item)
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
        # `suspect`: the front items hold one the database refused for its content; they are written in ever
        # smaller chunks (no wait: a refusal is not an outage) until that item is alone and can be set aside.
        size, failures, suspect = self.batch, 0, 0
        while self._pending:
            chunk = [self._pending[i] for i in range(min(size, len(self._pending)))]
            try:
                await self._write(chunk)
            except Exception as exc:
                if self._is_content(exc):
                    if len(chunk) == 1:
                        self._reject(exc)
                        size, suspect = self.batch, 0
                    else:
                        suspect = len(chunk)
                        size = suspect // 2
                    continue
                failures += 1
                delay = backoff(failures, self.retry_initial_s, self.retry_max_s, jitter=0.5)
                self._log.warning(
                    f"{self.name} write failed; retrying", error=repr(exc), pending=self.pending, retry_s=delay
                )
                if self._past_deadline():
                    return
                await asyncio.sleep(min(delay, self._until_deadline()))
                continue
            self._advance(len(chunk))
            suspect = max(0, suspect - len(chunk))
            size, failures = (min(size, suspect) if suspect else self.batch), 0

    def _advance(self, count: int) -> None:
        for _ in range(count):
            self._pending.popleft()
        self._done += count
        self._progress.set()
        if self._overloaded and len(self._pending) <= self.max_queue // 2:
            self._overloaded = False
            self._log.info(f"{self.name} backpressure over", pending=self.pending)

    def _reject(self, exc: BaseException) -> None:
        item = self._text(self._pending[0])
        error = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:300]}"  # not the statement's values
        self._log.error(f"{self.name}: item rejected by the database, set aside", error=error, item=item)
        self.logged_instead += 1
        self.rejected += 1
        self._advance(1)

    def _keep_in_log(self, message: str, item: T) -> None:
        self._log.error(message, item=self._text(item))
        self.logged_instead += 1

    def _text(self, item: T) -> str:
        try:
            return self._describe(item)
        except Exception:  # e.g. the very content the database choked on: its repr still says what it was
            return repr(item)

    def _until_deadline(self) -> float:
        return math.inf if self._deadline is None else max(0.0, self._deadline - asyncio.get_running_loop().time())

    def _past_deadline(self) -> bool:
        return self._until_deadline() == 0.0
