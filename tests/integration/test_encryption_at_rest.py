"""Encryption at rest, on SQLite and on PostgreSQL: a canary written through the run store never
reaches the bytes on disk (database file, WAL, heap files, COPY output), reads back intact, and survives
a key rotation with every value re-sealed under the new key."""

from __future__ import annotations

import base64
import io
import secrets
import sqlite3
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest
from sqlalchemy import text

from strata.config import StrataConfig
from strata.security.encryption import EncryptionError, Keyring, key_id, load_keyring
from strata.store.agents import AgentVersionStore
from strata.store.database import Database
from strata.store.idempotency import hash_plaintext_keys, is_hashed
from strata.store.reencrypt import reencrypt_all, rotate_encryption
from strata.store.run_journal import RunBatch
from strata.store.runs import RunStore, finish
from strata.store.spans import SpanRecord, SpanStore
from strata.store.tables import Run
from tests.support.databases import fresh_postgres, sqlite_url

ENCRYPTED = {
    "agent_versions": ["spec"],
    "messages": ["data"],
    "sessions": ["metadata"],
    "runs": ["input", "output", "pending_approval", "approvals"],
    "steps": ["input", "output", "error"],
    "events": ["data"],
    "spans": ["sealed", "status_message"],  # content captured on spans (tracing.capture_content), events
    "responses": ["body", "conversation"],  # stored Responses API answers (sealed rows: test_security_canary.py)
}
NO_ROWS_HERE = {"responses"}  # the conversation these tests write makes no stored response


@dataclass
class Place:
    url: str
    directory: Path  # the SQLite file's folder (unused on PostgreSQL)

    @property
    def is_sqlite(self) -> bool:
        return self.url.startswith("sqlite")


@pytest.fixture(params=["sqlite", "postgresql"])
async def place(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Place]:
    if request.param == "sqlite":
        with sqlite_url(tmp_path) as url:
            yield Place(url, tmp_path)
    else:
        async with fresh_postgres() as url:
            yield Place(url, tmp_path)


async def open_db(place: Place, keyring: Keyring | None) -> Database:
    db = Database(place.url, keyring=keyring)
    await db.upgrade()
    return db


async def write_conversation(db: Database, canary: str, control: str) -> tuple[str, str]:
    """Everything a chat with a tool call writes, each piece carrying the canary (session metadata too);
    `control` is the session's owner, which is not encrypted, to prove the byte scans would see plaintext."""
    store = RunStore(db)
    await AgentVersionStore(db).add("agent", {"instructions": f"You are a bot. {canary}"}, "api")
    session = await store.create_session("agent", control, {"note": canary})
    run, _ = await store.create_run(
        session_id=session.id,
        agent="agent",
        agent_version=1,
        owner=control,
        input_message={"role": "user", "content": f"hello {canary}"},
        idempotency_key=None,
        timeout_s=60,
    )
    # The steps, messages and events go through the run journal, as a worker writes them.
    claimed = await store.claim("worker-1", 60)
    assert claimed is not None and claimed.id == run.id
    batch = RunBatch()
    batch.add_message(session.id, run.id, {"role": "user", "content": f"hello {canary}"})
    batch.start_step(turn=0, kind="tool", name="http_fetch", call_id="c1", input_={"url": f"https://x/?q={canary}"})
    batch.add_event("message.delta", {"delta": canary})
    await store.commit(claimed, "worker-1", 60, batch)
    batch = RunBatch()
    output = {"content": f"page says {canary}"}
    batch.complete_step(turn=0, kind="tool", call_id="c1", output=output, error=f"echo {canary}")
    await store.commit(claimed, "worker-1", 60, batch)
    async with store.unit() as unit:
        row = await unit.tx.get(Run, run.id)
        assert row is not None
        row.status, row.pending_approval = "awaiting_approval", [{"id": "c2", "arguments": {"q": canary}}]
    await store.set_approvals(run.id, {"c2": {"approved": True, "note": canary}})
    async with store.unit() as unit:
        row = await unit.tx.get(Run, run.id)
        assert row is not None
        await finish(unit, row, "completed", "done", output=f"answer {canary}")
    span = SpanRecord(
        uuid.uuid4().hex, uuid.uuid4().hex[:16], None, "chat m", "client", 1, 2, "error", f"failed: {canary}",
        run_id=run.id, attributes={"gen_ai.input.messages": f"hello {canary}"},
        events=[{"name": "strata.retry", "time_ns": 1, "attributes": {"error": canary}}],
    )  # fmt: skip
    await SpanStore(db).append([span])
    await store.close()
    return session.id, run.id


