"""Encryption at rest, seen from outside: a canary sent to a real `strata serve` (in a chat completion and as an
agent run's input, which the model echoes into the answer, the steps and the events) never appears in the bytes
the server keeps on disk, yet reads back intact through the API after a restart.

SQLite (the embedded default): every file under the data dir, the database with its -wal and -shm, after the
server stopped; the key file the server made for itself. PostgreSQL (key from STRATA_ENCRYPTION_KEY): every
table, TOAST and index file on disk after a CHECKPOINT, the current WAL segment, and a COPY of every table.

A control string that Strata stores unencrypted on purpose (an API key's name) proves the scans would see
plaintext if there were any."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import secrets
import stat
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from tests.conftest import mock_model
from tests.support.databases import postgres_database
from tests.support.mock_backend import MockBackend, Reply
from tests.support.strata_process import StrataProcess


def canary_and_control() -> tuple[str, str]:
    """The canary has characters that JSON escapes and UTF-8 spreads over several bytes."""
    return f'CANARY-{uuid.uuid4().hex} "naïve" café €', f"CONTROL-{uuid.uuid4().hex}"


def canary_forms(canary: str) -> list[bytes]:
    """Byte patterns that betray the canary in the encodings a database or a serializer might store it in."""
    core = canary.split(" ")[0]  # CANARY-<hex>: present in UTF-8, JSON (escaped or not), SQL text and COPY output
    forms = [
        canary.encode(),
        json.dumps(canary).encode(),
        json.dumps(canary, ensure_ascii=False).encode(),
        core.encode(),
        core.encode("utf-16-le"),
        core.encode("utf-16-be"),
    ]
    for prefix in range(3):  # base64 at each of the three alignments, standard and URL-safe alphabets
        encoded = base64.b64encode(b"\0" * prefix + core.encode())[4 if prefix else 0 : -4]
        forms += [encoded, encoded.replace(b"+", b"-").replace(b"/", b"_")]
    return forms


def assert_no_canary(data: bytes, canary: str, control: str, where: str) -> None:
    assert control.encode() in data, f"the scan of {where} cannot see plaintext: it proves nothing"
    for form in canary_forms(canary):
        assert form not in data, f"the canary is readable in {where} as {form!r}"


def sse_events(response: httpx.Response) -> list[dict[str, Any]]:
    return [json.loads(line[len("data: ") :]) for line in response.text.splitlines() if line.startswith("data: ")]


def chat_and_run(server: StrataProcess, canary: str, control: str) -> dict[str, str]:
    """A chat completion, a stored response and a sync agent run carrying the canary; returns the run's and
    session's ids."""
    with server.client(timeout=30) as client:
        chat = client.post(
            "/v1/chat/completions", json={"model": "mock-model", "messages": [{"role": "user", "content": canary}]}
        )
        assert chat.status_code == 200, chat.text
        assert chat.json()["choices"][0]["message"]["content"] == canary  # the mock echoes it
        stored = client.post("/v1/responses", json={"model": "mock-model", "input": canary, "metadata": {"n": canary}})
        assert stored.status_code == 200, stored.text
        again = client.get(f"/v1/responses/{stored.json()['id']}").json()  # a stored response, read back
        assert (again["output"][0]["content"][0]["text"], again["metadata"]) == (canary, {"n": canary})

        server.create_key(name=control)  # stored as it is: the control the scans must see
        session = client.post("/v1/sessions", json={"agent": "demo", "metadata": {"note": canary}})
        assert session.status_code == 201, session.text
        session_id = session.json()["id"]
        run = client.post("/v1/agents/demo/runs", json={"input": canary, "session_id": session_id, "mode": "sync"})
        assert run.status_code == 200, run.text
        assert (run.json()["status"], run.json()["output"]) == ("completed", canary)
        assert [s["output"]["content"] for s in run.json()["steps"] if s["kind"] == "model"] == [canary]
        run_id = run.json()["id"]
        assert_reads_back(client, canary, control, run_id, session_id)
    return {"run": run_id, "session": session_id}


def assert_reads_back(client: httpx.Client, canary: str, control: str, run_id: str, session_id: str) -> None:
    run = client.get(f"/v1/runs/{run_id}").json()
    assert (run["status"], run["output"]) == ("completed", canary)
    assert [step["output"]["content"] for step in run["steps"] if step["kind"] == "model"] == [canary]
    messages = client.get(f"/v1/sessions/{session_id}/messages").json()["data"]
    assert [(m["role"], m["content"]) for m in messages] == [("user", canary), ("assistant", canary)]
    assert client.get(f"/v1/sessions/{session_id}").json()["metadata"] == {"note": canary}
    events = sse_events(client.get(f"/v1/runs/{run_id}/events"))
    completed = [e for e in events if e["type"] == "run.completed"]
    assert completed and completed[0]["output"] == canary, events
    assert [e["message"]["content"] for e in events if e["type"] == "message.completed"] == [canary]


