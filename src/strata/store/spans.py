"""The local trace store: finished spans, so the embedded setup can show a run's trace with no other software.

Rows arrive in batches from a background writer (`observability.tracing_store`), never from a request's
path. Reads answer one trace or one run; a bound on the rows read keeps a trace that a client reused for
everything (one `traceparent` on every request) from costing unbounded memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import delete, insert, select

from strata.store.database import Database
from strata.store.tables import Span

MAX_SPANS_PER_READ = 10_000
_TABLE = Span.__table__
# Attributes that hold conversation content (OpenTelemetry GenAI conventions, recorded only with
# `tracing.capture_content`): stored encrypted, with the events, in the `sealed` column.
CONTENT_ATTRIBUTES = frozenset(
    {
        "gen_ai.input.messages",
        "gen_ai.output.messages",
        "gen_ai.system_instructions",
        "gen_ai.tool.call.arguments",
        "gen_ai.tool.call.result",
    }
)


@dataclass(frozen=True, slots=True)
class SpanRecord:
    """One finished span, as stored: ids in lowercase hex (32 and 16 digits), times in Unix nanoseconds."""

    trace_id: str
    span_id: str
    parent_span_id: str | None
    name: str
    kind: str  # "server", "client", "internal", "producer" or "consumer"
    start_ns: int
    end_ns: int
    status: str = "unset"  # "unset", "ok" or "error"
    status_message: str | None = None
    run_id: str | None = None
    owner: str | None = None
    attributes: dict[str, Any] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)  # {"name", "time_ns", "attributes"}

    def values(self) -> dict[str, Any]:
        attributes, content = self.attributes, {}
        if not CONTENT_ATTRIBUTES.isdisjoint(attributes):
            content = {k: v for k, v in attributes.items() if k in CONTENT_ATTRIBUTES}
            attributes = {k: v for k, v in attributes.items() if k not in CONTENT_ATTRIBUTES}
        return {
            "trace_id": self.trace_id,
            "span_id": self.span_id,
            "parent_span_id": self.parent_span_id,
            "name": self.name[:256],
            "kind": self.kind,
            "start_ns": self.start_ns,
            "end_ns": self.end_ns,
            "status": self.status,
            "status_message": self.status_message,
            "run_id": self.run_id,
            "owner": self.owner,
            "attributes": attributes,
            "sealed": {"attributes": content, "events": self.events} if content or self.events else None,
        }


class SpanStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def append(self, records: Sequence[SpanRecord]) -> None:
        """Write a batch in one transaction."""
        if records:
            async with self.db.transaction() as tx:
                await tx.execute(insert(_TABLE), [record.values() for record in records])

    async def trace(self, trace_id: str, limit: int = MAX_SPANS_PER_READ) -> list[SpanRecord]:
        """Every stored span of one trace, earliest first."""
        statement = select(Span).where(Span.trace_id == trace_id).order_by(Span.start_ns, Span.id).limit(limit)
        return await self._read(statement)

    async def run_traces(self, run_id: str) -> list[str]:
        """The traces holding spans of this run (one, unless the run was created with no trace context
        and resumed after a crash: each attempt then starts a trace of its own)."""
        statement = select(Span.trace_id, Span.start_ns).where(Span.run_id == run_id).order_by(Span.start_ns)
        async with self.db.sessions() as session:
            rows = await session.execute(statement)
            return list(dict.fromkeys(row.trace_id for row in rows))

    async def for_run(self, run_id: str, limit: int = MAX_SPANS_PER_READ) -> list[SpanRecord]:
        """The spans of one run: its `invoke_agent` spans and everything under them, earliest first."""
        statement = select(Span).where(Span.run_id == run_id).order_by(Span.start_ns, Span.id).limit(limit)
        return await self._read(statement)

    async def prune(self, before_ns: int) -> int:
        """Delete spans that started before `before_ns`; returns how many."""
        async with self.db.transaction() as tx:
            result = await tx.execute(delete(_TABLE).where(_TABLE.c.start_ns < before_ns))
            return int(result.rowcount or 0)

    async def _read(self, statement: Any) -> list[SpanRecord]:
        async with self.db.sessions() as session:
            rows = (await session.execute(statement)).scalars()
            return [_record(row) for row in rows]


def _record(row: Span) -> SpanRecord:
    sealed = row.sealed or {}
    return SpanRecord(
        trace_id=row.trace_id,
        span_id=row.span_id,
        parent_span_id=row.parent_span_id,
        name=row.name,
        kind=row.kind,
        start_ns=row.start_ns,
        end_ns=row.end_ns,
        status=row.status,
        status_message=row.status_message,
        run_id=row.run_id,
        owner=row.owner,
        attributes={**(row.attributes or {}), **(sealed.get("attributes") or {})},
        events=sealed.get("events") or [],
    )