async def assert_reads_back(db: Database, session_id: str, run_id: str, canary: str) -> None:
    store = RunStore(db)
    session = await store.get_session(session_id)
    assert session is not None and session.metadata_ == {"note": canary}
    message = (await store.messages(session_id))[0]
    assert message.data == {"role": "user", "content": f"hello {canary}"}
    run = await store.get_run(run_id)
    assert run is not None
    assert run.input == {"role": "user", "content": f"hello {canary}"}
    assert run.output == f"answer {canary}"
    assert run.approvals == {"c2": {"approved": True, "note": canary}} and run.pending_approval is None
    [step] = await store.steps(run_id)
    assert (step.input, step.output, step.error) == (
        {"url": f"https://x/?q={canary}"},
        {"content": f"page says {canary}"},
        f"echo {canary}",
    )
    events = {event.type: event.data for event in await store.events_after(run_id, 0)}
    assert events["message.delta"] == {"delta": canary}
    assert events["run.completed"]["output"] == f"answer {canary}"
    latest = await AgentVersionStore(db).latest("agent")
    assert latest is not None and latest.spec == {"instructions": f"You are a bot. {canary}"}


def sqlite_bytes(directory: Path) -> bytes:
    """The database file and its -wal and -shm companions, whichever exist."""
    files = sorted(directory.glob("strata.db*"))
    assert directory / "strata.db" in files
    return b"".join(path.read_bytes() for path in files)


async def postgres_bytes(url: str) -> tuple[bytes, bytes]:
    """(every table, TOAST table and index file on disk, plus the current WAL segment; COPY text of every table)."""
    connection = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://", 1))
    try:
        await connection.execute("CHECKPOINT")  # dirty buffers reach the heap files
        paths = await connection.fetch(
            "SELECT pg_relation_filepath(oid) AS path FROM pg_class WHERE relkind IN ('r', 't', 'i') AND "
            "(relnamespace = 'public'::regnamespace OR oid IN "
            "(SELECT reltoastrelid FROM pg_class WHERE relnamespace = 'public'::regnamespace))"
        )
        files = [await connection.fetchval("SELECT pg_read_binary_file($1)", r["path"]) for r in paths]
        wal = await connection.fetchval("SELECT pg_walfile_name(pg_current_wal_lsn())")
        files.append(await connection.fetchval("SELECT pg_read_binary_file('pg_wal/' || $1)", wal))
        copies = []
        for table in await connection.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'"):
            buffer = io.BytesIO()
            await connection.copy_from_table(table["tablename"], output=buffer)
            copies.append(buffer.getvalue())
        return b"".join(files), b"".join(copies)
    finally:
        await connection.close()


async def stored_values(db: Database) -> list[str]:
    """Every encrypted column's stored text, as the database holds it."""
    values = []
    async with db.sessions() as tx:
        for table, columns in ENCRYPTED.items():
            for column in columns:
                rows = await tx.execute(text(f"SELECT CAST({column} AS TEXT) FROM {table} WHERE {column} IS NOT NULL"))
                values += [value for (value,) in rows if value not in (None, "null")]
    return values


def secrets_pair() -> tuple[str, str]:
    return f"CANARY-{uuid.uuid4().hex}", f"CONTROL-{uuid.uuid4().hex}"


async def test_a_canary_never_reaches_the_bytes_on_disk(place: Place) -> None:
    canary, control = secrets_pair()
    db = await open_db(place, Keyring.from_keys(secrets.token_bytes(32)))
    session_id, run_id = await write_conversation(db, canary, control)
    await assert_reads_back(db, session_id, run_id, canary)
    if place.is_sqlite:
        live = sqlite_bytes(place.directory)  # most of it is still in the WAL here
        assert control.encode() in live and canary.encode() not in live
        checkpoint = sqlite3.connect(place.directory / "strata.db")  # outside the engine: no open transaction
        try:
            assert checkpoint.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] == 0  # 0: not blocked
        finally:
            checkpoint.close()
        checkpointed = sqlite_bytes(place.directory)
        assert control.encode() in checkpointed and canary.encode() not in checkpointed
        await db.dispose()
        closed = sqlite_bytes(place.directory)
        assert control.encode() in closed and canary.encode() not in closed
    else:
        on_disk, copied = await postgres_bytes(place.url)
        assert control.encode() in on_disk and canary.encode() not in on_disk
        assert control.encode() in copied and canary.encode() not in copied
        await db.dispose()


async def test_rotation_reseals_every_value_with_the_new_key(place: Place) -> None:
    canary, control = secrets_pair()
    old, new = secrets.token_bytes(32), secrets.token_bytes(32)
    db = await open_db(place, Keyring.from_keys(old))
    session_id, run_id = await write_conversation(db, canary, control)
    await db.dispose()

    rotated = await open_db(place, Keyring.from_keys(new, [old]))
    await assert_reads_back(rotated, session_id, run_id, canary)  # old rows still read under the new ring
    async with RunStore(rotated).unit() as unit:  # a row written after the rotation is sealed with the new key
        await unit.add_message(session_id, run_id, {"role": "assistant", "content": f"later {canary}"})
    report = await reencrypt_all(rotated, batch_rows=2)  # small batches: several per table
    assert report.kid == key_id(new)
    assert (report.tables["messages"].scanned, report.tables["messages"].rewritten) == (2, 1)
    assert (report.tables["events"].scanned, report.tables["events"].rewritten) == (4, 4)
    assert all(count.rewritten == count.scanned for name, count in report.tables.items() if name != "messages")
    assert set(report.tables) == set(ENCRYPTED)
    again = await reencrypt_all(rotated)
    assert all(count.rewritten == 0 for count in again.tables.values())  # safe to run twice (or resume)
    values = await stored_values(rotated)
    assert values and all(f"enc:v1:{key_id(new)}:" in value for value in values)
    assert not any(key_id(old) in value or canary in value for value in values)
    await rotated.dispose()

    new_only = await open_db(place, Keyring.from_keys(new))  # the old key is no longer needed
    await assert_reads_back(new_only, session_id, run_id, canary)
    later = (await RunStore(new_only).messages(session_id))[1]
    assert later.data == {"role": "assistant", "content": f"later {canary}"}
    await new_only.dispose()


