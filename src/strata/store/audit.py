"""The `audit_events` table: chained appends that stay one chain with many writers, and streaming reads.

Every replica appends to the same chain, so an append must read the newest hash and insert after it with
no other append in between: on PostgreSQL a transaction-scoped advisory lock serialises appends (under
READ COMMITTED each statement after the lock sees the previous append); on SQLite the write transaction
(BEGIN IMMEDIATE) already does. Ids are assigned here, last id + 1, so they are dense and follow the chain:
a gap can only mean a deleted row. Rows must therefore only be written through `AuditStore.append`.

Each row is signed with the HMAC key derived from the database's encryption keyring (`ChainKeys`): a store
opened without a keyring can read and verify unkeyed rows, but refuses to append (an unkeyed row written
now would read as a forgery). Credentials in a record (by shape, or the configured secrets) are masked
before it is signed, so what is stored and hashed holds none.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC, datetime
from typing import IO, Any

from sqlalchemy import Row, func, insert, select, text

from strata.security.audit import (
    GENESIS,
    Anchors,
    AuditRecord,
    AuditRow,
    ChainKeys,
    ChainVerifier,
    VerifyResult,
    chain_hash,
    keyed_hash,
    normalized,
    redacted,
)
from strata.security.encryption import EncryptionError, UnknownKeyError
from strata.store.database import Database
from strata.store.tables import AuditEvent

# Any constant will do, as long as every replica uses the same one (and it differs from the migration lock).
AUDIT_LOCK_ID = 0x5354524155
_TABLE = AuditEvent.__table__
Progress = Callable[[int], None]


class AuditStore:
    def __init__(self, db: Database, *, page: int = 1000, keys: ChainKeys | None = None) -> None:
        """`keys`: default, derived from the database's keyring (None without one: read and verify only)."""
        self.db = db
        self.page = page  # rows per read when streaming (verify, export)
        self.keys = keys if keys is not None else ChainKeys(db.keyring) if db.keyring is not None else None

    async def append(self, records: Sequence[AuditRecord]) -> None:
        """Write a batch in one transaction, chained after the newest row; all of it or none of it."""
        if not records:
            return
        if self.keys is None:
            raise EncryptionError("the audit chain is keyed: open the database with the encryption keyring to append")
        kid = self.keys.current
        key = self.keys.chain_key(kid)
        async with self.db.transaction() as tx:
            if not self.db.is_sqlite:
                await tx.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": AUDIT_LOCK_ID})
            newest = (
                await tx.execute(select(_TABLE.c.id, _TABLE.c.hash).order_by(_TABLE.c.id.desc()).limit(1))
            ).first()
            next_id, prev = (newest[0] + 1, newest[1]) if newest else (1, GENESIS)
            values: list[dict[str, Any]] = []
            for offset, raw in enumerate(records):
                record = normalized(redacted(raw, self.db.redactor))
                digest = keyed_hash(key, kid, prev, record)
                values.append(_values(next_id + offset, record, prev, digest, kid))
                prev = digest
            await tx.execute(insert(_TABLE), values)

    async def head(self) -> AuditRow | None:
        """The newest row; None for an empty chain."""
        async with self.db.sessions() as session:
            newest = (await session.execute(select(_TABLE).order_by(_TABLE.c.id.desc()).limit(1))).first()
        return None if newest is None else _row(newest)

    async def head_problem(self, head: AuditRow) -> str | None:
        """Why `head` cannot be vouched for by a checkpoint, or None if Strata wrote it: it is signed with a key
        of the ring (an unkeyed head only while no keyed row exists). A checkpoint must never vouch for a row
        someone forged in the database."""
        if self.keys is None:
            return "no encryption keyring"
        if head.kid is None:
            async with self.db.sessions() as session:
                keyed = (await session.execute(select(_TABLE.c.id).where(_TABLE.c.kid.is_not(None)).limit(1))).first()
            if keyed is None and chain_hash(head.prev_hash, head.record) == head.hash:
                return None
            return "forged: an unkeyed row after keyed ones, or a hash that does not match"
        try:
            key = self.keys.chain_key(head.kid)
        except UnknownKeyError:
            return f"signed with encryption key {head.kid!r}, which this replica's keyring lacks"
        if hmac.compare_digest(keyed_hash(key, head.kid, head.prev_hash, head.record), head.hash):
            return None
        return "forged: its hash is not the HMAC Strata signs"

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

    async def verify(self, progress: Progress | None = None, anchors: Anchors | None = None) -> VerifyResult:
        """Walk the whole chain in id order; stop at the first row that was changed, deleted or moved, and
        compare it with the checkpoints in `anchors` (truncation, a recomputed chain)."""
        verifier = ChainVerifier(self.keys, anchors)
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


def _values(row_id: int, record: AuditRecord, prev_hash: str, digest: str, kid: str) -> dict[str, Any]:
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
        "kid": kid,
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
    return AuditRow(id=m["id"], record=record, prev_hash=m["prev_hash"], hash=m["hash"], kid=m["kid"])
