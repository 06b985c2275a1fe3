"""The audit trail on SQLite and on PostgreSQL: nothing lost on shutdown, tampering named by row id,
one intact keyed chain with several writers (replicas), rows from before the chain was keyed, and the
`strata audit` commands as a real process."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import secrets
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import structlog.testing
import yaml
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from strata.security.audit import GENESIS, AuditRecord, AuditRow, ChainKeys, chain_hash, normalized, verify_chain
from strata.security.audit_checkpoint import Checkpointer, read_anchors
from strata.security.audit_log import AuditBacklogFull, AuditLog
from strata.security.encryption import EncryptionError, Keyring
from strata.store.audit import AuditStore
from strata.store.database import Database
from strata.store.tables import AuditEvent
from tests.support.databases import fresh_postgres, sqlite_url

REPO_ROOT = Path(__file__).resolve().parents[2]
KEY = secrets.token_bytes(32)
KEYRING = Keyring.from_keys(KEY)  # the chain's HMAC key derives from it, as a server's does


@pytest.fixture(params=["sqlite", "postgresql"])
async def url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    if request.param == "sqlite":
        with sqlite_url(tmp_path) as database_url:
            yield database_url
    else:
        async with fresh_postgres() as database_url:
            yield database_url


@pytest.fixture
async def db(url: str) -> AsyncIterator[Database]:
    database = Database(url, keyring=KEYRING)
    await database.upgrade()
    yield database
    await database.dispose()


def event(n: int, writer: str = "a", action: str = "auth.failed") -> AuditRecord:
    return AuditRecord(
        action=action,
        outcome="failure" if n % 2 else "success",
        actor=f"{writer}-user-{n % 5}",
        actor_role="member",
        resource=f"key:{n}",
        source_ip="203.0.113.7",
        request_id=f"req-{writer}-{n}",
        details={"n": n, "writer": writer, "ratio": n / 7, "whole": 3.0, "when": datetime.now(UTC)},
    )


async def seeded(db: Database, count: int = 10) -> AuditStore:
    store = AuditStore(db)
    await store.append([event(n) for n in range(1, count + 1)])
    return store


async def execute(db: Database, sql: str, **params: object) -> None:
    async with db.transaction() as tx:
        await tx.execute(text(sql), params)


async def test_nothing_recorded_is_lost_on_shutdown(db: Database) -> None:
    store = AuditStore(db)
    log = AuditLog(store)
    await log.start()
    for n in range(1000):
        log.record(event(n))
    await log.stop()  # at once: most of the thousand are still queued
    rows = [row async for row in store.iter_rows()]
    assert [row.record.details["n"] for row in rows] == list(range(1000))  # all of them, in order
    assert [row.id for row in rows] == list(range(1, 1001))
    assert (await store.verify()).ok


async def test_flush_writes_what_was_recorded_before_it(db: Database) -> None:
    store = AuditStore(db)
    log = AuditLog(store, flush_interval_s=60)  # only flush() or a full batch may write
    await log.start()
    log.record(event(1, action="key.revoked"))
    await log.flush()
    assert [row.record.action for row in await store.rows()] == ["key.revoked"]
    await log.stop()


async def test_round_trip_keeps_every_field(db: Database) -> None:
    original = event(3, action="data.read_other_user")
    await AuditStore(db).append([original])
    (row,) = await AuditStore(db).rows()
    assert row.record.ts == original.ts.replace(tzinfo=UTC)
    assert row.record.details["ratio"] == 3 / 7 and row.record.details["whole"] == 3
    assert (row.record.actor, row.record.source_ip, row.record.request_id) == ("a-user-3", "203.0.113.7", "req-a-3")
    assert (row.id, row.record.outcome, row.record.resource) == (1, "failure", "key:3")


async def test_an_updated_row_is_named(db: Database) -> None:
    store = await seeded(db)
    await execute(db, "UPDATE audit_events SET outcome = 'success' WHERE id = 5")
    result = await store.verify()
    assert (result.ok, result.first_bad_id, result.problem) == (False, 5, "changed")
    assert "row 5 was changed" in result.message
    assert result.rows_checked == 5


async def test_a_deleted_row_is_named(db: Database) -> None:
    store = await seeded(db)
    await execute(db, "DELETE FROM audit_events WHERE id = 6")
    result = await store.verify()
    assert (result.ok, result.first_bad_id, result.problem) == (False, 7, "deleted or reordered")
    assert "row 7 does not follow row 5" in result.message and "missing: row 6" in result.message


async def test_rows_from_before_the_chain_was_keyed_verify_as_unkeyed(db: Database) -> None:
    prev, values = GENESIS, []
    for n in range(1, 4):  # what the unkeyed scheme wrote: plain SHA-256, no key id
        record = normalized(event(n))
        digest = chain_hash(prev, record)
        values.append({**record.__dict__, "id": n, "prev_hash": prev, "hash": digest, "kid": None})
        prev = digest
    async with db.transaction() as tx:
        await tx.execute(AuditEvent.__table__.insert(), values)
    store = AuditStore(db)
    await store.append([event(4), event(5)])  # the first keyed row signs the unkeyed head
    result = await store.verify()
    assert result.ok and (result.legacy_rows, result.keyed_rows) == (3, 2), result.message
    assert any(line.startswith("3 unkeyed rows") and "row 4" in line for line in result.checked)
    await execute(db, "UPDATE audit_events SET outcome = 'denied' WHERE id = 2")
    assert ((await store.verify()).first_bad_id, (await store.verify()).problem) == (2, "changed")


async def test_a_store_without_the_keyring_reads_but_does_not_append(db: Database, url: str) -> None:
    await seeded(db, 3)
    blind = Database(url)
    try:
        with pytest.raises(EncryptionError, match="keyed"):
            await AuditStore(blind).append([event(4)])
        result = await AuditStore(blind).verify()
        assert (result.ok, result.problem, result.first_bad_id) == (False, "unverifiable", 1)
    finally:
        await blind.dispose()


async def test_swapped_rows_are_named(db: Database) -> None:
    store = await seeded(db)
    third, fourth = (await store.rows(after_id=2, limit=2))[:2]
    # `hash` is unique: park row 3 on a placeholder while row 4 takes its content.
    await execute(db, "UPDATE audit_events SET hash = :h WHERE id = 3", h="x" * 64)
    await put(db, 4, third)
    await put(db, 3, fourth)
    result = await store.verify()
    assert (result.ok, result.first_bad_id, result.problem) == (False, 3, "deleted or reordered")
    assert "row 3 does not follow row 2" in result.message


async def put(db: Database, row_id: int, content: AuditRow) -> None:
    """Overwrite a row with another row's content (all columns but id), with plain SQL."""
    r = content.record
    await execute(
        db,
        "UPDATE audit_events SET ts = :ts, actor = :actor, outcome = :outcome, request_id = :request_id, "
        "resource = :resource, details = :details, prev_hash = :prev_hash, hash = :hash WHERE id = :id",
        ts=r.ts if not db.is_sqlite else r.ts.replace(tzinfo=None).isoformat(sep=" "),
        actor=r.actor,
        outcome=r.outcome,
        request_id=r.request_id,
        resource=r.resource,
        details=json.dumps(r.details),
        prev_hash=content.prev_hash,
        hash=content.hash,
        id=row_id,
    )


