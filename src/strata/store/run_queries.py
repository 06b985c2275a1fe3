"""Read-only lists of runs and sessions, newest first, one keyset page at a time (`store.pages`).

Who may see what is the caller's business: `owner` narrows a list to one user's rows, and the API passes it
for a caller who may read only their own. Filters combine with AND; `statuses` with OR among themselves.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Select, and_, func, or_, select

from strata.store.database import Database
from strata.store.pages import Page, Position
from strata.store.tables import Run, Session, Usage

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MAX_MICROS = (datetime.max.replace(tzinfo=UTC) - _EPOCH) // timedelta(microseconds=1)


def micros(when: datetime) -> int:
    """A stored time as whole microseconds since the epoch (SQLite hands back naive UTC)."""
    aware = when if when.tzinfo else when.replace(tzinfo=UTC)
    return (aware - _EPOCH) // timedelta(microseconds=1)


def from_micros(value: int) -> datetime:
    """The time of `micros`; beyond what a datetime holds, the latest time there is (no row is later)."""
    return _EPOCH + timedelta(microseconds=min(value, _MAX_MICROS))


@dataclass(frozen=True, slots=True)
class RunFilter:
    owner: str | None = None
    agent: str | None = None
    statuses: Collection[str] = ()
    session_id: str | None = None
    since: datetime | None = None  # created at or after
    until: datetime | None = None  # created before


@dataclass(frozen=True, slots=True)
class SessionFilter:
    owner: str | None = None
    agent: str | None = None
    since: datetime | None = None
    until: datetime | None = None


class RunQueries:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def runs(self, where: RunFilter, limit: int, after: Position | None = None) -> Page[Run]:
        statement = select(Run)
        if where.owner is not None:
            statement = statement.where(Run.owner == where.owner)
        if where.agent is not None:
            statement = statement.where(Run.agent == where.agent)
        if where.statuses:
            statement = statement.where(Run.status.in_(list(where.statuses)))
        if where.session_id is not None:
            statement = statement.where(Run.session_id == where.session_id)
        statement = _window(statement, Run.created_at, where.since, where.until)
        return await self._page(statement, Run.created_at, Run.id, limit, after)

    async def sessions(self, where: SessionFilter, limit: int, after: Position | None = None) -> Page[Session]:
        statement = select(Session)
        if where.owner is not None:
            statement = statement.where(Session.owner == where.owner)
        if where.agent is not None:
            statement = statement.where(Session.agent == where.agent)
        statement = _window(statement, Session.created_at, where.since, where.until)
        return await self._page(statement, Session.created_at, Session.id, limit, after)

    async def run_counts(self, session_ids: Sequence[str]) -> dict[str, int]:
        """How many runs each of these sessions has had."""
        if not session_ids:
            return {}
        statement = (
            select(Run.session_id, func.count()).where(Run.session_id.in_(list(session_ids))).group_by(Run.session_id)
        )
        async with self.db.sessions() as tx:
            return {session_id: int(count) for session_id, count in (await tx.execute(statement)).all()}

    async def cost_of(
        self, run_ids: Collection[str], request_ids: Collection[str]
    ) -> list[tuple[str | None, str | None, float]]:
        """(run_id, request_id, cost_usd) of the usage rows of these runs or requests: what a trace cost."""
        if not run_ids and not request_ids:
            return []
        statement = select(Usage.run_id, Usage.request_id, Usage.cost_usd).where(
            or_(Usage.run_id.in_(list(run_ids)), Usage.request_id.in_(list(request_ids)))
        )
        async with self.db.sessions() as tx:
            return [(row[0], row[1], float(row[2])) for row in (await tx.execute(statement)).all()]

    async def _page(self, statement: Select[Any], at: Any, id_: Any, limit: int, after: Position | None) -> Page[Any]:
        if after is not None:
            moment = from_micros(after.at)
            statement = statement.where(or_(at < moment, and_(at == moment, id_ < after.id)))
        statement = statement.order_by(at.desc(), id_.desc()).limit(limit + 1)
        async with self.db.sessions() as tx:
            rows = list((await tx.execute(statement)).scalars())
        if len(rows) <= limit:
            return Page(rows, None)
        last = rows[limit - 1]
        return Page(rows[:limit], Position(micros(last.created_at), last.id))


def _window(statement: Select[Any], column: Any, since: datetime | None, until: datetime | None) -> Select[Any]:
    if since is not None:
        statement = statement.where(column >= since)
    if until is not None:
        statement = statement.where(column < until)
    return statement
