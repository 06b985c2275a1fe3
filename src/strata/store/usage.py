"""The `usage` table: batched appends, grouped reports with latency percentiles, and spend for budgets.

Percentiles are computed in the database, the same SQL on SQLite (3.25+) and PostgreSQL: window functions
rank each group's latencies, and only the two rows at the nearest ranks come back (nearest-rank method: the
p-th percentile of n values is the value at rank ceil(p/100 x n)). Exact, and the answer's size is two rows
per group however many requests the window holds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import fields
from datetime import datetime
from typing import Any, Literal, get_args

from sqlalchemy import ColumnElement, Select, case, func, insert, literal_column, or_, select

from strata.cost.records import UsageEvent, UsageKind, UsageRow, utc
from strata.store.database import Database
from strata.store.tables import Step, Usage

GroupBy = Literal["key", "user", "agent", "model", "day"]
GROUP_BYS: tuple[GroupBy, ...] = get_args(GroupBy)
Scope = Literal["key", "user", "agent"]
_TABLE = Usage.__table__
_C = _TABLE.c
_SCOPE_COLUMN = {"key": _C.key_id, "user": _C.user, "agent": _C.agent}
PERCENTILES = (50, 95)


class UsageStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def append(self, events: Sequence[UsageEvent]) -> None:
        """Write a batch in one transaction: all of it or none of it."""
        if not events:
            return
        values = [_values(event) for event in events]
        async with self.db.transaction() as tx:
            await tx.execute(insert(_TABLE), values)

    async def aggregate(
        self,
        group_by: GroupBy | None,
        since: datetime,
        until: datetime,
        *,
        user: str | None = None,
        kind: UsageKind | None = None,
        limit: int = 1000,
    ) -> list[UsageRow]:
        """Requests, errors, tokens, cost and p50/p95 latency per group over [since, until).

        group_by None: one row for everything. Days are UTC dates (YYYY-MM-DD), oldest first; other groups
        come most expensive first. At most `limit` groups."""
        group = self._group_expression(group_by)
        where = [_C.ts >= utc(since), _C.ts < utc(until)]
        if user is not None:
            where.append(_C.user == user)
        if kind is not None:
            where.append(_C.kind == kind)

        sums = select(
            group.label("g"),
            func.count().label("requests"),
            func.coalesce(func.sum(case((_C.status >= 400, 1), else_=0)), 0).label("errors"),
            func.coalesce(func.sum(_C.prompt_tokens), 0).label("prompt_tokens"),
            func.coalesce(func.sum(_C.completion_tokens), 0).label("completion_tokens"),
            func.coalesce(func.sum(_C.cached_tokens), 0).label("cached_tokens"),
            func.coalesce(func.sum(_C.cost_usd), 0.0).label("cost_usd"),
        ).where(*where)
        if group_by is not None:
            sums = sums.group_by(group)
            order = group if group_by == "day" else func.sum(_C.cost_usd).desc()
            sums = sums.order_by(order, group).limit(limit)
        async with self.db.sessions() as session:
            totals = (await session.execute(sums)).all()
            if not totals or totals[0].requests == 0:
                return []
            percentiles = await session.execute(self._percentiles(group, group_by is not None, where))
        ranks: dict[tuple[Any, int], float] = {}
        for row in percentiles:
            for p in PERCENTILES:
                if row.rn == _rank(p, row.n):
                    ranks[(row.g, p)] = row.latency_s
        return [
            UsageRow(
                group=None if t.g is None else str(t.g),
                requests=int(t.requests),
                errors=int(t.errors),
                prompt_tokens=int(t.prompt_tokens),
                completion_tokens=int(t.completion_tokens),
                cached_tokens=int(t.cached_tokens),
                cost_usd=float(t.cost_usd),
                latency_p50_s=ranks.get((t.g, 50)),
                latency_p95_s=ranks.get((t.g, 95)),
            )
            for t in totals
        ]

    async def spent(self, scope: Scope, name: str, since: datetime, until: datetime | None = None) -> float:
        """USD spent by one key, user or agent since `since` (a budget period's start)."""
        statement = select(func.coalesce(func.sum(_C.cost_usd), 0.0)).where(
            _SCOPE_COLUMN[scope] == name, _C.ts >= utc(since)
        )
        if until is not None:
            statement = statement.where(_C.ts < utc(until))
        async with self.db.sessions() as session:
            return float((await session.execute(statement)).scalar_one())

    async def events(
        self,
        since: datetime,
        until: datetime,
        *,
        filters: dict[str, str] | None = None,
        limit: int = 1_000_000,
    ) -> list[UsageEvent]:
        """Every recorded call in [since, until), oldest first (a workload profile reads them all); `filters`
        by model, agent, key, user or kind. At most `limit` rows."""
        where = [_C.ts >= utc(since), _C.ts < utc(until)]
        for name, value in (filters or {}).items():
            where.append((_C.key_id if name == "key" else _C[name]) == value)
        statement = select(*(_C[name] for name in _EVENT_FIELDS)).where(*where).order_by(_C.ts, _C.id).limit(limit)
        async with self.db.sessions() as session:
            rows = (await session.execute(statement)).all()
        return [UsageEvent(**{**row._asdict(), "ts": utc(row.ts)}) for row in rows]

    async def tool_calls_per_run(self, run_ids: Sequence[str]) -> dict[str, int]:
        """How many tool steps each run made (runs without any are absent)."""
        counts: dict[str, int] = {}
        column = Step.__table__.c
        for start in range(0, len(run_ids), 500):  # bounded IN lists
            chunk = list(run_ids[start : start + 500])
            statement = (
                select(column.run_id, func.count())
                .where(column.run_id.in_(chunk), column.kind == "tool")
                .group_by(column.run_id)
            )
            async with self.db.sessions() as session:
                counts.update({run: int(n) for run, n in (await session.execute(statement)).all()})
        return counts

    async def count(self) -> int:
        async with self.db.sessions() as session:
            return int((await session.execute(select(func.count()).select_from(_TABLE))).scalar_one())

    def _group_expression(self, group_by: GroupBy | None) -> ColumnElement[Any]:
        if group_by is None:
            return literal_column("NULL")
        if group_by == "day":
            if self.db.is_sqlite:  # stored as naive UTC text, "YYYY-MM-DD HH:MM:SS..."
                return func.substr(_C.ts, 1, 10)
            return func.to_char(func.timezone("UTC", _C.ts), "YYYY-MM-DD")
        if group_by == "key":
            return _C.key_id
        return _C[group_by]

    @staticmethod
    def _percentiles(group: ColumnElement[Any], grouped: bool, where: list[ColumnElement[bool]]) -> Select[Any]:
        """Per group, the latencies at the nearest ranks of PERCENTILES (and nothing else)."""
        partition = {"partition_by": group} if grouped else {}
        ranked = (
            select(
                group.label("g"),
                _C.latency_s,
                func.row_number().over(order_by=(_C.latency_s, _C.id), **partition).label("rn"),
                func.count().over(**partition).label("n"),
            )
            .where(*where)
            .subquery()
        )
        # ceil(p x n / 100) in integer arithmetic, the same on both databases
        wanted = [ranked.c.rn == (ranked.c.n * p + 99) // 100 for p in PERCENTILES]
        return select(ranked.c.g, ranked.c.latency_s, ranked.c.rn, ranked.c.n).where(or_(*wanted))


def _rank(p: int, n: int) -> int:
    return (n * p + 99) // 100


_EVENT_FIELDS = tuple(f.name for f in fields(UsageEvent))


def _values(event: UsageEvent) -> dict[str, Any]:
    # Not dataclasses.asdict: it deep-copies every value, and this runs for every metered request.
    values = {name: getattr(event, name) for name in _EVENT_FIELDS}
    values["ts"] = utc(event.ts)
    return values