async def test_two_replicas_appending_at_once_keep_one_chain(url: str) -> None:
    first, second = Database(url, keyring=KEYRING), Database(url, keyring=KEYRING)  # two replicas' engines
    try:
        await first.upgrade()
        logs = [AuditLog(AuditStore(d), batch=7, flush_interval_s=0.005) for d in (first, second)]
        for log in logs:
            await log.start()

        async def produce(log: AuditLog, writer: str) -> None:
            for n in range(300):
                log.record(event(n, writer))
                if n % 10 == 0:
                    await asyncio.sleep(0.002)

        async def append_directly(store: AuditStore, writer: str) -> None:
            for n in range(40):
                await store.append([event(n, writer), event(n + 1000, writer)])

        await asyncio.gather(
            produce(logs[0], "a"),
            produce(logs[1], "b"),
            append_directly(AuditStore(first), "c"),
            append_directly(AuditStore(second), "d"),
        )
        await asyncio.gather(*(log.stop() for log in logs))
        store = AuditStore(first)
        rows = [row async for row in store.iter_rows()]
        assert len(rows) == 2 * 300 + 2 * 80
        for writer in "ab":  # each writer's events stay in the order it recorded them
            mine = [row.record.details["n"] for row in rows if row.record.details["writer"] == writer]
            assert mine == list(range(300))
        result = await store.verify()
        assert result.ok, result.message
        assert (result.keyed_rows, result.key_ids) == (len(rows), (KEYRING.current,))
    finally:
        await first.dispose()
        await second.dispose()


