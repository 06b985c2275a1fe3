"""Tampering with the audit trail of a real `strata serve`, seen by the real `strata audit verify` and by
GET /admin/audit/verify, on SQLite and on PostgreSQL.

Someone who can write the database but holds neither the encryption key nor the server's disk: deletes the
newest rows (truncation, which the chain alone cannot show: the signed checkpoints do), or edits a row and
recomputes the plain SHA-256 hashes after it (which the keyed chain shows, whether the rows keep their key
id or pose as rows from before the chain was keyed). Each tampering is undone after its test, so the
module's one server serves them all.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import httpx
import pytest
from sqlalchemy import text

from strata.security.audit import GENESIS, AuditRow, chain_hash
from strata.store.audit import AuditStore
from strata.store.database import Database
from tests.conftest import mock_model
from tests.integration.test_security_canary import postgres_database
from tests.support.mock_backend import MockBackend
from tests.support.strata_process import StrataProcess

T = TypeVar("T")
CHECKPOINTS = "strata-data/audit-checkpoints.jsonl"
FORGED_HEAD = "the audit chain's newest row was not written by Strata"


@dataclass
class Trail:
    server: StrataProcess
    database_url: str  # as the test reaches it (SQLAlchemy async URL)
    env: dict[str, str]  # the server's environment (the encryption key on PostgreSQL): the CLI gets it too


def on_db(trail: Trail, work: Callable[[Database], Awaitable[T]]) -> T:
    """Run `work` on a connection of our own: the tamperer's, with no keyring."""

    async def main() -> T:
        db = Database(trail.database_url)
        try:
            return await work(db)
        finally:
            await db.dispose()

    return asyncio.run(main())


async def stored_rows(db: Database) -> list[AuditRow]:
    return [row async for row in AuditStore(db).iter_rows()]


async def rewrite(db: Database, rows: list[AuditRow]) -> None:
    """Put `rows` back as the whole table, with plain SQL (what a database writer can do)."""
    async with db.transaction() as tx:
        await tx.execute(text("DELETE FROM audit_events"))
        for row in rows:
            r = row.record
            await tx.execute(
                text(
                    "INSERT INTO audit_events (id, ts, actor, actor_role, action, resource, outcome, source_ip, "
                    "request_id, details, prev_hash, hash, kid) VALUES (:id, :ts, :actor, :actor_role, :action, "
                    ":resource, :outcome, :source_ip, :request_id, :details, :prev_hash, :hash, :kid)"
                ),
                {
                    **row.to_json(),  # every column, as exported
                    "ts": r.ts if not db.is_sqlite else r.ts.replace(tzinfo=None).isoformat(sep=" "),
                    "details": json.dumps(r.details),
                },
            )


def recomputed(rows: list[AuditRow], start: int, *, keep_kid: bool) -> list[AuditRow]:
    """Plain SHA-256 hashes (the scheme before the chain was keyed) from the row at index `start` on."""
    out = rows[:start]
    prev = out[-1].hash if out else GENESIS
    for row in rows[start:]:
        digest = chain_hash(prev, row.record)
        out.append(replace(row, prev_hash=prev, hash=digest, kid=row.kid if keep_kid else None))
        prev = digest
    return out


def cli_verify(trail: Trail) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STRATA_")}
    env.update(trail.env, COLUMNS="200")
    command = [sys.executable, "-m", "strata", "audit", "verify", "--config", str(trail.server.config_path)]
    return subprocess.run(
        command, cwd=trail.server.workdir, env=env, capture_output=True, text=True, timeout=120, check=False
    )


