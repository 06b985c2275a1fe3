"""The local trace store's side of the span pipeline: processors the tracer provider calls, and the
background writer that puts finished spans into the database.

`LocalSpanProcessor.on_end` runs when a span ends, on the request's path: it only appends the span to a
bounded queue. `SpanWriter` wakes every `interval_s`, turns the queued spans into rows and writes them in
transactions of at most `batch` spans, and now and then deletes spans older than the retention. Turning a
span into a row runs on the event loop: small batches, each followed by an awaited write, keep a busy
server's requests from waiting behind one long conversion. Spans are telemetry: when the
queue is full or the database is away, spans are dropped (counted, warned about once a minute), never
written to the log (they may hold captured content) and never allowed to slow a request. A batch refused
for one span's content (a NUL character on PostgreSQL) is written in halves: only the span refused is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from typing import Any

import structlog
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor
from opentelemetry.sdk.trace import Span as SdkSpan
from opentelemetry.trace import StatusCode

from strata.observability import tracing_genai as genai
from strata.observability.tracing_redact import redact_span
from strata.security.redaction import Redactor
from strata.store.batch_writer import is_content_error
from strata.store.spans import SpanRecord, SpanStore

log = structlog.get_logger("strata.tracing")

_STATUS = {StatusCode.UNSET: "unset", StatusCode.OK: "ok", StatusCode.ERROR: "error"}
_WARN_EVERY_S = 60.0


class RunScopeProcessor(SpanProcessor):
    """Copies a run's id, owner and conversation (`genai.INHERITED`) from a span to the spans started
    under it in this process: a `chat` or `execute_tool` span (and the spans under those) then belongs to
    its run in the local store without the code that makes it knowing about runs."""

    def on_start(self, span: SdkSpan, parent_context: Context | None = None) -> None:
        parent = trace.get_current_span(parent_context)
        attributes = getattr(parent, "attributes", None)  # only SDK spans made here have them
        if not attributes:
            return
        for key in genai.INHERITED:
            value = attributes.get(key)
            if value is not None and key not in (span.attributes or {}):
                span.set_attribute(key, value)

    def on_end(self, span: ReadableSpan) -> None:
        pass

    def shutdown(self) -> None:
        pass

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


class LocalSpanProcessor(SpanProcessor):
    """Queues ended spans for the `SpanWriter`; the newest are dropped once `max_queue` wait."""

    def __init__(self, max_queue: int = 20_000) -> None:
        self.max_queue = max_queue
        self.queue: deque[ReadableSpan] = deque()
        self.dropped = 0

    def on_start(self, span: SdkSpan, parent_context: Context | None = None) -> None:
        pass

    def on_end(self, span: ReadableSpan) -> None:
        if len(self.queue) >= self.max_queue:
            self.dropped += 1
            return
        self.queue.append(span)  # deque.append is atomic: spans ended off the loop's thread are safe too

    def shutdown(self) -> None:
        pass

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


class SpanWriter:
    """Writes what `LocalSpanProcessor` queued, in batches, from a background task; prunes old spans."""

    def __init__(
        self,
        source: LocalSpanProcessor,
        store: SpanStore,
        *,
        retention_s: float,
        interval_s: float = 0.5,
        batch: int = 128,
        prune_every_s: float = 600.0,
        redactor: Redactor | None = None,
    ) -> None:
        self.source = source
        self.redactor = redactor or Redactor()  # credentials in names and attributes are masked before storing
        self.store = store
        self.retention_s = retention_s
        self.interval_s = interval_s
        self.batch = batch
        self.prune_every_s = prune_every_s
        self.written = 0
        self.failed = 0  # spans lost because the database could not be written
        self.rejected = 0  # spans lost because the database refused their content
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._next_prune = 0.0  # monotonic; the first round prunes
        self._warned_at = -_WARN_EVERY_S
        self._dropped_seen = 0

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="span-writer")

    async def flush(self) -> None:
        """Write what is queued now (not what arrives meanwhile: under load that would make many small
        transactions instead of one per round), in batches of at most `batch` spans."""
        async with self._lock:
            due = len(self.source.queue)
            while due > 0:
                due -= await self._write_batch(min(due, self.batch))

    async def stop(self, timeout_s: float = 10.0) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        try:
            await asyncio.wait_for(self.flush(), timeout_s)
        except TimeoutError:
            log.warning("spans not written before shutdown", count=len(self.source.queue))

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.flush()
                if time.monotonic() >= self._next_prune:
                    self._next_prune = time.monotonic() + self.prune_every_s
                    await self.store.prune(time.time_ns() - int(self.retention_s * 1e9))
            except Exception as exc:  # the database is away: spans wait in the (bounded) queue meanwhile
                self._warn("the local trace store cannot be written", error=repr(exc))
            if self.source.dropped > self._dropped_seen:
                self._dropped_seen = self.source.dropped
                self._warn("spans dropped: the local trace store's queue is full", dropped=self.source.dropped)

    async def _write_batch(self, size: int) -> int:
        queue = self.source.queue
        records = [to_record(redact_span(queue.popleft(), self.redactor)) for _ in range(min(size, len(queue)))]
        try:
            self.written += await self._append_isolating(records)
        except Exception:
            self.failed += len(records)
            raise
        return len(records)

    async def _append_isolating(self, records: list[SpanRecord]) -> int:
        """Write `records`; if the database refuses one's content, write halves, leaving out only the spans it
        refuses. Returns how many were written."""
        try:
            await self.store.append(records)
            return len(records)
        except Exception as exc:
            if not is_content_error(exc):
                raise
            if len(records) == 1:
                self.rejected += 1
                self._warn("a span the local trace store refuses was dropped", error=type(exc).__name__)
                return 0
        half = len(records) // 2
        return await self._append_isolating(records[:half]) + await self._append_isolating(records[half:])

    def _warn(self, message: str, **fields: Any) -> None:
        now = time.monotonic()
        if now - self._warned_at >= _WARN_EVERY_S:
            self._warned_at = now
            log.warning(message, **fields)


def to_record(span: ReadableSpan) -> SpanRecord:
    context = span.get_span_context()
    assert context is not None
    parent = span.parent
    attributes = {key: list(value) if isinstance(value, tuple) else value for key, value in span.attributes.items()}
    events = [
        {
            "name": event.name,
            "time_ns": event.timestamp,
            "attributes": {k: list(v) if isinstance(v, tuple) else v for k, v in (event.attributes or {}).items()},
        }
        for event in span.events
    ]
    run_id, owner = attributes.get(genai.RUN_ID), attributes.get(genai.OWNER)
    return SpanRecord(
        trace_id=f"{context.trace_id:032x}",
        span_id=f"{context.span_id:016x}",
        parent_span_id=f"{parent.span_id:016x}" if parent is not None else None,
        name=span.name,
        kind=span.kind.name.lower(),
        start_ns=span.start_time or 0,
        end_ns=span.end_time or span.start_time or 0,
        status=_STATUS.get(span.status.status_code, "unset"),
        status_message=span.status.description,
        run_id=str(run_id) if run_id is not None else None,
        owner=str(owner) if owner is not None else None,
        attributes=attributes,
        events=events,
    )