class FlakyStore(AuditStore):
    """Fails the first `failures` appends the way a restarting database does, then recovers."""

    def __init__(self, db: Database, failures: int) -> None:
        super().__init__(db)
        self.failures = failures

    async def append(self, records: Sequence[AuditRecord]) -> None:
        if self.failures > 0:
            self.failures -= 1
            raise OperationalError("INSERT", {}, ConnectionRefusedError("database is restarting"))
        await super().append(records)


async def test_a_failed_write_is_retried_not_dropped(db: Database) -> None:
    store = FlakyStore(db, failures=4)
    log = AuditLog(store, batch=10, flush_interval_s=0.01, retry_initial_s=0.01)
    await log.start()
    for n in range(25):
        log.record(event(n))
    await asyncio.wait_for(log.flush(), 10)
    assert store.failures == 0
    assert [row.record.details["n"] for row in await store.rows()] == list(range(25))
    await log.stop()


async def test_events_the_database_never_takes_go_to_the_error_log_at_shutdown(db: Database) -> None:
    log = AuditLog(FlakyStore(db, failures=10**9), retry_initial_s=0.01)
    await log.start()
    for n in range(3):
        log.record(event(n, action="key.rotated"))
    with structlog.testing.capture_logs() as logs:
        await asyncio.wait_for(log.stop(timeout_s=0.3), 5)
        log.record(event(9, action="config.reloaded"))  # too late for the table: logged, not dropped
    kept = [entry["item"] for entry in logs if entry["log_level"] == "error"]
    assert len(kept) == 4 and all('"action":"key.rotated"' in line for line in kept[:3])
    assert '"action":"config.reloaded"' in kept[3]
    assert log.pending == 0


async def test_backpressure_keeps_events_then_refuses_loudly(db: Database) -> None:
    store = FlakyStore(db, failures=10**9)  # down for good, until we say so
    log = AuditLog(store, max_queue=5, max_backlog=8, flush_interval_s=0.01, retry_initial_s=0.01)
    await log.start()
    for n in range(8):
        log.record(event(n))
    assert log.overloaded and log.pending == 8  # past max_queue: kept, and reported
    with pytest.raises(AuditBacklogFull):
        log.record(event(8))
    store.failures = 0  # the database is back
    await asyncio.wait_for(log.flush(), 10)
    assert not log.overloaded
    assert len(await store.rows()) == 8
    await log.stop()


async def test_an_event_the_database_rejects_does_not_block_the_rest(db: Database) -> None:
    class Picky(AuditStore):
        async def append(self, records: Sequence[AuditRecord]) -> None:
            if any(r.action == "poison" for r in records):
                raise ValueError("rejected")
            await super().append(records)

    store = Picky(db)
    log = AuditLog(store, batch=4, flush_interval_s=0.01, retry_initial_s=0.001)
    await log.start()
    for n in range(10):
        log.record(event(n, action="poison" if n == 5 else "auth.failed"))
    await asyncio.wait_for(log.flush(), 10)
    assert [row.record.details["n"] for row in await store.rows()] == [0, 1, 2, 3, 4, 6, 7, 8, 9]
    await log.stop()


async def test_query_filters_and_pages(db: Database) -> None:
    store = AuditStore(db)
    await store.append([event(n, action="key.created" if n % 3 == 0 else "auth.failed") for n in range(12)])
    created = await store.query(action="key.created")
    assert [row.record.details["n"] for row in created] == [0, 3, 6, 9]
    page = await store.query(action="key.created", limit=2, after_id=created[1].id)
    assert [row.id for row in page] == [created[2].id, created[3].id]
    assert {row.record.actor for row in await store.query(actor="a-user-1")} == {"a-user-1"}
    assert len(await store.query(since=datetime.now(UTC) - timedelta(minutes=1))) == 12
    assert await store.query(since=datetime.now(UTC) + timedelta(minutes=1)) == []


# --- the CLI, as a real process -------------------------------------------------------------------------


