"""`strata serve` refuses to start with one line and a non-zero exit, before it creates anything; the
database commands refuse to act on a database that is not the server's."""

from __future__ import annotations

import os
import socket
import sqlite3
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.strata_process import ADMIN_KEY, REPO_ROOT, StrataProcess, listens_on

# A model that needs no backend to start: the refusals must come before anything is contacted anyway.
CONFIG: dict[str, Any] = {
    "models": [{"kind": "openai", "name": "nowhere", "base_url": "http://127.0.0.1:9/v1"}],
    "logging": {"format": "json", "level": "info"},
}
ENCRYPTION_KEY = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY="  # 32 bytes, base64


def strata(workdir: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("STRATA_")}
    return subprocess.run(
        [sys.executable, "-m", "strata", *args],
        cwd=workdir,
        env={**clean, "PYTHONPATH": str(REPO_ROOT), "COLUMNS": "200", **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )


def serve(
    workdir: Path, port: int, env: dict[str, str] | None = None, **config: Any
) -> subprocess.CompletedProcess[str]:
    (workdir / "strata.yaml").write_text(yaml.safe_dump({**CONFIG, "server": {"port": port}, **config}))
    return strata(workdir, "serve", "--config", "strata.yaml", env=env)


def one_line_refusal(result: subprocess.CompletedProcess[str], status: int = 2) -> str:
    """The refusal's text: exit status `status`, one line on stderr, no traceback, no key shown."""
    output = result.stdout + result.stderr
    assert result.returncode == status, output
    assert "Traceback" not in output, output
    assert "sk-strata-" not in output, output  # no admin key was created and shown
    lines = [line for line in result.stderr.splitlines() if line.startswith("cannot start:")]
    assert len(lines) == 1, output
    return lines[0]


@pytest.fixture
def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_a_taken_port_is_refused_before_anything_is_created(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = serve(tmp_path, port)  # no STRATA_ADMIN_KEY: a first start would make and print a key
    line = one_line_refusal(result)
    assert line.startswith(f"cannot start: 127.0.0.1:{port} is already in use"), line
    assert "--port" in line
    assert not (tmp_path / "strata-data" / "strata.db").exists()  # no database, so no key either


def test_a_short_admin_key_is_refused(tmp_path: Path, free_port: int) -> None:
    line = one_line_refusal(serve(tmp_path, free_port, env={"STRATA_ADMIN_KEY": "short"}))
    assert "STRATA_ADMIN_KEY must be at least 16 characters" in line
    assert not (tmp_path / "strata-data" / "strata.db").exists()


def test_postgresql_without_an_encryption_key_is_refused(tmp_path: Path, free_port: int) -> None:
    # Refused before connecting: this database is never created or touched.
    url = f"postgresql+asyncpg://postgres@127.0.0.1:5432/strata_never_{uuid.uuid4().hex[:8]}"
    line = one_line_refusal(serve(tmp_path, free_port, env={"STRATA_ADMIN_KEY": ADMIN_KEY}, database_url=url))
    assert "no encryption key" in line and "STRATA_ENCRYPTION_KEY" in line


def test_an_unreachable_database_is_refused(tmp_path: Path, free_port: int) -> None:
    url = "postgresql+asyncpg://postgres@127.0.0.1:9/strata"  # nothing listens on the discard port
    env = {"STRATA_ADMIN_KEY": ADMIN_KEY, "STRATA_ENCRYPTION_KEY": ENCRYPTION_KEY}
    line = one_line_refusal(serve(tmp_path, free_port, env=env, database_url=url))
    assert line.startswith("cannot start: cannot connect to the database postgresql+asyncpg://postgres@127.0.0.1:9/")


def test_a_failure_while_starting_is_one_line_too(tmp_path: Path, free_port: int) -> None:
    """A database migrated by a newer Strata fails in the middle of the start, not before it: exit 3."""
    (tmp_path / "strata-data").mkdir()
    with sqlite3.connect(tmp_path / "strata-data" / "strata.db") as db:
        db.execute("CREATE TABLE alembic_version (version_num VARCHAR(32) PRIMARY KEY)")
        db.execute("INSERT INTO alembic_version VALUES ('9999_from_the_future')")
    line = one_line_refusal(serve(tmp_path, free_port, env={"STRATA_ADMIN_KEY": ADMIN_KEY}), status=3)
    assert "9999_from_the_future" in line, line


def test_config_check_names_what_serve_would_refuse(tmp_path: Path) -> None:
    (tmp_path / "strata.yaml").write_text(yaml.safe_dump({**CONFIG, "database_url": "postgresql+asyncpg://db/strata"}))
    result = strata(tmp_path, "config", "check", env={"STRATA_ADMIN_KEY": "short"})
    assert result.returncode == 2, result.stdout + result.stderr
    assert "STRATA_ADMIN_KEY must be at least 16 characters" in result.stderr
    assert "no encryption key" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "command", [["keys", "list"], ["keys", "create", "--name", "me"], ["audit", "verify"], ["usage"]]
)
def test_database_commands_elsewhere_refuse_and_create_nothing(tmp_path: Path, command: list[str]) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = strata(elsewhere, *command)
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"no Strata database at {elsewhere / 'strata-data' / 'strata.db'}" in result.stderr
    assert "--config" in result.stderr and "Traceback" not in result.stderr
    assert "sk-strata-" not in result.stdout and "intact" not in result.stdout
    assert list(elsewhere.iterdir()) == []  # nothing made up in the wrong place


def test_database_commands_elsewhere_find_the_servers_data_through_its_config(tmp_path: Path) -> None:
    server_dir, elsewhere = tmp_path / "server", tmp_path / "elsewhere"
    server_dir.mkdir()
    elsewhere.mkdir()
    config = server_dir / "strata.yaml"
    config.write_text(yaml.safe_dump({**CONFIG, "data_dir": str(server_dir / "data")}))
    assert strata(server_dir, "db", "upgrade").returncode == 0  # what `strata serve` does first
    made = strata(elsewhere, "keys", "create", "--name", "ops", "--role", "admin", env={"STRATA_CONFIG": str(config)})
    assert made.returncode == 0, made.stderr
    listed = strata(elsewhere, "keys", "list", "--config", str(config))
    assert listed.returncode == 0 and "ops" in listed.stdout, listed.stdout + listed.stderr
    assert list(elsewhere.iterdir()) == []


def test_a_test_server_whose_port_was_taken_moves_to_another(tmp_path: Path) -> None:
    """Parallel test workers pick free ports independently: a port taken before the server binds it must not
    fail the test, nor let the test talk to someone else's server."""
    process = StrataProcess(tmp_path, CONFIG)
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", process.port))
        squatter.listen()
        taken = process.port
        process.start(wait_ready=False)
        try:
            assert process.port != taken
            assert listens_on(process.process.pid, process.port) and not listens_on(process.process.pid, taken)
            assert process.client().get("/healthz").status_code == 200
            assert "is already in use" in process.logs()  # the first try was refused, then it moved
        finally:
            assert process.stop() == 0
