"""Re-seal every encrypted value with the current key: the work behind `strata keys rotate-encryption`.

Rows are visited in primary-key order, a few hundred per transaction, so a big table is never held
locked (or loaded) at once and an interrupted run can simply be started again: values already sealed
with the current key are skipped. Plaintext rows from before encryption was enabled get sealed too.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

from sqlalchemy import Column, Table, bindparam, select, type_coerce, update
from sqlalchemy.ext.asyncio import AsyncSession

from strata.config import StrataConfig
from strata.security.encryption import (
    EncryptionError,
    KeyringSource,
    envelope_kid,
    load_keyring,
    read_key_file,
    rotate_key_file,
)
from strata.store.database import Database
from strata.store.encrypted import ENC_KEY, EncryptedJSON, EncryptedText
from strata.store.tables import Base

BATCH_ROWS = 500


@dataclass
class TableCount:
    scanned: int = 0
    rewritten: int = 0


@dataclass
class ReencryptReport:
    kid: str  # the key every value is now sealed with
    tables: dict[str, TableCount] = field(default_factory=dict)


@dataclass(frozen=True)
class RotationReport:
    source: KeyringSource  # as loaded before rotating: tell the operator about a created file or a warning
    rotated_file: bool  # False when the keys come from the environment (the operator rotated them there)
    # Every other key: no data needs it once no replica still seals with it, but the audit rows it signed are
    # verified with it (`strata audit verify`): keep it in the ring.
    retired_kids: frozenset[str]
    reencrypted: ReencryptReport


async def rotate_encryption(config: StrataConfig, environ: Mapping[str, str]) -> RotationReport:
    """Rotate the key file (if the keys live in one) and re-seal all stored data with the new key.

    With keys in the environment, the operator has already set the new key in STRATA_ENCRYPTION_KEY
    and the previous one in STRATA_ENCRYPTION_OLD_KEYS; this only re-seals. Servers reading a rotated
    key file pick the new key up when they first meet it; they keep sealing with the old one until they
    restart (it stays in the file, so nothing becomes unreadable; run this again afterwards to catch up).
    """
    source = load_keyring(config, environ)
    keyring = source.keyring
    rotate = source.key_file is not None and source.created_file is None  # a brand-new file has nothing to rotate
    if rotate:
        assert source.key_file is not None
        rotate_key_file(source.key_file)
        keyring = read_key_file(source.key_file)
    db = Database(config.effective_database_url, keyring=keyring)
    try:
        await db.upgrade()
        report = await reencrypt_all(db)
    finally:
        await db.dispose()
    return RotationReport(source, rotate, keyring.kids - {keyring.current}, report)


async def reencrypt_all(db: Database, batch_rows: int = BATCH_ROWS) -> ReencryptReport:
    """Rewrite every encrypted column of every row not yet sealed with the keyring's current key."""
    if db.keyring is None:
        raise EncryptionError("re-encryption needs a database opened with a keyring")
    report = ReencryptReport(db.keyring.current)
    for table, pk, columns in _encrypted_tables():
        count = report.tables[table.name] = TableCount()
        last: Any = None
        while True:
            async with db.transaction() as tx:
                last = await _reencrypt_batch(db, tx, table, pk, columns, last, batch_rows, count)
            if last is None:
                break
    return report


def _encrypted_tables() -> Iterator[tuple[Table, Column[Any], list[Column[Any]]]]:
    for table in Base.metadata.sorted_tables:
        columns = [c for c in table.columns if isinstance(c.type, EncryptedJSON | EncryptedText)]
        if columns:
            (pk,) = table.primary_key.columns
            yield table, pk, columns


async def _reencrypt_batch(
    db: Database,
    tx: AsyncSession,
    table: Table,
    pk: Column[Any],
    columns: list[Column[Any]],
    after: Any,
    limit: int,
    count: TableCount,
) -> Any:
    """One batch after primary key `after`; returns the batch's last key, or None when the table is done."""
    assert db.keyring is not None
    # Read the stored form (type_coerce to the plain column type) to see which key sealed each value.
    raw = [type_coerce(c, _sealing(c).impl_instance).label(c.name) for c in columns]
    query = select(pk, *raw).order_by(pk).limit(limit)
    if after is not None:
        query = query.where(pk > after)
    if not db.is_sqlite:
        # A live server must not write these rows between our read and write (SQLite: BEGIN IMMEDIATE did it).
        query = query.with_for_update()
    rows = (await tx.execute(query)).all()
    if not rows:
        return None
    current = db.keyring.current
    stale = [row for row in rows if any(_stale(value, current) for value in row[1:])]
    if stale:
        dialect = db.engine.sync_engine.dialect
        params = [
            {"p_pk": row[0]}
            | {
                f"v_{c.name}": _sealing(c).process_result_value(value, dialect)
                for c, value in zip(columns, row[1:], strict=True)
            }
            for row in stale
        ]
        statement = (
            update(table)
            .where(pk == bindparam("p_pk"))
            .values({c: bindparam(f"v_{c.name}", type_=c.type) for c in columns})
        )
        await (await tx.connection()).execute(statement, params)
    count.scanned += len(rows)
    count.rewritten += len(stale)
    return rows[-1][0]


def _sealing(column: Column[Any]) -> EncryptedJSON | EncryptedText:
    return cast(EncryptedJSON | EncryptedText, column.type)


def _stale(stored: Any, current_kid: str) -> bool:
    """Whether a stored value is plaintext or sealed with a key other than the current one."""
    if stored is None:
        return False
    if isinstance(stored, dict) and len(stored) == 1 and isinstance(stored.get(ENC_KEY), str):
        stored = stored[ENC_KEY]
    return not (isinstance(stored, str) and envelope_kid(stored) == current_kid)