def api_verify(trail: Trail) -> dict[str, Any]:
    response = httpx.get(trail.server.url + "/admin/audit/verify", headers=trail.server.headers, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def checkpointed_head(trail: Trail, timeout_s: float = 20.0, at_least: int = 12) -> list[AuditRow]:
    """The stored rows, once there are `at_least` (the writer flushes in batches: a checkpoint may come
    between two) and a checkpoint in the server's file covers the newest of them."""
    path = trail.server.workdir / CHECKPOINTS
    deadline = time.monotonic() + timeout_s
    while True:
        rows = on_db(trail, stored_rows)
        lines = path.read_text().splitlines() if path.exists() else []
        heads = {(json.loads(line)["head_id"], json.loads(line)["head_hash"]) for line in lines}
        if len(rows) >= at_least and (rows[-1].id, rows[-1].hash) in heads:
            return rows
        assert time.monotonic() < deadline, f"no checkpoint of row {rows[-1].id if rows else None}: {lines}"
        time.sleep(0.2)


def logged_after(trail: Trail, event: str, before: int, timeout_s: float = 15.0) -> dict[str, Any]:
    """The server's newest log line for `event`, once there are more than `before` of them."""
    deadline = time.monotonic() + timeout_s
    while trail.server.logs().count(event) <= before:
        assert time.monotonic() < deadline, f"no {event!r} in the log"
        time.sleep(0.2)
    return [json.loads(line) for line in trail.server.logs().splitlines() if event in line][-1]  # type: ignore[no-any-return]


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def trail(
    request: pytest.FixtureRequest, mock_backend: MockBackend, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Trail]:
    workdir = tmp_path_factory.mktemp(f"audit-{request.param}")
    config: dict[str, Any] = {
        "models": [mock_model(mock_backend)],
        "server": {"drain_delay_s": 0, "shutdown_grace_s": 5},
        "security": {"audit": {"checkpoint_interval_s": 1}},
    }
    env = {"MOCK_API_KEY": "mock-secret"}
    sqlite = f"sqlite+aiosqlite:///{workdir / 'strata-data' / 'strata.db'}"  # the server's own file
    with postgres_database() if request.param == "postgresql" else contextlib.nullcontext(sqlite) as database_url:
        if request.param == "postgresql":
            config["database_url"] = database_url
            env["STRATA_ENCRYPTION_KEY"] = base64.b64encode(secrets.token_bytes(32)).decode()
        server = StrataProcess(workdir, config, env).start()
        try:
            trail = Trail(server, database_url, env)
            _make_events(server)
            yield trail
        finally:
            assert server.stop() == 0
        assert '"unhandled error"' not in server.logs()


def _make_events(server: StrataProcess) -> None:
    """A dozen audit rows: failed logins, keys created and revoked."""
    for n in range(6):
        bad = httpx.get(server.base_url + "/models", headers={"Authorization": f"Bearer wrong-{n}"}, timeout=10)
        assert bad.status_code == 401
    with server.client(timeout=10) as client:
        for n in range(3):
            created = client.post("/admin/keys", json={"name": f"k{n}", "role": "user"})
            assert created.status_code == 201, created.text
            assert client.post(f"/admin/keys/{created.json()['id']}/revoke").status_code == 200


def test_an_untouched_trail_verifies_and_says_what_was_checked(trail: Trail) -> None:
    rows = checkpointed_head(trail)
    assert len(rows) >= 12 and all(row.kid for row in rows)  # every row keyed

    result = cli_verify(trail)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"audit chain intact: {len(rows)} rows" in result.stdout
    assert f"head: row {rows[-1].id}, hash {rows[-1].hash}" in result.stdout
    assert f"{len(rows)} keyed rows: HMAC-SHA256" in result.stdout
    assert "signed checkpoints of the head" in result.stdout and CHECKPOINTS in result.stdout

    report = api_verify(trail)
    assert (report["ok"], report["problem"], report["keyed_rows"], report["legacy_rows"]) == (True, None, len(rows), 0)
    assert report["checkpoints"] >= 1 and report["head_id"] == rows[-1].id
    assert any("signed checkpoints" in line for line in report["checked"])


def test_deleting_the_newest_rows_is_named_truncation(trail: Trail) -> None:
    rows = checkpointed_head(trail)
    on_db(trail, lambda db: rewrite(db, rows[:-3]))
    try:
        report = api_verify(trail)
        assert (report["ok"], report["problem"], report["first_bad_id"]) == (False, "truncated", rows[-3].id)
        assert "the newest rows were deleted" in report["message"]

        result = cli_verify(trail)
        assert result.returncode == 1, result.stdout + result.stderr
        assert "audit chain broken (truncated)" in result.stdout
        assert f"saw it reach row {rows[-1].id}" in result.stdout
        assert f"missing: row {rows[-3].id}-{rows[-1].id}" in result.stdout
    finally:
        on_db(trail, lambda db: rewrite(db, rows))
    assert cli_verify(trail).returncode == 0  # put back: intact again


@pytest.mark.parametrize("keep_kid", [True, False], ids=["rows-keep-their-key-id", "rows-pose-as-unkeyed"])
def test_an_edited_row_with_every_later_hash_recomputed_fails(trail: Trail, keep_kid: bool) -> None:
    rows = checkpointed_head(trail)
    target = next(i for i, row in enumerate(rows) if row.record.action == "auth.failed" and i > 0)
    outcome = "success" if keep_kid else "denied"  # each variant forges a head of its own
    edited = [*rows[:target], replace(rows[target], record=replace(rows[target].record, outcome=outcome))]
    forged = recomputed(edited + rows[target + 1 :], target, keep_kid=keep_kid)
    alarms = trail.server.logs().count(FORGED_HEAD)
    on_db(trail, lambda db: rewrite(db, forged))
    try:
        result = cli_verify(trail)
        assert result.returncode == 1, result.stdout + result.stderr
        assert f"audit chain broken (recomputed): row {rows[target].id}" in result.stdout
        report = api_verify(trail)
        assert (report["ok"], report["problem"], report["first_bad_id"]) == (False, "recomputed", rows[target].id)
        alarm = logged_after(trail, FORGED_HEAD, alarms)
        assert alarm["row"] == rows[-1].id  # the replica noticed on its own, and signed no checkpoint of it
    finally:
        on_db(trail, lambda db: rewrite(db, rows))


def test_a_chain_recomputed_from_its_first_row_is_caught_by_the_checkpoints(trail: Trail) -> None:
    rows = checkpointed_head(trail)
    first = replace(rows[0], record=replace(rows[0].record, actor="someone-else"))
    forged = recomputed([first, *rows[1:]], 0, keep_kid=False)  # no keyed row left to betray it
    on_db(trail, lambda db: rewrite(db, forged))
    try:
        result = cli_verify(trail)
        assert result.returncode == 1, result.stdout + result.stderr
        assert "audit chain broken (recomputed)" in result.stdout
        assert "is not the row the checkpoint of" in result.stdout
    finally:
        on_db(trail, lambda db: rewrite(db, rows))