def strata_audit(tmp_path: Path, database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "strata.yaml"
    config.write_text(yaml.safe_dump({"database_url": database_url, "data_dir": str(tmp_path / "data")}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("STRATA_")}
    env["COLUMNS"] = "80"
    env["STRATA_ENCRYPTION_KEY"] = base64.b64encode(KEY).decode()  # the server's key: it checks the HMACs
    command = [sys.executable, "-m", "strata", "audit", *args, "--config", str(config)]
    return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False)


async def test_cli_verify_and_export(db: Database, url: str, tmp_path: Path) -> None:
    store = await seeded(db, 25)
    intact = await asyncio.to_thread(strata_audit, tmp_path, url, "verify")
    assert intact.returncode == 0, intact.stderr
    assert "audit chain intact: 25 rows" in intact.stdout

    exported = await asyncio.to_thread(strata_audit, tmp_path, url, "export", "--out", str(tmp_path / "audit.jsonl"))
    assert exported.returncode == 0, exported.stderr
    lines = (tmp_path / "audit.jsonl").read_text().splitlines()
    assert len(lines) == 25
    parsed = [json.loads(line) for line in lines]
    assert set(parsed[0]) >= {"id", "ts", "actor", "action", "outcome", "details", "prev_hash", "hash"}
    assert verify_chain((AuditRow.from_json(obj) for obj in parsed), ChainKeys(KEYRING)).ok  # an export verifies alone

    to_stdout = await asyncio.to_thread(strata_audit, tmp_path, url, "export", "--out", "-")
    assert to_stdout.returncode == 0, to_stdout.stderr
    assert to_stdout.stdout.splitlines() == lines

    await execute(db, "UPDATE audit_events SET outcome = 'denied' WHERE id = 17")
    broken = await asyncio.to_thread(strata_audit, tmp_path, url, "verify")
    assert broken.returncode == 1, broken.stderr
    assert "audit chain broken (changed): row 17 was changed" in broken.stdout
    assert (await store.verify()).first_bad_id == 17


async def test_cli_on_a_database_without_the_table(url: str, tmp_path: Path) -> None:
    result = await asyncio.to_thread(strata_audit, tmp_path, url, "verify")
    assert result.returncode == 2
    assert "strata db upgrade" in result.stderr


async def test_checkpoints_follow_the_head_and_never_vouch_for_a_forged_one(db: Database, tmp_path: Path) -> None:
    store = await seeded(db, 3)
    path = tmp_path / "data" / "audit-checkpoints.jsonl"
    log = AuditLog(store, flush_interval_s=0.01, checkpointer=Checkpointer(store, path, interval_s=3600))
    with structlog.testing.capture_logs() as logs:
        await log.start()  # a checkpoint of row 3 at start
        log.record(event(4))
        await log.stop()  # and of row 4 at stop, once it is written
    heads = [(c.head_id, c.head_hash) for c in read_anchors([path], ChainKeys(KEYRING)).anchors]
    rows = await store.rows()
    assert heads == [(3, rows[2].hash), (4, rows[3].hash)]
    assert [entry["head_id"] for entry in logs if entry["event"] == "audit checkpoint"] == [3, 4]
    assert oct(path.stat().st_mode & 0o777) == oct(0o600)

    await execute(db, "UPDATE audit_events SET outcome = 'denied' WHERE id = 4")
    checkpointer = Checkpointer(store, path, interval_s=3600)
    with structlog.testing.capture_logs() as logs:
        assert await checkpointer.checkpoint() is None
    assert [entry["row"] for entry in logs if "not written by Strata" in entry["event"]] == [4]
    assert len(path.read_text().splitlines()) == 2


async def test_a_checkpoint_is_logged_when_its_file_cannot_be_written(db: Database, tmp_path: Path) -> None:
    store = await seeded(db, 2)
    (tmp_path / "not-a-dir").write_text("")
    checkpointer = Checkpointer(store, tmp_path / "not-a-dir" / "checkpoints.jsonl", interval_s=3600)
    with structlog.testing.capture_logs() as logs:
        checkpoint = await checkpointer.checkpoint()
    assert checkpoint is not None and checkpoint.head_id == 2
    events = [entry["event"] for entry in logs]
    assert events == ["audit checkpoint", "cannot append the audit checkpoint to its file"]