async def test_plaintext_rows_from_before_encryption_read_unchanged_and_get_sealed(place: Place) -> None:
    canary, control = secrets_pair()
    plain = await open_db(place, None)
    session_id, run_id = await write_conversation(plain, canary, control)
    await plain.dispose()

    db = await open_db(place, Keyring.from_keys(secrets.token_bytes(32)))
    await assert_reads_back(db, session_id, run_id, canary)
    report = await reencrypt_all(db)
    assert all(
        count.scanned > 0 and count.rewritten == count.scanned
        for name, count in report.tables.items()
        if name not in NO_ROWS_HERE
    )
    assert not any(canary in value for value in await stored_values(db))
    await assert_reads_back(db, session_id, run_id, canary)
    await db.dispose()

    blind = Database(place.url)  # sealed data opened without a key: an error, never ciphertext as content
    try:
        with pytest.raises(EncryptionError, match=r"messages\.data holds encrypted data"):
            await RunStore(blind).messages(session_id)
    finally:
        await blind.dispose()


async def test_rotate_encryption_rotates_the_key_file_or_follows_the_environment(place: Place) -> None:
    canary, control = secrets_pair()
    config = StrataConfig.model_validate({"data_dir": str(place.directory / "data"), "database_url": place.url})
    old, new = secrets.token_bytes(32), secrets.token_bytes(32)
    # SQLite: the embedded default's key file; PostgreSQL: keys from the environment, rotated by the operator.
    before_env = {} if place.is_sqlite else {"STRATA_ENCRYPTION_KEY": base64.b64encode(old).decode()}
    source = load_keyring(config, before_env)
    db = await open_db(place, source.keyring)
    session_id, run_id = await write_conversation(db, canary, control)
    await db.dispose()

    rotated = {"STRATA_ENCRYPTION_KEY": base64.b64encode(new), "STRATA_ENCRYPTION_OLD_KEYS": base64.b64encode(old)}
    after_env = {} if place.is_sqlite else {name: key.decode() for name, key in rotated.items()}
    rotation = await rotate_encryption(config, after_env)
    assert rotation.retired_kids == {source.keyring.current}
    assert rotation.rotated_file is place.is_sqlite
    assert rotation.reencrypted.kid != source.keyring.current
    assert rotation.reencrypted.tables["messages"].rewritten == 1
    after = load_keyring(config, after_env).keyring
    assert after.current == rotation.reencrypted.kid
    db = await open_db(place, after)
    await assert_reads_back(db, session_id, run_id, canary)
    assert not any(source.keyring.current in value for value in await stored_values(db))
    await db.dispose()


async def test_idempotency_keys_are_stored_hashed_and_plain_ones_from_before_are_found_then_hashed(
    place: Place,
) -> None:
    canary = f"IDEM-{uuid.uuid4().hex}"

    async def start(db: Database, key: str) -> tuple[str, bool]:
        store = RunStore(db)
        session = await store.create_session("agent", None)
        run, created = await store.create_run(
            session_id=session.id, agent="agent", agent_version=1, owner=None,
            input_message={"role": "user", "content": "hi"}, idempotency_key=key, timeout_s=60,
        )  # fmt: skip
        await store.close()
        return run.id, created

    async def stored(db: Database) -> list[str]:
        async with db.sessions() as tx:
            return [key for (key,) in await tx.execute(text("SELECT idempotency_key FROM runs ORDER BY id"))]

    plain = await open_db(place, None)  # an older version: the key as it came
    old_run, _ = await start(plain, f"{canary}-old")
    await plain.dispose()

    old, new = secrets.token_bytes(32), secrets.token_bytes(32)
    db = await open_db(place, Keyring.from_keys(old))
    assert await start(db, f"{canary}-old") == (old_run, False)  # found by the key itself
    assert await hash_plaintext_keys(db) == 1 and await hash_plaintext_keys(db) == 0
    assert await start(db, f"{canary}-old") == (old_run, False)  # and by its hash
    sealed_run, created = await start(db, f"{canary}-sealed")
    assert created and await start(db, f"{canary}-sealed") == (sealed_run, False)
    assert all(is_hashed(key) and canary not in key for key in await stored(db))
    await db.dispose()

    rotated = await open_db(place, Keyring.from_keys(new, [old]))  # keys hashed before a rotation still match
    assert await start(rotated, f"{canary}-sealed") == (sealed_run, False)
    await rotated.dispose()
