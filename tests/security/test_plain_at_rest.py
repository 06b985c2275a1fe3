"""What a client sends must not sit in plaintext where Strata keeps it: a real `strata serve` gets canaries as
session metadata and as an Idempotency-Key, and a Strata-key-shaped string as the `model`, in URL paths and in
an upstream error that becomes a run's status reason; none of them may appear in the bytes on disk (the SQLite
file with its -wal and -shm, every file in the data dir; PostgreSQL's heap, TOAST, index and WAL files and a
COPY of every table), while the owner still reads the metadata back and a retry with the same key still gets
the same run. The data dir and everything in it are the server user's alone (0700, 0600), an older install's
looser modes included.

A control string Strata stores as it is (an API key's name) proves each scan would see plaintext."""

from __future__ import annotations

import asyncio
import base64
import secrets
import stat
import string
import uuid
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import mock_model
from tests.integration.test_security_canary import (
    assert_no_canary,
    data_files,
    postgres_bytes,
    postgres_database,
)
from tests.support.mock_backend import MockBackend, Reply
from tests.support.strata_process import StrataProcess


def key_shaped() -> str:
    """What a user might paste by mistake where a model name or an id goes: a Strata API key."""
    return "sk-strata-" + "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(32))


def canaries() -> dict[str, str]:
    return {
        "metadata": f"META-CANARY-{uuid.uuid4().hex}",
        "idempotency": f"IDEM-CANARY-{uuid.uuid4().hex}",
        "model": key_shaped(),
        "path": key_shaped(),
        "reason": key_shaped(),
    }


def send_canaries(server: StrataProcess, mock: MockBackend, found: dict[str, str], control: str) -> None:
    """Every way in, each checked to work as before where it should."""
    server.create_key(name=control)
    with server.client(timeout=30) as client:
        session = client.post("/v1/sessions", json={"agent": "demo", "metadata": {"note": found["metadata"]}})
        assert session.status_code == 201, session.text
        session_id = session.json()["id"]
        assert client.get(f"/v1/sessions/{session_id}").json()["metadata"] == {"note": found["metadata"]}

        headers = {"Idempotency-Key": found["idempotency"]}
        body = {"input": "hello", "session_id": session_id, "mode": "sync"}
        first = client.post("/v1/agents/demo/runs", json=body, headers=headers)
        assert first.status_code == 200, first.text
        again = client.post("/v1/agents/demo/runs", json=body, headers=headers)
        assert again.status_code in (200, 201), again.text
        assert again.json()["id"] == first.json()["id"]  # the replay finds the run by the key's hash

        chat = client.post(
            "/v1/chat/completions", json={"model": found["model"], "messages": [{"role": "user", "content": "hi"}]}
        )
        assert chat.status_code in (400, 404), chat.text
        assert found["model"] not in chat.text  # the error message masks it too
        assert client.get(f"/v1/runs/{found['path']}").status_code == 404
        assert client.get(f"/v1/traces/{found['path']}").status_code in (400, 404)
        anonymous = httpx.get(f"{server.base_url}/sessions/{found['path']}", timeout=10)
        assert anonymous.status_code == 401  # an audited failure whose resource is the path

        mock.script(Reply(status=400, error_message=f"invalid api key {found['reason']}"))
        failed = client.post("/v1/agents/demo/runs", json={"input": "hello", "mode": "sync"})
        assert failed.status_code == 200 and failed.json()["status"] == "failed", failed.text
        assert found["reason"] in failed.json()["status_reason"]  # the upstream's words reach the status reason


def config(mock: MockBackend, **extra: Any) -> dict[str, Any]:
    return {"models": [mock_model(mock)], "server": {"drain_delay_s": 0, "shutdown_grace_s": 5}, **extra}


def assert_private(data_dir: Path) -> None:
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700, oct(data_dir.stat().st_mode)
    loose = {
        str(path.relative_to(data_dir)): oct(stat.S_IMODE(path.stat().st_mode))
        for path in data_dir.rglob("*")
        if stat.S_IMODE(path.stat().st_mode) & 0o077
    }
    assert not loose, f"readable by others: {loose}"


def scan(data: bytes, found: dict[str, str], control: str, where: str) -> None:
    for name, canary in found.items():
        try:
            assert_no_canary(data, canary, control, where)
        except AssertionError as exc:
            raise AssertionError(f"{name}: {exc}") from None


def test_sqlite_keeps_none_of_it_in_plaintext_and_its_files_private(mock_backend: MockBackend, tmp_path: Path) -> None:
    found, control = canaries(), f"CONTROL-{uuid.uuid4().hex}"
    data_dir = tmp_path / "strata-data"
    data_dir.mkdir(mode=0o755)  # an older install: a world-readable data dir and database file
    (data_dir / "strata.db").touch(mode=0o644)
    (data_dir / "logs").mkdir(mode=0o755)
    (data_dir / "logs" / "old-model.log").write_text("a model server's log\n")
    (data_dir / "logs" / "old-model.log").chmod(0o644)
    server = StrataProcess(tmp_path, config(mock_backend), {"MOCK_API_KEY": "mock-secret"}).start()
    try:
        send_canaries(server, mock_backend, found, control)
        live = data_files(data_dir)
        assert {data_dir / "strata.db-wal", data_dir / "strata.db-shm"} <= set(live)
        assert_private(data_dir)  # while it runs: the database's -wal and -shm too
        scan(b"".join(path.read_bytes() for path in live), found, control, f"the live {live}")
    finally:
        assert server.stop() == 0
    files = data_files(data_dir)
    scan(b"".join(path.read_bytes() for path in files), found, control, f"{files}")
    assert_private(data_dir)
    assert '"unhandled error"' not in server.logs()


def test_postgresql_keeps_none_of_it_in_plaintext(mock_backend: MockBackend, tmp_path: Path) -> None:
    found, control = canaries(), f"CONTROL-{uuid.uuid4().hex}"
    env = {"MOCK_API_KEY": "mock-secret", "STRATA_ENCRYPTION_KEY": base64.b64encode(secrets.token_bytes(32)).decode()}
    with postgres_database() as database_url:
        server = StrataProcess(tmp_path, config(mock_backend, database_url=database_url), env).start()
        try:
            send_canaries(server, mock_backend, found, control)
        finally:
            assert server.stop() == 0
        on_disk, copied = asyncio.run(postgres_bytes(database_url))
        scan(on_disk, found, control, "the database's files on disk")
        scan(copied, found, control, "COPY of every table")
    assert_private(tmp_path / "strata-data")  # the audit checkpoints live there
    assert '"unhandled error"' not in server.logs()
