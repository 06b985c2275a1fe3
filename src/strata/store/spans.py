"""The local trace store: finished spans, so the embedded setup can show a run's trace with no other software.

Rows arrive in batches from a background writer (`observability.tracing_store`), never from a request's
path. Reads answer one trace or one run; a bound on the rows read keeps a trace that a client reused for
everything (one `traceparent` on every request) from costing unbounded memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import and_, case, delete, func, insert, or_, select
from sqlalchemy.orm import aliased

from strata.store.database import Database
from strata.store.pages import Page, Position
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


@dataclass(frozen=True, slots=True)
class TraceSummary:
    """One trace as a list shows it: its root span (the one with no parent here, else the earliest), its
    extent over the spans read, how many spans and errors, and the runs it holds."""

    trace_id: str
    start_ns: int
    end_ns: int
    spans: int
    errors: int
    root: SpanRecord
    run_ids: list[str]


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

    async def recent(
        self,
        limit: int,
        after: Position | None = None,
        *,
        owner: str | None = None,
        since_ns: int | None = None,
        until_ns: int | None = None,
    ) -> Page[TraceSummary]:
        """Traces, latest first by their earliest span (within `since_ns`..`until_ns`); with `owner`, only that
        user's spans count (a trace of which they own none is not listed)."""
        visible = [Span.owner == owner] if owner is not None else []
        start = func.min(Span.start_ns)
        grouped = select(
            Span.trace_id,
            start.label("start_ns"),
            func.max(Span.end_ns).label("end_ns"),
            func.count().label("spans"),
            func.sum(case((Span.status == "error", 1), else_=0)).label("errors"),
        ).where(*visible)
        if since_ns is not None:  # every span of a trace that starts after `since_ns` does too
            grouped = grouped.where(Span.start_ns >= since_ns)
        grouped = grouped.group_by(Span.trace_id)
        if until_ns is not None:
            grouped = grouped.having(start < until_ns)
        if after is not None:
            grouped = grouped.having(or_(start < after.at, and_(start == after.at, Span.trace_id < after.id)))
        grouped = grouped.order_by(start.desc(), Span.trace_id.desc()).limit(limit + 1)
        async with self.db.sessions() as session:
            rows = (await session.execute(grouped)).all()
            more = len(rows) > limit
            rows = rows[:limit]
            ids = [row.trace_id for row in rows]
            roots = await self._roots(session, ids, visible)
            runs: dict[str, list[str]] = {}
            if ids:
                pairs = select(Span.trace_id, Span.run_id).where(
                    Span.trace_id.in_(ids), Span.run_id.is_not(None), *visible
                )
                for trace_id, run_id in (await session.execute(pairs.distinct())).all():
                    runs.setdefault(trace_id, []).append(run_id)
        summaries = [
            TraceSummary(
                row.trace_id, int(row.start_ns), int(row.end_ns), int(row.spans), int(row.errors or 0),
                roots[row.trace_id], sorted(runs.get(row.trace_id, [])),
            )
            for row in rows
        ]  # fmt: skip
        last = summaries[-1] if more else None
        return Page(summaries, Position(last.start_ns, last.trace_id) if last else None)

    @staticmethod
    async def _roots(session: Any, trace_ids: list[str], visible: list[Any]) -> dict[str, SpanRecord]:
        if not trace_ids:
            return {}
        rank = func.row_number().over(
            partition_by=Span.trace_id,
            order_by=(case((Span.parent_span_id.is_(None), 0), else_=1), Span.start_ns, Span.id),
        )
        ranked = select(Span, rank.label("rank")).where(Span.trace_id.in_(trace_ids), *visible).subquery()
        root = aliased(Span, ranked)
        rows = (await session.execute(select(root).where(ranked.c.rank == 1))).scalars()
        return {row.trace_id: _record(row) for row in rows}

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