def config(mock: MockBackend, **extra: Any) -> dict[str, Any]:
    return {
        "models": [mock_model(mock)],  # with no agents configured, the demo agent runs on the first model
        "server": {"drain_delay_s": 0, "shutdown_grace_s": 5},
        **extra,
    }


@pytest.fixture
def echo(mock_backend: MockBackend) -> MockBackend:
    mock_backend.default = Reply(echo=True)
    return mock_backend


def data_files(data_dir: Path) -> list[Path]:
    files = sorted(path for path in data_dir.rglob("*") if path.is_file())
    assert data_dir / "strata.db" in files, files
    return files


def test_sqlite_keeps_no_plaintext_on_disk(echo: MockBackend, tmp_path: Path) -> None:
    canary, control = canary_and_control()
    env = {"MOCK_API_KEY": "mock-secret"}
    data_dir = tmp_path / "strata-data"
    server = StrataProcess(tmp_path, config(echo), env).start()
    try:
        ids = chat_and_run(server, canary, control)
        live = data_files(data_dir)  # while it runs, most of it is still in the -wal file
        assert_no_canary(b"".join(path.read_bytes() for path in live), canary, control, f"the live {live}")
    finally:
        assert server.stop() == 0

    files = data_files(data_dir)
    assert_no_canary(b"".join(path.read_bytes() for path in files), canary, control, f"{files}")
    for path in files:
        for form in canary_forms(canary):
            assert form not in path.read_bytes(), f"the canary is readable in {path}"

    key_file = data_dir / "encryption.keys"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    created = [json.loads(line) for line in server.logs().splitlines() if "encryption key file" in line]
    assert [entry["path"] for entry in created] == ["strata-data/encryption.keys"], created
    assert "back it up" in created[0]["event"]

    restarted = StrataProcess(tmp_path, config(echo), env).start()
    try:
        with restarted.client(timeout=30) as client:
            assert_reads_back(client, canary, control, ids["run"], ids["session"])
    finally:
        assert restarted.stop() == 0
    assert restarted.logs().count("created an encryption key file") == 1, "the second start reused the key file"
    assert '"unhandled error"' not in restarted.logs()


async def postgres_bytes(url: str) -> tuple[bytes, bytes]:
    """(every table, TOAST and index file of the database plus the current WAL segment; COPY of every table),
    read through the server as the superuser."""
    connection = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://", 1), user="postgres")
    try:
        await connection.execute("CHECKPOINT")  # dirty buffers reach the heap files
        paths = await connection.fetch(
            "SELECT pg_relation_filepath(oid) AS path FROM pg_class WHERE relkind IN ('r', 't', 'i') AND "
            "(relnamespace = 'public'::regnamespace OR oid IN "
            "(SELECT reltoastrelid FROM pg_class WHERE relnamespace = 'public'::regnamespace))"
        )
        files = [await connection.fetchval("SELECT pg_read_binary_file($1)", row["path"]) for row in paths]
        wal = await connection.fetchval("SELECT pg_walfile_name(pg_current_wal_lsn())")
        files.append(await connection.fetchval("SELECT pg_read_binary_file('pg_wal/' || $1)", wal))
        tables = [
            row["tablename"]
            for row in await connection.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        ]
        assert {"messages", "runs", "steps", "events", "sessions"} <= set(tables), tables
        copies = []
        for table in tables:
            buffer = io.BytesIO()
            await connection.copy_from_query(f'SELECT * FROM "{table}"', output=buffer)
            copies.append(buffer.getvalue())
        return b"".join(files), b"".join(copies)
    finally:
        await connection.close()


def test_postgresql_keeps_no_plaintext_on_disk(echo: MockBackend, tmp_path: Path) -> None:
    canary, control = canary_and_control()
    env = {"MOCK_API_KEY": "mock-secret", "STRATA_ENCRYPTION_KEY": base64.b64encode(secrets.token_bytes(32)).decode()}
    with postgres_database() as database_url:
        server_config = config(echo, database_url=database_url)
        server = StrataProcess(tmp_path, server_config, env).start()
        try:
            ids = chat_and_run(server, canary, control)
        finally:
            assert server.stop() == 0
        on_disk, copied = asyncio.run(postgres_bytes(database_url))
        assert_no_canary(on_disk, canary, control, "the database's files on disk")
        assert_no_canary(copied, canary, control, "COPY of every table")
        # The key came from the environment: no key file was made up (replicas could never share it).
        assert not (tmp_path / "strata-data" / "encryption.keys").exists()
        assert "created an encryption key file" not in server.logs()

        restarted = StrataProcess(tmp_path, server_config, env).start()
        try:
            with restarted.client(timeout=30) as client:
                assert_reads_back(client, canary, control, ids["run"], ids["session"])
        finally:
            assert restarted.stop() == 0
        assert '"unhandled error"' not in server.logs() + restarted.logs()
