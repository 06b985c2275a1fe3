"""The `audit_events` table: chained appends that stay one chain with many writers, and streaming reads.

Every replica appends to the same chain, so an append must read the newest hash and insert after it with
no other append in between: on PostgreSQL a transaction-scoped advisory lock serialises appends (under
READ COMMITTED each statement after the lock sees the previous append); on SQLite the write transaction
(BEGIN IMMEDIATE) already does. Ids are assigned here, last id + 1, so they are dense and follow the chain:
a gap can only mean a deleted row. Rows must therefore only be written through `AuditStore.append`.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC, datetime
from typing import IO, Any

from sqlalchemy import Row, func, insert, select, text

from strata.security.audit import (
    GENESIS,
    AuditRecord,
    AuditRow,
    ChainVerifier,
    VerifyResult,
    chain_hash,
    normalized,
)
from strata.store.database import Database
from strata.store.tables import AuditEvent

# Any constant will do, as long as every replica uses the same one (and it differs from the migration lock).
AUDIT_LOCK_ID = 0x5354524155
_TABLE = AuditEvent.__table__
Progress = Callable[[int], None]


class AuditStore:
    def __init__(self, db: Database, *, page: int = 1000) -> None:
        self.db = db
        self.page = page  # rows per read when streaming (verify, export)

    async def append(self, records: Sequence[AuditRecord]) -> None:
        """Write a batch in one transaction, chained after the newest row; all of it or none of it."""
        if not records:
            return
        async with self.db.transaction() as tx:
            if not self.db.is_sqlite:
                await tx.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": AUDIT_LOCK_ID})
            newest = (
                await tx.execute(select(_TABLE.c.id, _TABLE.c.hash).order_by(_TABLE.c.id.desc()).limit(1))
            ).first()
            next_id, prev = (newest[0] + 1, newest[1]) if newest else (1, GENESIS)
            values: list[dict[str, Any]] = []
            for offset, raw in enumerate(records):
                record = normalized(raw)
                digest = chain_hash(prev, record)
                values.append(_values(next_id + offset, record, prev, digest))
                prev = digest
            await tx.execute(insert(_TABLE), values)

    async def rows(self, after_id: int = 0, limit: int = 1000) -> list[AuditRow]:
        """Rows with id > after_id, oldest first: one page for keyset pagination."""
        statement = select(_TABLE).where(_TABLE.c.id > after_id).order_by(_TABLE.c.id).limit(limit)
        async with self.db.sessions() as session:
            return [_row(r) for r in await session.execute(statement)]

    async def iter_rows(self, after_id: int = 0) -> AsyncIterator[AuditRow]:
        """Every row in id order, read a page at a time so memory stays flat on big tables."""
        while page := await self.rows(after_id, self.page):
            for row in page:
                yield row
            after_id = page[-1].id

    async def count(self) -> int:
        async with self.db.sessions() as session:
            return int((await session.execute(select(func.count()).select_from(_TABLE))).scalar_one())

    async def query(
        self,
        action: str | None = None,
        actor: str | None = None,
        since: datetime | None = None,
        limit: int = 100,
        after_id: int = 0,
    ) -> list[AuditRow]:
        """The admin listing: oldest first, filtered; pass the last id seen as after_id for the next page."""
        statement = select(_TABLE).where(_TABLE.c.id > after_id)
        if action is not None:
            statement = statement.where(_TABLE.c.action == action)
        if actor is not None:
            statement = statement.where(_TABLE.c.actor == actor)
        if since is not None:
            since = since.replace(tzinfo=UTC) if since.tzinfo is None else since.astimezone(UTC)
            statement = statement.where(_TABLE.c.ts >= since)
        statement = statement.order_by(_TABLE.c.id).limit(limit)
        async with self.db.sessions() as session:
            return [_row(r) for r in await session.execute(statement)]

    async def verify(self, progress: Progress | None = None) -> VerifyResult:
        """Walk the whole chain in id order; stop at the first row that was changed, deleted or moved."""
        verifier = ChainVerifier()
        async for row in self.iter_rows():
            if not verifier.feed(row):
                break
            if progress is not None and verifier.rows_checked % self.page == 0:
                progress(verifier.rows_checked)
        return verifier.result()

    async def export(self, out: IO[str], progress: Progress | None = None) -> int:
        """Write every row as JSON Lines (all columns, hashes included); returns the number of rows."""
        written = 0
        async for row in self.iter_rows():
            out.write(json.dumps(row.to_json(), ensure_ascii=False, separators=(",", ":")) + "\n")
            written += 1
            if progress is not None and written % self.page == 0:
                progress(written)
        return written


def _values(row_id: int, record: AuditRecord, prev_hash: str, digest: str) -> dict[str, Any]:
    return {
        "id": row_id,
        "ts": record.ts,
        "actor": record.actor,
        "actor_role": record.actor_role,
        "action": record.action,
        "resource": record.resource,
        "outcome": record.outcome,
        "source_ip": record.source_ip,
        "request_id": record.request_id,
        "details": record.details,
        "prev_hash": prev_hash,
        "hash": digest,
    }


def _row(r: Row[Any]) -> AuditRow:
    m = r._mapping
    ts: datetime = m["ts"]
    record = AuditRecord(
        action=m["action"],
        outcome=m["outcome"],
        actor=m["actor"],
        actor_role=m["actor_role"],
        resource=m["resource"],
        source_ip=m["source_ip"],
        request_id=m["request_id"],
        details=m["details"],
        ts=ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts,  # SQLite returns naive UTC
    )
    return AuditRow(id=m["id"], record=record, prev_hash=m["prev_hash"], hash=m["hash"])
